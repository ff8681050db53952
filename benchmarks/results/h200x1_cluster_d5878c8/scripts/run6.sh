#!/bin/bash
# seed_swiglu's bench A/B in one call: SwiGLU up blocks k32 x 6 (538ed9c's default) and k64 x 3 (before).
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1 JAX_EP_COMMIT=538ed9c XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
for v in "128 32 6" "128 64 3" "128 32 6" "128 64 3"; do
  tag=$(echo $v | tr ' ' _); i=$((i+1))
  timeout 120 python3 .probe/with_blocks.py $v -m jax_ep bench --config=seed_swiglu --kinds=single \
    --prompt_len=128 --out_dir=$OUT/ab${i}_$tag > $OUT/ab${i}_$tag.log 2>&1
  echo "$i $v rc=$? $(grep -E '^  single: TPOT' $OUT/ab${i}_$tag.log)"
done
