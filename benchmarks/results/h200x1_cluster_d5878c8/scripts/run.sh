#!/bin/bash
# The cluster probe: each case in its own process under a timeout (a hang leaves no mosaic line).
cd "$(dirname "$0")/.."
log=$OUT/probe_log.jsonl
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/gpu.txt
python3 -c "import jax; print(jax.__version__, jax.devices())" >> $OUT/gpu.txt 2>&1
while read -r args; do
  [ -z "$args" ] && continue
  echo "## $args" >> $log
  s=$(date +%s)
  timeout ${TMO:-45} python3 .probe/probe.py $args >> $log 2>> $OUT/stderr.txt
  echo "## rc=$? $(( $(date +%s) - s )) s" >> $log
done < "${1:-.probe/cases.txt}"
cat $log
