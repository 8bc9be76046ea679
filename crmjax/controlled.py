"""Layers with a controllable Lipschitz bound (paper Proposition 3.1).

For an activation ``phi`` slope-restricted in ``[alpha, beta]`` with ``0 <= alpha <= beta``
(ReLU: ``alpha = 0, beta = 1``), the residual layer

    h(x) = sqrt(rho) x - (alpha + beta) / sqrt(rho) W^T T phi(W x + b)

is ``sqrt(rho)``-Lipschitz in l2 whenever ``T`` is diagonal, nonnegative and

    W W^T <= 2 rho / (alpha + beta)^2 T^{-1}.                          (the LMI)

Proof sketch (incremental quadratic constraint): with ``dv = W dx``, ``dphi`` the change of
``phi``, ``||dh||^2 = rho ||dx||^2 - 2 (alpha + beta) dv^T T dphi + (alpha + beta)^2 / rho
dphi^T T W W^T T dphi <= rho ||dx||^2 + 2 sum_i T_i (dphi_i^2 - (alpha + beta) dv_i dphi_i)``
by the LMI, and the slope restriction gives ``dphi_i^2 - (alpha + beta) dv_i dphi_i <=
-alpha beta dv_i^2 <= 0``. (For ``alpha < 0`` the last step fails: not supported.)

``T`` is chosen in closed form so that the LMI holds by diagonal dominance (Gershgorin):

* ``'aol'`` (Prashenko et al., AOL): ``T_ii = 2 rho / (alpha + beta)^2 / sum_j |W W^T|_ij``;
* ``'sll'`` (Araujo et al., SLL): ``T_ii = 2 rho / (alpha + beta)^2 / (sum_j |W W^T|_ij q_j /
  q_i)`` with ``q = exp(log_q)`` learnable (``q = 1`` is AOL).

For convolutions the row sums of ``|W W^T|`` are replaced by the upper bound
``(|W| |W|^T q)_i / q_i`` (``|W|`` = the convolution with ``|kernel|``), which keeps the LMI
valid; ``W^T`` is the exact adjoint (``operators.Adjoint``) of the convolution.

With ``rho = 1`` and ReLU this is the SLL layer ``x - 2 W^T diag(...)^{-1} relu(W x + b)``.

In a network: the layer spec ``Controlled`` runs these modules inside
``crmjax.layers.Sequential`` and is one block of the LipLT form (paper eq. 17) for
``crmjax.network.from_layers``: ``H = sqrt(rho) I``, ``W``, ``G = -(alpha + beta) / sqrt(rho)
W^T diag(T)`` (``W^T`` = ``crmjax.operators.Adjoint(W)``), so a stack of them trains with
CRM and the LipLT bound like any registered model (``crmjax.models``, ``'CtrlConv'``).

Layout: Flax's. Dense: ``kernel (n, m)``, ``W x = x @ kernel``, input and output ``(*batch,
n)``. Conv: ``kernel (k, k, C, m)`` (HWIO), input and output ``(*batch, H, W, C)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from crmjax import layers as L
from crmjax import operators as ops

Rescaling = Literal["aol", "sll"]
RESCALINGS = ("aol", "sll")
Kind = Literal["dense", "conv"]
KINDS = ("dense", "conv")
_TINY = 1e-12


def _slopes(act: L.Act) -> tuple[float, float]:
  alpha, beta = act.slope_bounds
  if alpha < 0 or alpha + beta <= 0:
    raise ValueError(
      "Proposition 3.1 layers need slopes 0 <= alpha <= beta with "
      f"alpha + beta > 0, got {(alpha, beta)}"
    )
  return alpha, beta


def _scale(rho: float, alpha: float, beta: float) -> float:
  """``2 rho / (alpha + beta)^2``: the right-hand side constant of the LMI."""
  if rho <= 0:
    raise ValueError(f"rho must be positive, got {rho}")
  return 2.0 * rho / (alpha + beta) ** 2


def dense_scaling(
  kernel: jax.Array,
  *,
  rho: float = 1.0,
  alpha: float = 0.0,
  beta: float = 1.0,
  q: jax.Array | None = None,
) -> jax.Array:
  """The diagonal ``T`` of Proposition 3.1 for a dense ``W = kernel^T``.

  Args:
    kernel: ``(n, m)`` (Flax layout, ``W x = x @ kernel``).
    rho: the layer is ``sqrt(rho)``-Lipschitz.
    alpha, beta: slope bounds of the activation, ``0 <= alpha <= beta``.
    q: ``(m,)`` positive SLL weights; ``None`` is AOL (``q = 1``).

  Returns:
    ``(m,)`` the diagonal of ``T``; ``W W^T <= 2 rho / (alpha + beta)^2 T^{-1}``.
  """
  gram = jnp.abs(jnp.matmul(kernel.T, kernel, precision=jax.lax.Precision.HIGHEST))
  if q is None:
    sums = jnp.sum(gram, axis=1)
  else:
    sums = jnp.matmul(gram, q, precision=jax.lax.Precision.HIGHEST) / q
  return _scale(rho, alpha, beta) / jnp.maximum(sums, _TINY)


def conv_operator(
  kernel: jax.Array, in_shape: tuple[int, int, int], *, stride: int = 1, padding: int | None = None
) -> ops.Conv:
  """The convolution ``W`` (``crmjax.operators.Conv``); ``padding=None``: ``(k - 1) // 2``."""
  k = kernel.shape[0]
  p = (k - 1) // 2 if padding is None else padding
  return ops.Conv(kernel, tuple(in_shape), (stride, stride), ((p, p), (p, p)))


def transpose(op: ops.Operator) -> ops.Adjoint:
  """``W^T`` of a linear operator, for any leading batch axes (exact adjoint)."""
  return ops.Adjoint(op)


def conv_scaling(
  kernel: jax.Array,
  in_shape: tuple[int, int, int],
  *,
  stride: int = 1,
  padding: int | None = None,
  rho: float = 1.0,
  alpha: float = 0.0,
  beta: float = 1.0,
  q: jax.Array | None = None,
) -> jax.Array:
  """The diagonal ``T`` of Proposition 3.1 for a convolution ``W``.

  Uses ``(|W| |W|^T q)_i / q_i >= sum_j |W W^T|_ij q_j / q_i`` (elementwise
  ``|W W^T| <= |W| |W|^T``), so the LMI holds for the returned ``T``.

  Args:
    kernel: ``(k, k, C, m)`` HWIO.
    in_shape: ``(H, W, C)``.
    stride, padding: of the convolution (symmetric zero padding; ``None`` = ``(k-1)//2``).
    rho, alpha, beta: as in ``dense_scaling``.
    q: positive SLL weights broadcasting to the output ``(H', W', m)`` (e.g. ``(m,)``);
      ``None`` is AOL.

  Returns:
    ``T`` of the output shape ``(H', W', m)``.
  """
  op = conv_operator(kernel, in_shape, stride=stride, padding=padding)
  aop = op.abs()
  qv = (
    jnp.ones(op.out_shape, kernel.dtype)
    if q is None
    else jnp.broadcast_to(q, op.out_shape).astype(kernel.dtype)
  )
  sums = aop(transpose(aop)(qv[None]))[0] / qv
  return _scale(rho, alpha, beta) / jnp.maximum(sums, _TINY)


def _check_rescaling(rescaling: str) -> None:
  if rescaling not in RESCALINGS:
    raise ValueError(f"rescaling must be one of {RESCALINGS}, got {rescaling!r}")


def _log_q(module: nn.Module, rescaling: str, features: int):
  _check_rescaling(rescaling)
  if rescaling == "aol":
    return None
  return jnp.exp(module.param("log_q", nn.initializers.zeros, (features,), jnp.float32))


class ControlledDense(nn.Module):
  """``h(x) = sqrt(rho) x - (alpha+beta)/sqrt(rho) W^T T phi(W x + b)``, ``sqrt(rho)``-Lipschitz.

  Attributes:
    features: ``m``, the width of ``W x`` (the output has the input's width ``n``).
    rho: the layer's Lipschitz constant is ``sqrt(rho)`` (l2).
    act: the activation (``crmjax.layers.Act``), slopes ``0 <= alpha <= beta``.
    rescaling: ``'aol'`` or ``'sll'`` (learnable ``q = exp(log_q)``, param ``log_q (m,)``).
    use_bias: a bias ``b`` inside ``phi`` (does not change the Lipschitz constant).

  Shapes: ``(*batch, n) -> (*batch, n)``; params ``kernel (n, m)``, ``bias (m,)``.
  """

  features: int
  rho: float = 1.0
  act: L.Act = L.Act()
  rescaling: Rescaling = "aol"
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    alpha, beta = _slopes(self.act)
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    kernel = kernel.astype(x.dtype)
    q = _log_q(self, self.rescaling, self.features)
    t = dense_scaling(kernel, rho=self.rho, alpha=alpha, beta=beta, q=q)
    v = x @ kernel
    if self.use_bias:
      v = v + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    s = math.sqrt(self.rho)
    return s * x - ((alpha + beta) / s) * ((self.act.function(v) * t) @ kernel.T)


class ControlledConv(nn.Module):
  """The convolutional ``h(x) = sqrt(rho) x - (alpha+beta)/sqrt(rho) W^T T phi(W x + b)``.

  ``W`` is a ``kernel_size`` x ``kernel_size`` convolution to ``features`` channels
  (stride ``stride``, symmetric zero ``padding``, default ``(k - 1) // 2``), ``W^T`` its
  exact adjoint, so ``h`` maps ``(*batch, H, W, C)`` to the same shape and is
  ``sqrt(rho)``-Lipschitz. ``T`` (of shape ``(H', W', features)``) is recomputed for the
  input's spatial shape (edge pixels get their own, larger, entries).

  Params: ``kernel (k, k, C, features)``, ``bias (features,)``, ``log_q (features,)``
  (``'sll'``: one learnable weight per channel).
  """

  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: int | None = None
  rho: float = 1.0
  act: L.Act = L.Act()
  rescaling: Rescaling = "aol"
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    alpha, beta = _slopes(self.act)
    in_shape = tuple(x.shape[-3:])
    k = self.kernel_size
    kernel = self.param(
      "kernel", self.kernel_init, (k, k, in_shape[-1], self.features), jnp.float32
    ).astype(x.dtype)
    q = _log_q(self, self.rescaling, self.features)
    op = conv_operator(kernel, in_shape, stride=self.stride, padding=self.padding)
    t = conv_scaling(
      kernel,
      in_shape,
      stride=self.stride,
      padding=self.padding,
      rho=self.rho,
      alpha=alpha,
      beta=beta,
      q=q,
    )
    v = op(x)
    if self.use_bias:
      v = v + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    s = math.sqrt(self.rho)
    return s * x - ((alpha + beta) / s) * transpose(op)(self.act.function(v) * t)


@dataclasses.dataclass(frozen=True)
class Controlled:
  """A Proposition 3.1 layer as a layer spec (``crmjax.layers``): one block of eq. 17.

  ``apply`` runs ``ControlledDense`` (``kind='dense'``) or ``ControlledConv``
  (``kind='conv'``) under the ``layer_i`` name of ``crmjax.layers.Sequential``; for the
  bound, ``crmjax.network.from_layers`` reads ``block_operators`` and builds the block

      x -> H x + G phi(W x),   H = sqrt(rho) I,   W = the dense / conv operator,
      G = -(alpha + beta) / sqrt(rho) W^T diag(T),

  with the same ``T`` as the Flax layer (``dense_scaling`` / ``conv_scaling`` of the params,
  no ``stop_gradient``: the bound stays differentiable in ``kernel`` and ``log_q``). The
  bias sits inside ``phi`` and does not enter the bound.

  Attributes:
    kind: ``'dense'`` (input ``(n,)``) or ``'conv'`` (input ``(H, W, C)``).
    features: ``m``, the width / channels of ``W x``; the output has the input's shape.
    kernel_size, stride, padding: of the convolution (``kind='conv'`` only; ``padding=None``
      is ``(kernel_size - 1) // 2``).
    rho: the layer is ``sqrt(rho)``-Lipschitz (l2).
    act: the activation, slopes ``0 <= alpha <= beta``.
    rescaling: ``'aol'`` or ``'sll'`` (learnable ``log_q (features,)``).
    use_bias: a bias inside ``phi``.
  """

  kind: Kind
  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: int | None = None
  rho: float = 1.0
  act: L.Act = L.Act()
  rescaling: Rescaling = "aol"
  use_bias: bool = True

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"Controlled kind must be one of {KINDS}, got {self.kind!r}")
    _check_rescaling(self.rescaling)
    _scale(self.rho, *_slopes(self.act))

  @property
  def slope_bounds(self) -> tuple[float, float]:
    return _slopes(self.act)

  def module(self, name: str | None = None) -> nn.Module:
    """The Flax layer (``ControlledDense`` or ``ControlledConv``)."""
    common = dict(
      rho=self.rho, act=self.act, rescaling=self.rescaling, use_bias=self.use_bias, name=name
    )
    if self.kind == "dense":
      return ControlledDense(self.features, **common)
    return ControlledConv(
      self.features,
      kernel_size=self.kernel_size,
      stride=self.stride,
      padding=self.padding,
      **common,
    )

  def apply(self, x, name):
    return self.module(name)(x)

  def operator(self, params, in_shape: tuple[int, ...]) -> ops.Operator:
    """``W``: ``ops.Dense`` ``(n,) -> (m,)`` or ``ops.Conv`` ``(H, W, C) -> (H', W', m)``."""
    if self.kind == "dense":
      if len(in_shape) != 1:
        raise ValueError(f"Controlled('dense') expects a flat input, got shape {in_shape}")
      return ops.Dense(params["kernel"])
    if len(in_shape) != 3:
      raise ValueError(f"Controlled('conv') expects an (H, W, C) input, got shape {in_shape}")
    return conv_operator(
      params["kernel"], tuple(in_shape), stride=self.stride, padding=self.padding
    )

  def scaling(self, params, in_shape: tuple[int, ...]) -> jax.Array:
    """``T`` of shape ``W.out_shape``, exactly as the Flax layer computes it."""
    alpha, beta = self.slope_bounds
    q = jnp.exp(params["log_q"]) if self.rescaling == "sll" else None
    if self.kind == "dense":
      return dense_scaling(params["kernel"], rho=self.rho, alpha=alpha, beta=beta, q=q)
    return conv_scaling(
      params["kernel"],
      tuple(in_shape),
      stride=self.stride,
      padding=self.padding,
      rho=self.rho,
      alpha=alpha,
      beta=beta,
      q=q,
    )

  def block_operators(
    self, params, in_shape: tuple[int, ...]
  ) -> tuple[ops.Operator, ops.Operator, float]:
    """``(W, G, sqrt(rho))`` of the block ``x -> sqrt(rho) x + G phi(W x)``.

    ``G = Adjoint(W) o Scale(-(alpha + beta) / sqrt(rho) T)``: ``W.out_shape -> in_shape``.
    """
    alpha, beta = self.slope_bounds
    W = self.operator(params, in_shape)
    s = math.sqrt(self.rho)
    d = (-(alpha + beta) / s) * self.scaling(params, in_shape)
    G = ops.Chain((ops.Scale(d, W.out_shape), ops.Adjoint(W)))
    return W, G, s
