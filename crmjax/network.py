"""A network in the loop-transformed form of LipLT (paper eq. 17), built from layer specs.

    x_{k+1} = H_k x_k + G_k phi_k(W_k x_k),   k = 0 .. L-1,      z = R x_L

with ``phi_k`` slope-restricted in ``[alpha_k, beta_k]`` and ``R`` the final linear
layers (the readout, with K output logits). ``H_k = None`` means ``H_k = 0`` (a plain
feed-forward layer) and ``G_k = None`` means ``G_k = I``. ``LipNet`` is a pytree: build it
from the params inside a loss and gradients flow into every operator.

Blocks come from ``Act`` (``H = 0``, ``G = I``), ``Residual`` (``H = I``) and the
Proposition 3.1 layers ``crmjax.controlled.Controlled`` (``H = sqrt(rho) I``,
``G = -(alpha + beta) / sqrt(rho) W^T diag(T)``); linear layers before a block are folded
into its ``W`` and ``H``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from crmjax import controlled as C
from crmjax import layers as L
from crmjax import operators as ops

Shape = tuple[int, ...]


@struct.dataclass
class Block:
  """One layer ``x -> H x + G phi(W x)`` with ``alpha <= phi' <= beta``."""

  W: ops.Operator
  G: ops.Operator | None = None
  H: ops.Operator | None = None
  alpha: float = struct.field(pytree_node=False, default=0.0)
  beta: float = struct.field(pytree_node=False, default=1.0)

  @property
  def center(self) -> float:
    """(alpha + beta) / 2: the loop-transformation slope of Hhat = H + center G W."""
    return 0.5 * (self.alpha + self.beta)

  @property
  def radius(self) -> float:
    """(beta - alpha) / 2: the slope spread that multiplies m_j in eq. 19."""
    return 0.5 * (self.beta - self.alpha)

  @property
  def phi_shape(self) -> Shape:
    return self.W.out_shape

  def g(self, v):
    return v if self.G is None else self.G(v)

  def hhat(self, x, wx=None):
    """Hhat x = H x + center * G (W x); ``wx`` reuses an already computed ``W x``."""
    wx = self.W(x) if wx is None else wx
    y = self.center * self.g(wx)
    return y if self.H is None else y + self.H(x)

  def abs(self) -> Block:
    """Elementwise-absolute operators, for l_inf upper bounds (|Hhat| <= |H| + |c||G||W|).

    The result has centre ``|c|`` (so its ``hhat`` applies ``|H| + |c| |G| |W|``) and the
    same radius ``r``: ``alpha' = |c| - r``, ``beta' = |c| + r``.
    """
    c, r = abs(self.center), self.radius
    return Block(
      self.W.abs(),
      None if self.G is None else self.G.abs(),
      None if self.H is None else self.H.abs(),
      alpha=c - r,
      beta=c + r,
    )


@struct.dataclass
class LipNet:
  """The blocks and readout of eq. 17. ``input_shape`` excludes the batch axis."""

  blocks: tuple[Block, ...]
  readout: ops.Operator

  @property
  def input_shape(self) -> Shape:
    return self.blocks[0].W.in_shape if self.blocks else self.readout.in_shape

  @property
  def num_classes(self) -> int:
    return self.readout.out_shape[0]

  def __call__(self, x: jax.Array) -> jax.Array:
    """The bias-free network with phi(u) = beta u (u >= 0), alpha u (u < 0).

    That phi is exactly ReLU / leaky ReLU; blocks store only slope bounds, so for other
    activations this is a stand-in with the same slopes (used by tests as a reference).
    Shapes: ``(*batch, *input_shape) -> (*batch, K)``.
    """
    for b in self.blocks:
      wx = b.W(x)
      phi = jax.numpy.where(wx >= 0, b.beta * wx, b.alpha * wx)
      x = b.g(phi) if b.H is None else b.H(x) + b.g(phi)
    return self.readout(x)

  def abs(self) -> LipNet:
    return LipNet(tuple(b.abs() for b in self.blocks), self.readout.abs())


def _layer_params(params: Any, i: int):
  return params.get(f"layer_{i}", {}) if hasattr(params, "get") else {}


def from_layers(layers: Sequence[Any], params: Any, input_shape: Shape) -> LipNet:
  """Builds the eq. 17 form of ``crmjax.layers.Sequential(layers)`` with ``params``.

  Args:
    layers: the layer specs (``crmjax.layers``) of the model, in order.
    params: the model's params (the ``'params'`` collection), ``{'layer_i': {...}}``.
    input_shape: one example's shape, e.g. ``(28, 28, 1)``.

  Returns:
    A ``LipNet`` whose operators hold (views of) ``params``: differentiable in them.
  """
  blocks: list[Block] = []
  pending: list[ops.Operator] = []
  shape = tuple(input_shape)

  def linear(layer, p, shape):
    op = layer.operator(p, shape)
    return op, op.out_shape

  for i, layer in enumerate(layers):
    p = _layer_params(params, i)
    if isinstance(layer, L.LINEAR):
      op, shape = linear(layer, p, shape)
      pending.append(op)
    elif isinstance(layer, L.Act):
      a, b = layer.slope_bounds
      blocks.append(Block(ops.chain(pending, shape), alpha=a, beta=b))
      pending = []
    elif isinstance(layer, L.Residual):
      k = next(j for j, l in enumerate(layer.layers) if isinstance(l, L.Act))
      x_shape = shape
      pre, s = [], x_shape
      for j, l in enumerate(layer.layers[:k]):
        op, s = linear(l, _layer_params(p, j), s)
        pre.append(op)
      post, t = [], s
      for j, l in enumerate(layer.layers[k + 1 :], start=k + 1):
        if not isinstance(l, L.LINEAR):
          raise ValueError(f"Residual layer {i}: only linear layers may follow its Act")
        op, t = linear(l, _layer_params(p, j), t)
        post.append(op)
      if tuple(t) != tuple(x_shape):
        raise ValueError(f"Residual layer {i} maps {x_shape} to {t}: shapes must match")
      a, b = layer.layers[k].slope_bounds
      H = ops.chain(pending, shape) if pending else ops.Identity(tuple(shape))
      blocks.append(
        Block(ops.chain(pending + pre, shape), G=ops.chain(post, s), H=H, alpha=a, beta=b)
      )
      pending, shape = [], tuple(x_shape)
    elif isinstance(layer, C.Controlled):
      # Proposition 3.1: y -> sqrt(rho) y + G phi(W y) on y = P x (P: the pending linear
      # layers), i.e. H = sqrt(rho) P, W P, and G = -(alpha+beta)/sqrt(rho) W^T diag(T).
      W, G, s = layer.block_operators(p, shape)
      scale = [] if s == 1.0 else [ops.Scale(jnp.asarray(s), tuple(shape))]
      a, b = layer.slope_bounds
      blocks.append(
        Block(
          ops.chain(pending + [W], shape), G=G, H=ops.chain(pending + scale, shape), alpha=a, beta=b
        )
      )
      pending = []
    else:
      raise ValueError(f"layer {i}: unknown layer spec {layer!r}")
  if not pending:
    raise ValueError("the network must end with a linear layer (the logits)")
  readout = ops.chain(pending, shape)
  if len(readout.out_shape) != 1:
    raise ValueError(f"the logits must be a flat vector, got shape {readout.out_shape}")
  return LipNet(tuple(blocks), readout)
