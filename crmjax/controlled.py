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
valid; ``W^T`` is the exact adjoint (``jax.linear_transpose``) of the convolution.

With ``rho = 1`` and ReLU this is the SLL layer ``x - 2 W^T diag(...)^{-1} relu(W x + b)``.
Layout: Flax's. Dense: ``kernel (n, m)``, ``W x = x @ kernel``, input and output ``(*batch,
n)``. Conv: ``kernel (k, k, C, m)`` (HWIO), input and output ``(*batch, H, W, C)``.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from crmjax import layers as L
from crmjax import operators as ops

Rescaling = Literal["aol", "sll"]
RESCALINGS = ("aol", "sll")
_TINY = 1e-12


def _slopes(act: L.Act) -> tuple[float, float]:
  alpha, beta = act.slope_bounds
  if alpha < 0 or alpha + beta <= 0:
    raise ValueError("Proposition 3.1 layers need slopes 0 <= alpha <= beta with "
                     f"alpha + beta > 0, got {(alpha, beta)}")
  return alpha, beta


def _scale(rho: float, alpha: float, beta: float) -> float:
  """``2 rho / (alpha + beta)^2``: the right-hand side constant of the LMI."""
  if rho <= 0:
    raise ValueError(f"rho must be positive, got {rho}")
  return 2.0 * rho / (alpha + beta) ** 2


def dense_scaling(kernel: jax.Array, *, rho: float = 1.0, alpha: float = 0.0,
                  beta: float = 1.0, q: jax.Array | None = None) -> jax.Array:
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


def conv_operator(kernel: jax.Array, in_shape: tuple[int, int, int], *, stride: int = 1,
                  padding: int | None = None) -> ops.Conv:
  """The convolution ``W`` (``crmjax.operators.Conv``); ``padding=None``: ``(k - 1) // 2``."""
  k = kernel.shape[0]
  p = (k - 1) // 2 if padding is None else padding
  return ops.Conv(kernel, tuple(in_shape), (stride, stride), ((p, p), (p, p)))


def transpose(op: ops.Operator) -> Callable[[jax.Array], jax.Array]:
  """``W^T`` of a linear operator, for any leading batch axes (exact adjoint)."""
  def apply(y):
    batch = y.shape[: y.ndim - len(op.out_shape)]
    fn = jax.linear_transpose(op, jax.ShapeDtypeStruct((*batch, *op.in_shape), y.dtype))
    (x,) = fn(y)
    return x
  return apply


def conv_scaling(kernel: jax.Array, in_shape: tuple[int, int, int], *, stride: int = 1,
                 padding: int | None = None, rho: float = 1.0, alpha: float = 0.0,
                 beta: float = 1.0, q: jax.Array | None = None) -> jax.Array:
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
  qv = jnp.ones(op.out_shape, kernel.dtype) if q is None else jnp.broadcast_to(
      q, op.out_shape).astype(kernel.dtype)
  sums = aop(transpose(aop)(qv[None]))[0] / qv
  return _scale(rho, alpha, beta) / jnp.maximum(sums, _TINY)


def _log_q(module: nn.Module, rescaling: str, features: int):
  if rescaling not in RESCALINGS:
    raise ValueError(f"rescaling must be one of {RESCALINGS}, got {rescaling!r}")
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
    kernel = self.param("kernel", self.kernel_init, (k, k, in_shape[-1], self.features),
                        jnp.float32).astype(x.dtype)
    q = _log_q(self, self.rescaling, self.features)
    op = conv_operator(kernel, in_shape, stride=self.stride, padding=self.padding)
    t = conv_scaling(kernel, in_shape, stride=self.stride, padding=self.padding, rho=self.rho,
                     alpha=alpha, beta=beta, q=q)
    v = op(x)
    if self.use_bias:
      v = v + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    s = math.sqrt(self.rho)
    return s * x - ((alpha + beta) / s) * transpose(op)(self.act.function(v) * t)
