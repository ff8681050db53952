#!/bin/bash
# Small last tiles (Blocks.last_m): the kernel A/B on four row sets, then seed_swiglu's
# bench with and without the best last_m for near128 rows (one call).
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1 JAX_EP_COMMIT=${1:-unknown} XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
for c in "up swiglu near128" "down none near128" "up gelu l3" "down none l3"; do
  timeout 100 python3 .probe/lastm.py $c >> $OUT/lastm.jsonl 2>> $OUT/stderr.txt
done
cat $OUT/lastm.jsonl
best=$(python3 - <<'PY'
import collections, json, os
t = collections.defaultdict(float); n = collections.Counter()
for l in open(os.environ["OUT"] + "/lastm.jsonl"):
  r = json.loads(l)
  if r["sizes"] == "near128" and "ms" in r:
    t[r["last_m"]] += r["ms"]; n[r["last_m"]] += 1
best = min((v / n[k] * 0 + v, k) for k, v in t.items() if n[k] == max(n.values()))[1]
print(best)
PY
)
echo "best last_m for near128: $best"
for lm in 0 $best; do
  timeout 110 python3 .probe/with_blocks.py 128 32 6 $lm -m jax_ep bench --config=seed_swiglu \
    --kinds=single --prompt_len=128 --out_dir=$OUT/bench_lastm$lm > $OUT/bench_lastm$lm.log 2>&1
  echo "last_m=$lm rc=$? $(grep -E '^  single: TPOT' $OUT/bench_lastm$lm.log)"
done
