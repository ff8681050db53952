"""Expert MLP math on stacked weights, and the dense MoE reference used by tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_ep import routing


def expert_mlp(x_ExCxD: jax.Array, w_up_ExDxF: jax.Array, w_down_ExFxD: jax.Array,
               w_gate_ExDxF: jax.Array | None = None) -> jax.Array:
  """Each expert's MLP on its own tokens, as one batched einsum per matrix.

  The reference the tests compare the grouped kernel and the MoE against (serving runs
  kernels/grouped_matmul.py). With F sharded over tp this returns a partial sum.
  """
  h_ExCxF = jnp.einsum("ecd,edf->ecf", x_ExCxD, w_up_ExDxF)
  if w_gate_ExDxF is None:
    h_ExCxF = jax.nn.gelu(h_ExCxF)
  else:
    g_ExCxF = jnp.einsum("ecd,edf->ecf", x_ExCxD, w_gate_ExDxF)
    h_ExCxF = jax.nn.silu(g_ExCxF) * h_ExCxF
  return jnp.einsum("ecf,efd->ecd", h_ExCxF, w_down_ExFxD)


def dense_moe_reference(x_TxD, w_router_DxE, w_up_ExDxF, w_down_ExFxD, top_k,
                        w_gate_ExDxF=None) -> jax.Array:
  """Every expert on every token, weighted by the top-k gate (zero for unpicked experts).

  Independent of dispatch, capacity and collectives: the ground truth for all of them.
  """
  num_experts = w_router_DxE.shape[1]
  logits_TxE = x_TxD.astype(jnp.float32) @ w_router_DxE.astype(jnp.float32)
  weights_TxK, experts_TxK = routing.top_k_gate(logits_TxE, top_k)
  gate_TxE = routing.dense_gate(weights_TxK, experts_TxK, num_experts)
  x_ExTxD = jnp.broadcast_to(x_TxD[None], (num_experts, *x_TxD.shape))
  y_ExTxD = expert_mlp(x_ExTxD, w_up_ExDxF, w_down_ExFxD, w_gate_ExDxF)
  y_TxD = jnp.einsum("te,etd->td", gate_TxE, y_ExTxD.astype(jnp.float32))
  return y_TxD.astype(x_TxD.dtype)
