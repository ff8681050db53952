#!/bin/bash
# The seed's deployments with Open MPI's mpirun, one process per node of 8 GPUs.
#
#   launch/mpirun/seed.sh HOSTFILE proposed|baseline [more jax-ep flags]
#
# HOSTFILE lists the nodes, one per line ("node001 slots=1"): 8 for proposed, 2 for
# baseline; the first is process 0 and hosts the coordinator on $PORT (default 61234).
# Run from the repository root on the first node, with the Python environment that has
# jax_ep active on every node (the same path). jax_ep/distributed.py takes the process
# count and rank from OMPI_COMM_WORLD_SIZE / OMPI_COMM_WORLD_RANK and the coordinator from
# JAX_EP_COORDINATOR (Open MPI 5 does not export the launcher's address). mpirun stops
# the job when one process fails.
set -euo pipefail
HOSTFILE="$1"; KIND="$2"; shift 2
case "$KIND" in
  proposed) NP=8 ;;
  baseline) NP=2 ;;
  *) echo "usage: $0 HOSTFILE proposed|baseline [jax-ep flags]" >&2; exit 2 ;;
esac
HEAD="$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")"
OUT="${OUT:-results/seed_${KIND}_mpirun.json}"
mkdir -p "$(dirname "$OUT")"
mpirun --hostfile "$HOSTFILE" -np "$NP" --map-by ppr:1:node --bind-to none \
  -x JAX_EP_COORDINATOR="$HEAD:${PORT:-61234}" -x PATH -x LD_LIBRARY_PATH -x PYTHONPATH \
  python -m jax_ep generate --config=seed --deployment="seed_$KIND" --batch=1024 \
  --prompt_len=32 --max_new_tokens=32 --distributed_timeout_s=600 --output="$OUT" "$@"
