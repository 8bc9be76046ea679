"""Diagonal rescaling of a network's activations: the same network, another LipLT bound.

For a positive diagonal ``D_k = diag(d_k)`` (``d_k`` of block k's ``phi_shape``),

    G_k phi_k(W_k x) = (G_k D_k^{-1}) psi_k(D_k W_k x),   psi_k,i(u) = d_i phi_k,i(u / d_i),

and ``psi_k`` has the same slope bounds ``[alpha_k, beta_k]`` as ``phi_k`` (for ReLU and
leaky ReLU, positively homogeneous, ``psi_k = phi_k``: the rescaled network computes the
same function). ``Hhat_k = H_k + c_k G_k W_k`` is unchanged. LipLT (paper Theorem 3.3,
eq. 19) bounds every network of the eq. 17 form with slopes in ``[alpha_k, beta_k]``, so
the LipLT bound of the network with ``W_k <- D_k W_k``, ``G_k <- G_k D_k^{-1}`` is a valid
bound of the ORIGINAL network for EVERY ``D_k > 0``; ``D`` changes tightness, not soundness.
With one layer and ``D = T^{1/2}``, ``G^T G <= T`` (``||G T^{-1/2}|| <= 1``) it is at most
the Theorem 3.2 bound (``crmjax.refinement``).

``aol_scales`` is the heuristic ``D_k = T_k^{1/2}`` with ``T_k`` the AOL diagonal of the
operator that reads ``phi_k``; ``crmjax.refinement.optimize_scales`` minimises the bound
over ``D``. This module depends only on ``network`` and ``operators``, so that both
``crmjax.liplt`` (the ``'liplt_aol'`` training bound) and ``crmjax.soundness`` can use it.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from crmjax import network
from crmjax import operators as ops
from crmjax.network import LipNet

_TINY = 1e-30

Scales = Sequence[jax.Array | None]


def rescale(net: LipNet, scales: Scales) -> LipNet:
  """``W_k <- D_k W_k``, ``G_k <- G_k D_k^{-1}`` per block (``D_k = diag(scales[k])``).

  Args:
    net: the network (eq. 17 form).
    scales: one entry per block: a positive array of block k's ``phi_shape`` (or anything
      broadcasting to it), or ``None`` (block unchanged).

  Returns:
    A ``LipNet`` with the same shapes (so the same ``liplt.PowerState``) whose LipLT bound
    is a valid bound of ``net`` (module docstring).
  """
  blocks = []
  for b, d in zip(net.blocks, scales):
    if d is None:
      blocks.append(b)
      continue
    shape = b.phi_shape
    W = ops.chain([b.W, ops.Scale(d, shape)], b.W.in_shape)
    inv = ops.Scale(1.0 / d, shape)
    G = inv if b.G is None else ops.chain([inv, b.G], shape)
    blocks.append(network.Block(W, G, b.H, alpha=b.alpha, beta=b.beta))
  return LipNet(tuple(blocks), net.readout)


def aol_diag(op, q: jax.Array | None = None) -> jax.Array:
  """``(|A|^T |A| q) / q`` of shape ``op.in_shape``: ``A^T A <= diag(.)`` (Gershgorin).

  It upper-bounds the AOL diagonal ``sum_j |A^T A|_ij q_j / q_i`` (``q > 0``, default
  ones) without materialising ``A``: two applications of ``|A|``.
  """
  a = op.abs()
  qv = jnp.ones(op.in_shape, jnp.float32) if q is None else q
  return ops.Adjoint(a)(a(qv)) / qv


def reader(net: LipNet, k: int):
  """The operator that reads ``phi_k``: ``G_k``, else the next block's ``W`` or the readout."""
  b = net.blocks[k]
  if b.G is not None:
    return b.G
  return net.blocks[k + 1].W if k + 1 < len(net.blocks) else net.readout


def aol_scales(net: LipNet) -> list[jax.Array | None]:
  """``D_k = T_k^{1/2}``, ``T_k = aol_diag(reader(net, k))`` (``None`` for isometric readers).

  A heuristic for tightness (any positive ``D`` is sound); gradients are stopped (the
  scales are a choice, not a function to differentiate). Shapes: block k's ``phi_shape``.
  """
  out = []
  for k in range(len(net.blocks)):
    op = reader(net, k)
    if ops.is_isometry(op):
      out.append(None)
      continue
    t = jax.lax.stop_gradient(aol_diag(op))
    out.append(jnp.sqrt(jnp.maximum(t, _TINY)))
  return out
