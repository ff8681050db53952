"""The seed's TPS/TPOT table from one run on the devices present; writes JSON, markdown, PNG.

  PYTHONPATH=. python benchmarks/seed_table.py --out_dir=/tmp/bench          # CPU: 8 fake devices
  PYTHONPATH=. python benchmarks/seed_table.py --share=proposed --out_dir=$OUT  # GPU

A thin shell over jax_ep/bench.py; see benchmarks/README.md.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jax_ep import runtime  # noqa: E402  (imports no jax)
from jax_ep.config import KINDS  # noqa: E402  (imports jax, starts no backend)

_OUT = flags.DEFINE_string("out_dir", "benchmarks/results/latest",
                           "Directory for seed_table.{json,md,png}.")
_CONFIG = flags.DEFINE_string("config", None, "Model preset; default seed on GPU, tiny on CPU.")
_KINDS = flags.DEFINE_list("kinds", list(KINDS),
                           "Deployments: single, baseline, proposed (the seed's preset, or the "
                           "scaled one for the devices present), preset names, mesh:SxExT, or "
                           "seed slices (slice_1x4, slice_2x2, slice_4x2: their own model and "
                           "batch); '/G' after any sets its decode groups in flight.")
_SHARE = flags.DEFINE_string("share", None,
                             "Also run one device's share of this deployment on one device: "
                             "'proposed' (= seed_proposed: 1 layer, 1 expert, 64 sequences) or a "
                             "tp=1 preset name.")
_BATCH = flags.DEFINE_integer("batch", 1024, "Sequences, each decoding one token per step.")
_PROMPT = flags.DEFINE_integer("prompt_len", None, "Prompt tokens; default 32 on GPU, 8 on CPU. "
                               "The KV cache length is prompt_len + warmup + steps.")
_STEPS = flags.DEFINE_integer("steps", None, "Decode steps timed back to back (one sync at the "
                              "end: TPOT is their mean); default 20 on GPU, 4 on CPU.")
_SYNCED = flags.DEFINE_integer("synced", 5, "Decode steps before those, each timed with a sync "
                               "(median and p10-p90).")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Decode steps after the ring's fill, not timed.")
_PROBE = flags.DEFINE_integer("probe_mib", None, "Bandwidth probe size in MiB (default 4096 on "
                              "GPU, 64 on CPU); the all_to_all probe moves 1/64 of it.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for weights and prompts.")
_PER_CALL = flags.DEFINE_integer("tokens_per_call", 1,
                                 "Tokens per sequence per decode call (a loop of static trip "
                                 "count on the device; the host dispatches once per call).")
_DEVICES = flags.DEFINE_integer("num_devices", 0, "Use the first N devices (0: all).")
_SIMULATE = flags.DEFINE_integer("simulate_devices", -1,
                                 "N fake CPU devices; -1: 8 when no GPU plugin is installed, "
                                 "else the real GPUs; 0: the devices as they are.")
_OVERLAP = flags.DEFINE_bool("xla_overlap", True,
                             "XLA's latency-hiding scheduler on GPU (jax_ep/runtime.py).")
_SKIP = flags.DEFINE_bool("skip_unfit", False, "Skip the kinds that cannot run on the devices "
                          "present (devices, batch, memory) instead of failing.")
_CHECK_MEMORY = flags.DEFINE_bool("check_memory", True, "Refuse kinds whose planned bytes per "
                                  "device exceed the device's memory (jax_ep/memory.py).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  runtime.simulate_devices(_SIMULATE.value)
  runtime.set_xla_flags(_OVERLAP.value)
  from jax_ep import bench

  spec = bench.BenchSpec(config=_CONFIG.value, kinds=tuple(_KINDS.value), share=_SHARE.value,
                         batch=_BATCH.value, prompt_len=_PROMPT.value, steps=_STEPS.value,
                         synced=_SYNCED.value, warmup=_WARMUP.value,
                         num_devices=_DEVICES.value or None, seed=_SEED.value,
                         probe_mib=_PROBE.value, tokens_per_call=_PER_CALL.value,
                         skip_unfit=_SKIP.value, check_memory=_CHECK_MEMORY.value)
  result = bench.run(spec, log=lambda m: print(m, flush=True))
  print()
  print(bench.markdown(result))
  for path in bench.write(result, _OUT.value):
    print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
