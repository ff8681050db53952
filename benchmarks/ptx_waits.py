"""How the grouped kernel's MMAs are pipelined on the GPU, read from the PTX XLA builds.

  PYTHONPATH=. python3 benchmarks/ptx_waits.py --out=$OUT/ptx_waits.json

Compiles the seed's expert products (16 experts, 2048 rows on the seed_layer3 loads) in
a few variants: GELU up with and without tails, SwiGLU's fused up product over two
weights, and over one interleaved weight (groups.interleave_pairs). XLA dumps each
module's PTX (--xla_dump_to); for every kernel entry this counts its wgmma instructions
and its `wgmma.wait_group` waits by depth. A pipelined K loop waits with depth 1 (the
previous step's MMA, the current one still running); a loop whose MMAs are waited at
depth 0 only runs them one after another. Nothing is timed (decode_parts.py --parts=pairs
times the same variants).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import tempfile

D, F, E = 8192, 32768, 16
ROWS = [42, 139, 83, 215, 157, 67, 92, 124, 128, 159, 109, 106, 119, 301, 42, 165]


def entries(ptx: str) -> dict[str, str]:
  """Each `.entry NAME(` of a PTX file and its body, up to the next entry."""
  starts = [(m.start(), m.group(1)) for m in re.finditer(r"\.entry\s+([\w$]+)\s*\(", ptx)]
  return {name: ptx[s:(starts[i + 1][0] if i + 1 < len(starts) else len(ptx))]
          for i, (s, name) in enumerate(starts)}


def count(body: str) -> dict:
  waits = collections.Counter(re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", body))
  return {"wgmma": len(re.findall(r"wgmma\.mma_async", body)),
          "waits_by_depth": dict(sorted(waits.items())),
          "mma_sync": len(re.findall(r"\bmma\.sync", body))}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="ptx_waits.json")
  args = ap.parse_args()
  dump = tempfile.mkdtemp(prefix="ptx_waits_")
  # Before jax starts its backend: XLA reads its flags once.
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump}".strip()
  import jax
  import jax.numpy as jnp

  from jax_ep.kernels import grouped_matmul as gm

  f16 = jnp.float16
  x = jax.ShapeDtypeStruct((sum(ROWS), D), f16)
  w = jax.ShapeDtypeStruct((E, D, F), f16)
  wp = jax.ShapeDtypeStruct((E, D, 2 * F), f16)
  gs = jnp.asarray(ROWS, jnp.int32)
  variants = {
      "gelu_up_tails": (w, None, "gelu", gm.mlp_blocks(D, F)[0]),
      "gelu_up_no_tails": (w, None, "gelu", gm.mlp_blocks(D, F, spec="up.tail_m=0")[0]),
      "swiglu_up_fused": (w, w, "swiglu", gm.mlp_blocks(D, F, swiglu=True)[0]),
      "swiglu_up_fused_no_small_tiles": (
          w, w, "swiglu", gm.mlp_blocks(D, F, swiglu=True, spec="up.tail_m=0,up.last_m=0")[0]),
      "swiglu_up_pairs": (wp, None, "swiglu_pairs", gm.mlp_blocks(D, F, pairs=True)[0]),
      "swiglu_up_pairs_no_tails": (
          wp, None, "swiglu_pairs", gm.mlp_blocks(D, F, spec="up.tail_m=0", pairs=True)[0]),
  }
  out = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "kernels": {}}
  for name, (w_s, wg_s, act, blocks) in variants.items():
    before = set(glob.glob(f"{dump}/*"))
    fn = jax.jit(lambda x, w, wg, act=act, blocks=blocks: gm.grouped_matmul(
        x, w, gs, activation=act, w_gate_GxKxN=wg, impl="pallas", blocks=blocks))
    fn.lower(x, w_s, wg_s).compile()
    files = sorted(set(glob.glob(f"{dump}/*")) - before)
    found = {}
    for path in files:
      if path.endswith(".ptx"):
        for entry, body in entries(open(path).read()).items():
          if "grouped_matmul" in entry or "wgmma" in body:
            found[entry] = count(body)
    out["kernels"][name] = {"blocks": str(blocks), "entries": found,
                            "ptx_files": [os.path.basename(p) for p in files
                                          if p.endswith(".ptx")]}
    print(name, json.dumps(found), flush=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
