# ruff: noqa: B007, B023, B905, E501, E701, E702  (archived as it ran)
"""CPU checks of the probe kernel: item coverage of locate_mn, the interpreter at cluster 1,
and lowering for CUDA at cluster 2 (both pairings)."""
import collections
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, ".probe")
import grouped_mgpu as gmg


def coverage(sizes, n_tiles):
  gs = jnp.asarray(sizes, jnp.int32)
  table = np.asarray(gmg.flat_table(gs))
  g = len(sizes)
  m = sum(sizes)
  n_items = (-(-(m + (gmg.ALIGN - 1) * g) // gmg.CTA_ROWS) + g) * (n_tiles // 2)
  seen = collections.Counter()
  f = jax.jit(lambda t, i, c: gmg.locate_mn(t, i, g, n_tiles // 2, c))
  for item in range(n_items):
    outs = [f(jnp.asarray(table), jnp.int32(item), jnp.int32(c)) for c in (0, 1)]
    for c, (live, grp, col, row0, start, end, mm) in enumerate(outs):
      if bool(live):
        seen[(int(grp), int(row0), int(col))] += 1
    if bool(outs[0][0]):
      assert int(outs[0][1]) == int(outs[1][1]) and bool(outs[0][6]) == bool(outs[1][6])
      if bool(outs[0][6]):
        assert int(outs[0][2]) == int(outs[1][2]), "M pair shares its column"
      else:
        assert int(outs[0][3]) == int(outs[1][3]), "N pair shares its row tile"
  want = collections.Counter()
  starts = np.cumsum(sizes) - np.asarray(sizes)
  for grp, (s, n) in enumerate(zip(starts, sizes)):
    if n == 0: continue
    base = (s // 8) * 8
    t = -(-(s + n - base) // 128)
    for r in range(t):
      for c in range(n_tiles):
        want[(grp, base + 128 * r, c)] += 1
  assert seen == want, (len(seen), len(want), set(want) - set(seen), set(seen) - set(want))
  print("coverage ok", sizes[:4], n_tiles, len(want))

coverage([265, 231, 204, 178, 161, 147, 139, 128, 117, 106, 98, 85, 72, 51, 36, 30], 4)
coverage([0, 300, 0, 5, 130, 0], 6)
coverage([1000], 2)

# interpreter, cluster 1 (skip on and off), small shapes
for skip in (True, False):
  sizes = [70, 0, 130, 9]
  m, k, n = sum(sizes), 128, 128
  x = jax.random.normal(jax.random.key(0), (gmg.pad_rows(m), k), jnp.float16)
  w = jax.random.normal(jax.random.key(1), (4, k, n), jnp.float16) / 10
  gs = jnp.asarray(sizes, jnp.int32)
  b = gmg.fit(k, n, gmg.MgpuBlocks(skip=skip, delay=0))
  out = gmg.grouped_matmul_mgpu(x, m, w, gs, blocks=b, interpret=True, sms=4)
  ref = jax.lax.ragged_dot(x[:m], w, gs, preferred_element_type=jnp.float32)
  print("interpret skip", skip, float(jnp.abs(out[:m] - ref).max()))

# lowering for CUDA, seed shapes, cluster 2
for pairing in ("n", "mn"):
  for k, n in ((8192, 32768), (32768, 8192)):
    m = 2048
    b = gmg.MgpuBlocks(cluster=2, delay=0, pairing=pairing)
    f = jax.jit(lambda x, w, gs: gmg.grouped_matmul_mgpu(x, m, w, gs, blocks=b, sms=132))
    args = (jax.ShapeDtypeStruct((gmg.pad_rows(m), k), jnp.float16),
            jax.ShapeDtypeStruct((16, k, n), jnp.float16),
            jax.ShapeDtypeStruct((16,), jnp.int32))
    f.trace(*args).lower(lowering_platforms=("cuda",))
    print("lowered", pairing, k, n)
