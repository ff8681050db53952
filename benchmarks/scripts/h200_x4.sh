#!/usr/bin/env bash
# One device call on nvidia-h200-x4: every GPU measurement of the floor and ring issues.
# Usage (from the repo root, on the GPU machine): bash benchmarks/scripts/h200_x4.sh PART COMMIT
# PART parts: a decode step's parts A/B (decode_parts.py), with and without command buffers;
# rows: the GELU and SwiGLU expert MLPs on the seed step's own row sets (decode_parts.py);
# warps: the same with 16 warps a program;
# pairs: the SwiGLU MLP with its up product over two weights and over one interleaved
#   weight (decode_parts.py --parts=pairs);
# router: the seed's and seed_swiglu's steps with the model's router and with a diagnostic
#   one that gives every expert the mean rows, alternating, twice (decode_parts.py):
#   bash benchmarks/scripts/h200_x4.sh router COMMIT [STEPS [CONFIGS]] (--router_steps,
#   --router_configs);
# ncu: hardware counters of the GELU MLP's two kernels on three row sets (ncu_kernel.py);
# xla: the seed's step and the share of seed_proposed with and without the XLA flags FLAGS,
#   alternating, twice: bash benchmarks/scripts/h200_x4.sh xla COMMIT FLAGS;
# power: the SwiGLU MLP's counters on near128 rows, then the seed's step with the GPU's
#   clocks and power read each second beside it (nvidia-smi dmon);
# kernel: the grouped kernel's sweep; 1: one GPU (profile, the seed, seed_swiglu);
# profile: a 12-step trace of the seed step (profile_decode.py); profile_router: that trace
#   with the diagnostic balanced router, then with the model's;
# share: the seed and the share of seed_proposed twice, then a profile of each;
# calls: the share with 1 and 4 tokens a decode call, alternating, twice; then seed_swiglu;
# attention: decode attention's kernel blocks on the seed's cache (64 positions) and on one
#   of 1024, then the seed's step and the share of seed_proposed with the blocks before
#   e80d25b and the default, alternating, twice (decode_parts.py); attention_swiglu: the
#   same steps of seed_swiglu (prompt 128);
# checks: the CLI on one GPU: generate's dry run, a batch refused for its memory, the seed
#   (with --profile_dir, and what its trace holds) and seed_swiglu (prompt 128) generating, train of tiny_task and generate from its
#   checkpoint;
# 2: several (seed slices with and without the ring, on four GPUs; EP2 on two, and
#   launch/compare_processes.sh 2);
# ab: one GPU's step with the kernel's default blocks and with SPEC, alternating, twice:
#   bash benchmarks/scripts/h200_x4.sh ab COMMIT SPEC [CONFIGS [ROUNDS]]  (--expert_blocks
#   SPEC; CONFIGS comma-separated, default seed_swiglu; seed_swiglu at prompt 128, others
#   32; ROUNDS of the pair per config, default 2).
# tree: one GPU's step with this tree and with the older tree in OLD (a directory holding
#   its jax_ep/ and configs/, e.g. from git archive, and its commit in OLD/COMMIT),
#   alternating, as processes in turn:
#   bash benchmarks/scripts/h200_x4.sh tree COMMIT OLD [CONFIGS [ROUNDS]] (as ab).
# clocks: as tree, one round, with SYNCED (80) synced and STEPS (60) back-to-back steps and
#   the GPU's SM clock and power read every 100 ms beside each (clock_windows.py splits them
#   by phase): bash benchmarks/scripts/h200_x4.sh clocks COMMIT OLD [CONFIG [SYNCED STEPS]]
#   (PROMPT=64 in the environment sets the prompt: seed_swiglu at batch 1024 fits one H200
#   with prompt + SYNCED + STEPS up to about 165 tokens).
# Each part fits one 10-minute call. Writes $OUT/results.tgz and $OUT/summary.txt ($OUT: the
# device tool's output folder; elsewhere, set OUT, or a new folder under /tmp is used).
set -u
PART=${1:-1}
case $PART in checks|parts|rows|warps|pairs|router|ncu|power|profile|profile_router|kernel|share|calls|attention|attention_swiglu|1|2) ;;
  ab) [ -n "${3:-}" ] || { echo "ab needs SPEC, an --expert_blocks value" >&2; exit 2; } ;;
  xla) [ -n "${3:-}" ] || { echo "xla needs FLAGS, XLA flags to add" >&2; exit 2; } ;;
  tree|clocks) [ -d "${3:-}/jax_ep" ] || { echo "$PART needs OLD, a directory with jax_ep/" >&2; exit 2; } ;;
  *) echo "unknown PART '$PART': use checks, parts, rows, warps, pairs, router, ncu, power, xla, profile, profile_router, kernel, share, calls, attention, attention_swiglu, 1, 2, ab, tree or clocks" >&2; exit 2 ;;
esac
export PYTHONPATH=. PYTHONUNBUFFERED=1 JAX_EP_COMMIT=${2:-unknown}
if [ -z "${OUT:-}" ]; then OUT=$(mktemp -d /tmp/jax_ep_h200_XXXX); echo "OUT=$OUT" >&2; fi
R=$OUT/r; mkdir -p $R
step() {  # name timeout_s command...
  local name=$1 t=$2; shift 2
  echo "== $name" | tee -a $OUT/summary.txt
  timeout $t "$@" > $R/$name.log 2>&1; echo "rc=$?" >> $R/$name.log
  grep -E "^\| (Single|One|Prop|Base|slice|mesh|share)|TPOT|TPS|memory|fit|loss|rc=|Error|error|ms_per_step|same tokens|tokens differ|^    |^(combine|cache|kernel|swiglu|pairs|calls|attention|attention_step|router_step|probe|trace|compile events) " \
    $R/$name.log | tail -30 >> $OUT/summary.txt
}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv > $R/nvidia_smi.txt
if [ "$PART" = parts ]; then
step parts 330 env CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
  python3 benchmarks/decode_parts.py --out=$R/decode_parts.json
step calls_no_command_buffer 200 env CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
  XLA_FLAGS=--xla_gpu_enable_command_buffer= python3 benchmarks/decode_parts.py --parts=calls \
  --out=$R/decode_parts_no_command_buffer.json
elif [ "$PART" = rows ]; then
step rows 500 env CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
  python3 benchmarks/decode_parts.py --parts=kernel,swiglu --kernel_set=tails \
  --row_sets=seed_layer3,near128,balanced --out=$R/decode_parts_rows.json
elif [ "$PART" = warps ]; then
step rows 420 env CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
  python3 benchmarks/decode_parts.py --parts=kernel,swiglu --kernel_set=warps \
  --swiglu_set=warps --row_sets=seed_layer3,near128,balanced --out=$R/decode_parts_warps.json
elif [ "$PART" = pairs ]; then
step pairs 420 env CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
  python3 benchmarks/decode_parts.py --parts=pairs --row_sets=near128,seed_layer3,balanced \
  --out=$R/decode_parts_pairs.json
elif [ "$PART" = router ]; then
step router 560 env CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
  python3 benchmarks/decode_parts.py --parts=router_step \
  --router_steps=${3:-default,balanced,default,balanced} \
  --router_configs=${4:-seed,seed_swiglu} --out=$R/decode_parts_router.json
elif [ "$PART" = ncu ]; then
for rows in balanced near128 seed_layer3; do
  step ncu_$rows 180 env CUDA_VISIBLE_DEVICES=0 ncu --clock-control none -k regex:grouped_matmul \
    --launch-skip 2 --launch-count 2 --section SpeedOfLight --section WarpStateStats \
    --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section Occupancy \
    --section LaunchStats python3 benchmarks/ncu_kernel.py $rows
done
elif [ "$PART" = power ]; then
step ncu_swiglu_near128 200 env CUDA_VISIBLE_DEVICES=0 ncu --clock-control none \
  -k regex:grouped_matmul --launch-skip 2 --launch-count 2 --section SpeedOfLight \
  --section WarpStateStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
  --section LaunchStats python3 benchmarks/ncu_kernel.py near128 swiglu
nvidia-smi dmon -s pucm -d 1 > $R/dmon_seed.txt 2>&1 &
DMON=$!
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,power.limit,temperature.gpu,utilization.gpu,clocks_event_reasons.active,clocks_event_reasons.sw_power_cap,clocks_event_reasons.hw_slowdown,clocks_event_reasons.sw_thermal_slowdown \
  --format=csv -lms 500 > $R/clocks_seed.csv 2>&1 &
DMON="$DMON $!"
step seed_1gpu 150 env CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
  python3 -m jax_ep bench --config=seed --kinds=single --out_dir=$R/seed_1gpu
kill $DMON
nvidia-smi -q -d POWER,CLOCK,PERFORMANCE > $R/nvidia_smi_q.txt 2>&1
elif [ "$PART" = xla ]; then
for i in 1 2; do
  for v in default changed; do
    flags=""; [ $v = changed ] && flags=$3
    step seed_${v}_$i 150 env CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
      XLA_FLAGS="$flags" python3 -m jax_ep bench --config=seed --kinds=single \
      --share=seed_proposed/1 --out_dir=$R/seed_${v}_$i
  done
done
elif [ "$PART" = profile ]; then
step profile_1gpu 200 env CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
  python3 benchmarks/profile_decode.py --config=seed --deployment=single --batch=1024 \
  --steps=12 --out=$R/profile_single.json
cp $R/profile_single_hlo.txt.gz $OUT/ 2>/dev/null
elif [ "$PART" = profile_router ]; then
for router in balanced model; do
  step profile_${router}_router 200 env CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
    python3 benchmarks/profile_decode.py --config=seed --deployment=single --batch=1024 \
    --steps=12 --router=$router --out=$R/profile_${router}_router.json
done
elif [ "$PART" = share ]; then
for i in 1 2; do
  step seed_share_$i 160 env CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
    python3 -m jax_ep bench --config=seed --kinds=single --share=seed_proposed/1 \
    --out_dir=$R/seed_share_$i
done
step profile_share 100 env CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
  python3 benchmarks/profile_decode.py --config=seed --share=seed_proposed/1 --batch=1024 \
  --steps=40 --out=$R/profile_share.json
step profile_1gpu 150 env CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
  python3 benchmarks/profile_decode.py --config=seed --deployment=single --batch=1024 \
  --steps=12 --out=$R/profile_single.json
elif [ "$PART" = calls ]; then
for i in 1 2; do
  for tpc in 1 4; do
    step share_tpc${tpc}_$i 100 env CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
      python3 -m jax_ep bench --config=seed --kinds=single --share=seed_proposed/1 \
      --tokens_per_call=$tpc --out_dir=$R/share_tpc${tpc}_$i
  done
done
step swiglu_1gpu 180 env CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
  python3 -m jax_ep bench --config=seed_swiglu --kinds=single --prompt_len=128 \
  --out_dir=$R/swiglu_1gpu
elif [ "$PART" = attention ]; then
step attention_long 150 env CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
  python3 benchmarks/decode_parts.py --parts=attention --attention_cache=1024 \
  --attention_lens=520,1000 --out=$R/decode_parts_attention_long.json
step attention 400 env CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
  python3 benchmarks/decode_parts.py --parts=attention,attention_step \
  --attention_steps=old_default,default,old_default,default --attention_configs=seed,share \
  --out=$R/decode_parts_attention.json
elif [ "$PART" = attention_swiglu ]; then
step attention_swiglu 540 env CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
  python3 benchmarks/decode_parts.py --parts=attention_step \
  --attention_steps=old_default,default,old_default,default --attention_configs=seed_swiglu \
  --out=$R/decode_parts_attention_swiglu.json
elif [ "$PART" = kernel ]; then
step kernel 110 env CUDA_VISIBLE_DEVICES=0 python3 benchmarks/kernel_sweep.py --out=$R/kernel_sweep.json
elif [ "$PART" = 1 ]; then
step profile_1gpu 150 env CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
  python3 benchmarks/profile_decode.py --config=seed --deployment=single --batch=1024 \
  --steps=12 --out=$R/profile_single.json
step seed_1gpu 220 env CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
  python3 -m jax_ep bench --kinds=single --share=seed_proposed/1 --out_dir=$R/seed_1gpu
step swiglu_1gpu 220 env CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
  python3 -m jax_ep bench --config=seed_swiglu --kinds=single --prompt_len=128 \
  --out_dir=$R/swiglu_1gpu
elif [ "$PART" = checks ]; then
G="env CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python3 -m jax_ep"
step gen_dry 120 $G generate --config=seed --deployment=single --batch=1024 --prompt_len=32 \
  --dry_run
step gen_refused 120 $G generate --config=seed --deployment=single --batch=65536 --prompt_len=32
step gen_seed 300 $G generate --config=seed --deployment=single --batch=1024 --prompt_len=32 \
  --max_new_tokens=8 --output=$R/seed_tokens.json --profile_dir=$R/seed_profile
# What the trace holds: the decode program's kernels, no compile and no prefill.
step gen_seed_trace 60 python3 -c '
import collections, glob, gzip, json, sys
f, = glob.glob(sys.argv[1] + "/**/*.trace.json.gz", recursive=True)
ev = [e for e in json.load(gzip.open(f))["traceEvents"] if e.get("ph") == "X"]
mods = collections.Counter(e.get("args", {}).get("hlo_module", "-") for e in ev)
print("trace", f, "events", len(ev), "by hlo_module", dict(mods.most_common(6)))
print("compile events", sum("ompile" in e.get("name", "") for e in ev))' $R/seed_profile
step gen_swiglu 300 $G generate --config=seed_swiglu --deployment=single --batch=1024 \
  --prompt_len=128 --max_new_tokens=4 --output=$R/swiglu_tokens.json
step train 200 $G train --config=tiny_task --steps=40 --workdir=$R/train_tiny
step gen_ckpt 120 $G generate --checkpoint=$R/train_tiny --deployment=single --max_new_tokens=4
elif [ "$PART" = ab ]; then
for cfg in $(echo "${4:-seed_swiglu}" | tr , ' '); do
  prompt=32; [ "$cfg" = seed_swiglu ] && prompt=128
  for i in $(seq 1 ${5:-2}); do
    for v in default changed; do
      blocks=""; [ $v = changed ] && blocks=$3
      step ${cfg}_${v}_$i 140 env CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
        python3 -m jax_ep bench --config=$cfg --kinds=single --prompt_len=$prompt \
        --expert_blocks="$blocks" --out_dir=$R/${cfg}_${v}_$i
    done
  done
done
elif [ "$PART" = tree ]; then
for cfg in $(echo "${4:-seed_swiglu}" | tr , ' '); do
  prompt=32; [ "$cfg" = seed_swiglu ] && prompt=128
  for i in $(seq 1 ${5:-2}); do
    for v in this old; do
      dir=.; commit=$JAX_EP_COMMIT
      [ $v = old ] && dir=$3 && commit=$(cat "$3/COMMIT" 2>/dev/null || echo unknown)
      step ${cfg}_${v}_$i 140 env -C "$dir" PYTHONPATH=. JAX_EP_COMMIT=$commit CUDA_VISIBLE_DEVICES=0 \
        XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python3 -m jax_ep bench --config=$cfg \
        --kinds=single --prompt_len=$prompt --out_dir=$R/${cfg}_${v}_$i
    done
  done
done
elif [ "$PART" = clocks ]; then
cfg=${4:-seed_swiglu}; prompt=32; [ "$cfg" = seed_swiglu ] && prompt=128; prompt=${PROMPT:-$prompt}
for v in this old; do
  dir=.; commit=$JAX_EP_COMMIT
  [ $v = old ] && dir=$3 && commit=$(cat "$3/COMMIT" 2>/dev/null || echo unknown)
  name=${cfg}_${v}; echo "== $name" | tee -a $OUT/summary.txt
  nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,utilization.gpu,clocks_event_reasons.sw_power_cap \
    --format=csv,noheader -lms 100 > $R/${name}_clocks.csv 2>&1 &
  SMI=$!
  (cd "$dir" && PYTHONPATH=. JAX_EP_COMMIT=$commit CUDA_VISIBLE_DEVICES=0 \
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 200 python3 -m jax_ep bench --config=$cfg \
    --kinds=single --prompt_len=$prompt --synced=${5:-80} --steps=${6:-60} --out_dir=$R/$name 2>&1) |
    while IFS= read -r l; do printf '%s %s\n' "$(date '+%Y/%m/%d %H:%M:%S.%3N')" "$l"; done \
    > $R/$name.log
  kill $SMI
  python3 benchmarks/clock_windows.py $R/$name.log $R/${name}_clocks.csv $((${5:-80} + 1)) \
    > $R/${name}_windows.json 2>&1
  grep -E "TPOT" $R/$name.log | tail -2 >> $OUT/summary.txt
  cat $R/${name}_windows.json >> $OUT/summary.txt
done
elif [ "$PART" = 2 ]; then
# The slices need four GPUs; on nvidia-h200-x2 only EP2 runs.
[ "$(nvidia-smi -L | wc -l)" -ge 4 ] && step slices_4gpu 250 python3 -m jax_ep bench --kinds=slice_1x4,slice_2x2,slice_2x2/1 \
  --out_dir=$R/slices_4gpu
step ep2 300 env CUDA_VISIBLE_DEVICES=0,1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
  python3 -m jax_ep bench --kinds=mesh:1x2x1,single --out_dir=$R/ep2
# Two processes of one GPU each against one process of both (tiny model, float32).
step processes_2 200 env CUDA_VISIBLE_DEVICES=0,1 bash launch/compare_processes.sh 2
fi
tar czf $OUT/results.tgz -C $OUT r
cat $OUT/summary.txt
