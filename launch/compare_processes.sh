#!/bin/bash
# Same tokens from N processes of one GPU each as from one process of N GPUs, for the
# proposed and baseline presets of N devices and for expert parallelism over all N
# (mesh:1xNx1: every all_to_all crosses the processes), on the float32 tiny model, so
# exactly:
#
#   launch/compare_processes.sh [N=2] [more jax-ep flags]
#
# Run from the repository root on a machine with N GPUs or more (the presets proposed_N and
# baseline_N take the first N); prints "same tokens" or the first difference for each
# deployment and exits nonzero if any differ. PLATFORM=cpu runs it on N fake CPU devices.
set -euo pipefail
N="${1:-2}"; shift || true
PLATFORM="${PLATFORM:-gpu}"
ONE=0; [ "$PLATFORM" = cpu ] && ONE="$N"  # --simulate_devices of the one-process run
OUT="$(mktemp -d)"
status=0
for kind in "proposed_$N" "baseline_$N" "mesh:1x${N}x1"; do
  # Presets of N devices by name: by kind, the one process would resolve the preset of
  # every GPU it sees, not of N.
  args=(generate --deployment="$kind" --batch=16 --prompt_len=8 --max_new_tokens=8 "$@")
  python -m jax_ep "${args[@]}" --simulate_devices="$ONE" --output="$OUT/${kind}_1.json"
  python launch/local.py --num_processes="$N" --devices_per_process=1 --platform="$PLATFORM" -- \
    "${args[@]}" --output="$OUT/${kind}_$N.json"
  python - "$OUT/${kind}_1.json" "$OUT/${kind}_$N.json" "$kind" "$N" <<'PY' || status=1
import json, sys
one, many = (json.load(open(p))["tokens"] for p in sys.argv[1:3])
kind, n = sys.argv[3:5]
if one == many:
  print(f"{kind}: same tokens from {n} processes x 1 GPU as from 1 process x {n} GPUs")
else:
  row = next(i for i, (a, b) in enumerate(zip(one, many)) if a != b)
  print(f"{kind}: tokens differ, first at sequence {row}: {one[row]} vs {many[row]}")
  sys.exit(1)
PY
done
exit "$status"
