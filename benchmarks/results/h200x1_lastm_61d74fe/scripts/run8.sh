#!/bin/bash
# seed_swiglu's bench, SwiGLU up blocks k32 x 6 with last_m 0 and 64, one call.
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1 JAX_EP_COMMIT=${1:-unknown} XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
for lm in 64 0; do
  timeout 95 python3 .probe/with_blocks.py 128 32 6 $lm -m jax_ep bench --config=seed_swiglu \
    --kinds=single --prompt_len=128 --out_dir=$OUT/bench_up_lastm$lm > $OUT/bench_up_lastm$lm.log 2>&1
  echo "up last_m=$lm rc=$? $(grep -E '^  single: TPOT' $OUT/bench_up_lastm$lm.log)"
done
