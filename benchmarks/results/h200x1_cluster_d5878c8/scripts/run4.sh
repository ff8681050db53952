#!/bin/bash
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 JAX_EP_COMMIT=d5878c8
for v in "128 64 3" "128 32 6"; do
  tag=$(echo $v | tr ' ' _)
  s=$(date +%s)
  timeout 200 python3 .probe/with_blocks.py $v benchmarks/profile_decode.py --config=seed_swiglu \
    --prompt_len=128 --steps=8 --out=$OUT/profile_swiglu_$tag.json > $OUT/profile_swiglu_$tag.log 2>&1
  echo "$v rc=$? $(( $(date +%s) - s )) s"
  python3 - $OUT/profile_swiglu_$tag.json <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print({k: d[k] for k in ("tpot_ms", "tpot_synced_ms", "device_ms_per_step", "imbalance", "idle_ms_per_step")})
print({k: round(v, 3) for k, v in d["scopes_ms"].items()})
for k, v in sorted(d["kernels_ms"].items(), key=lambda kv: -kv[1])[:14]: print(f"  {v:8.3f} {k}")
PY
done
