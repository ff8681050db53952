#!/bin/bash
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1 JAX_EP_COMMIT=538ed9c
s=$(date +%s)
timeout 240 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python3 -m jax_ep bench --config=seed_swiglu \
  --kinds=single --prompt_len=128 --out_dir=$OUT/swiglu_1gpu > $OUT/swiglu_1gpu.log 2>&1
echo "bench rc=$? $(( $(date +%s) - s )) s"
grep -E "^\| Single|TPOT" $OUT/swiglu_1gpu.log | head -5
TRITON_VARIANTS=1 TMO=50 bash .probe/run.sh .probe/cases5.txt > /dev/null 2>&1
python3 - <<'PY'
import json, os
for l in open(os.environ["OUT"] + "/probe_log.jsonl"):
  if l.startswith("##"): print(l.strip())
  else:
    r = json.loads(l); print(f"    {r['kernel']:22s} {r.get('ms', 0):.3f} ms err {r.get('max_err', 0):.3g} floor {r.get('weights_floor_ms_at_4TBs')}")
PY
