"""Linear operators as pytrees: the W_k, H_k, G_k of the LipLT network form (paper eq. 17).

Every operator maps arrays of shape ``(*batch, *in_shape)`` to ``(*batch, *out_shape)``
for any number of leading batch axes, so that many vectors (start points of the LipLT
table, class-pair rows, power-iteration vectors) go through one call. Operators are
``flax.struct`` dataclasses: their arrays are pytree leaves (gradients flow into them) and
their shapes, strides and paddings are static metadata.

Biases are not operators: an affine map and its linear part have the same Lipschitz
constant, so only the linear part is represented.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Shape = tuple[int, ...]


class Operator(Protocol):
  """A linear map between arrays of static shapes."""

  @property
  def in_shape(self) -> Shape: ...

  @property
  def out_shape(self) -> Shape: ...

  def __call__(self, x: jax.Array) -> jax.Array: ...

  def abs(self) -> Operator:
    """The operator whose matrix is the elementwise absolute value of this one's."""
    ...


def _batched(fn, x: jax.Array, in_shape: Shape, out_ndim: int) -> jax.Array:
  """Applies ``fn`` (one leading batch axis) to ``x`` of shape ``(*batch, *in_shape)``."""
  batch = x.shape[: x.ndim - len(in_shape)]
  if tuple(x.shape[len(batch) :]) != tuple(in_shape):
    raise ValueError(f"operator expects trailing shape {in_shape}, got {x.shape}")
  y = fn(x.reshape((-1, *in_shape)))
  return y.reshape((*batch, *y.shape[y.ndim - out_ndim :]))


# ------------------------------------------------- convolutions with fast transposes
#
# The bound differentiates through transposed convolutions (the exact class rows are a
# vjp of the network's linear part). JAX's own rule for the kernel gradient of a transposed
# strided convolution is a convolution with a dilated input, which XLA:CPU runs 15-70x slower
# than the kernel gradient of the forward convolution (4C3F's 4x4 stride-2 layers at 10
# vectors: 57 ms against 0.8 ms). Both are the same bilinear form: for y = conv(x, k),
# <conv^T(g, k), h> = <g, conv(h, k)>, so the kernel gradient of the transpose at cotangent h
# is the forward convolution's kernel gradient at input h and cotangent g. ``conv2d`` and its
# transpose carry custom VJPs that say so; values are those of ``lax.conv_general_dilated``.

_DN = ("NHWC", "HWIO", "NHWC")


def _conv(x, kernel, strides, padding):
  return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_DN)


def _transpose(g, kernel, x_shape, strides, padding):
  """The adjoint of ``_conv(., kernel)`` at ``g`` (the vjp at zero: the forward is dead code)."""
  _, vjp = jax.vjp(lambda x: _conv(x, kernel, strides, padding), jnp.zeros(x_shape, g.dtype))
  return vjp(g)[0]


def _kernel_grad(x, g, kernel, strides, padding):
  """d<g, conv(x, k)>/dk: the forward convolution's kernel gradient (fast on every backend)."""
  _, vjp = jax.vjp(lambda k: _conv(x, k, strides, padding), jnp.zeros_like(kernel))
  return vjp(g)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x, kernel, strides, padding):
  """``lax.conv_general_dilated`` (NHWC, HWIO) whose VJP uses ``conv2d_transpose``."""
  return _conv(x, kernel, strides, padding)


def _conv2d_fwd(x, kernel, strides, padding):
  return _conv(x, kernel, strides, padding), (x, kernel)


def _conv2d_bwd(strides, padding, res, g):
  x, kernel = res
  gx = conv2d_transpose(g, kernel, x.shape, strides, padding)
  return gx, _kernel_grad(x, g, kernel, strides, padding)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d_transpose(g, kernel, x_shape, strides, padding):
  """The exact adjoint of ``conv2d(., kernel)`` applied to ``g``; ``x_shape``: its output shape."""
  return _transpose(g, kernel, x_shape, strides, padding)


def _conv2d_transpose_fwd(g, kernel, x_shape, strides, padding):
  return _transpose(g, kernel, x_shape, strides, padding), (g, kernel)


def _conv2d_transpose_bwd(x_shape, strides, padding, res, h):
  g, kernel = res
  return conv2d(h, kernel, strides, padding), _kernel_grad(h, g, kernel, strides, padding)


conv2d_transpose.defvjp(_conv2d_transpose_fwd, _conv2d_transpose_bwd)


@struct.dataclass
class Dense:
  """``x -> x @ kernel`` with ``kernel`` of shape ``(n_in, n_out)`` (Flax layout)."""

  kernel: jax.Array

  @property
  def in_shape(self) -> Shape:
    return (self.kernel.shape[0],)

  @property
  def out_shape(self) -> Shape:
    return (self.kernel.shape[1],)

  def __call__(self, x):
    return x @ self.kernel

  def abs(self):
    return Dense(jnp.abs(self.kernel))


@struct.dataclass
class Conv:
  """2-D convolution of an ``(H, W, C)`` image with an ``HWIO`` kernel (Flax layout).

  ``padding`` is ``((top, bottom), (left, right))`` of zeros, as in ``flax.linen.Conv``
  with explicit padding.
  """

  kernel: jax.Array
  in_shape: Shape = struct.field(pytree_node=False)
  strides: tuple[int, int] = struct.field(pytree_node=False, default=(1, 1))
  padding: tuple[tuple[int, int], tuple[int, int]] = struct.field(
    pytree_node=False, default=((0, 0), (0, 0))
  )

  @property
  def out_shape(self) -> Shape:
    h, w, _ = self.in_shape
    kh, kw, _, o = self.kernel.shape
    (pt, pb), (pl, pr) = self.padding
    return ((h + pt + pb - kh) // self.strides[0] + 1, (w + pl + pr - kw) // self.strides[1] + 1, o)

  def __call__(self, x):
    conv = lambda z: conv2d(z, self.kernel, self.strides, self.padding)
    return _batched(conv, x, self.in_shape, 3)

  def abs(self):
    return self.replace(kernel=jnp.abs(self.kernel))


@struct.dataclass
class Reshape:
  """Reshape (e.g. flatten of an ``(H, W, C)`` map): an isometry."""

  in_shape: Shape = struct.field(pytree_node=False)
  out_shape: Shape = struct.field(pytree_node=False)

  def __call__(self, x):
    batch = x.shape[: x.ndim - len(self.in_shape)]
    return x.reshape((*batch, *self.out_shape))

  def abs(self):
    return self


@struct.dataclass
class Scale:
  """Elementwise scaling ``x -> x * scale`` (``scale`` broadcasts against ``in_shape``).

  A fixed input normalisation ``(x - mean) / std`` is ``Scale(1 / std)``: the shift does
  not change the Lipschitz constant.
  """

  scale: jax.Array
  in_shape: Shape = struct.field(pytree_node=False)

  @property
  def out_shape(self) -> Shape:
    return self.in_shape

  def __call__(self, x):
    return x * self.scale

  def abs(self):
    return self.replace(scale=jnp.abs(self.scale))


@struct.dataclass
class Identity:
  """The identity on arrays of ``shape`` (the ``H_k = I`` of a residual block)."""

  shape: Shape = struct.field(pytree_node=False)

  @property
  def in_shape(self) -> Shape:
    return self.shape

  @property
  def out_shape(self) -> Shape:
    return self.shape

  def __call__(self, x):
    return x

  def abs(self):
    return self


@struct.dataclass
class Adjoint:
  """The transpose ``A^T`` of a linear operator ``op = A``: ``(*batch, *op.out_shape) ->
  (*batch, *op.in_shape)``.

  Computed exactly as the VJP of ``op`` (no materialised matrix), so it is
  differentiable in ``op``'s arrays; for a convolution it is the transposed convolution.
  ``|A^T| = |A|^T``, so ``abs()`` is ``Adjoint(op.abs())``. The ``W^T`` of the Proposition
  3.1 layers (``crmjax.controlled``).
  """

  op: Operator

  @property
  def in_shape(self) -> Shape:
    return self.op.out_shape

  @property
  def out_shape(self) -> Shape:
    return self.op.in_shape

  def __call__(self, y):
    def transpose(z):
      # The vjp of a linear map at any point is its transpose (at zero the forward is dead
      # code); unlike ``jax.linear_transpose`` it passes through ``conv2d``'s custom VJP.
      _, vjp = jax.vjp(self.op, jnp.zeros((z.shape[0], *self.op.in_shape), z.dtype))
      (x,) = vjp(z)
      return x

    return _batched(transpose, y, self.in_shape, len(self.out_shape))

  def abs(self):
    return Adjoint(self.op.abs())


@struct.dataclass
class Chain:
  """Composition ``ops[-1] o ... o ops[0]`` (``ops[0]`` is applied first)."""

  ops: tuple

  @property
  def in_shape(self) -> Shape:
    return self.ops[0].in_shape

  @property
  def out_shape(self) -> Shape:
    return self.ops[-1].out_shape

  def __call__(self, x):
    for op in self.ops:
      x = op(x)
    return x

  def abs(self):
    return Chain(tuple(op.abs() for op in self.ops))


def chain(ops: Sequence[Operator], shape: Shape) -> Operator:
  """Composes ``ops`` (applied first to last); the identity on ``shape`` when empty."""
  ops = tuple(ops)
  if not ops:
    return Identity(tuple(shape))
  return ops[0] if len(ops) == 1 else Chain(ops)


def size(shape: Shape) -> int:
  return math.prod(shape)


def is_isometry(op: Operator) -> bool:
  """True for operators whose l2 and l_inf norms are exactly 1 (identity, reshape)."""
  if isinstance(op, Chain):
    return all(is_isometry(o) for o in op.ops)
  if isinstance(op, Adjoint):
    return is_isometry(op.op)
  return isinstance(op, (Identity, Reshape))


def _window_counts(n: int, k: int, s: int, pads: tuple[int, int]) -> np.ndarray:
  """How many of the ``k`` taps of each output position of a 1-D window lie inside ``[0, n)``."""
  out = (n + pads[0] + pads[1] - k) // s + 1
  start = np.arange(out) * s - pads[0]
  return (np.minimum(start + k, n) - np.maximum(start, 0)).astype(np.float64)


@struct.dataclass
class AvgPool:
  """2-D average pooling of an ``(H, W, C)`` map: a fixed linear operator (no arrays).

  ``y[i, j, c] = sum_{a < kh, b < kw} x[i sh + a - pt, j sw + b - pl, c] / d[i, j]`` with zero
  padding ``((pt, pb), (pl, pr))``; ``d = kh kw`` (``count_include_pad``, as in
  ``flax.linen.avg_pool`` and ``torch.nn.AvgPool2d`` by default) or the number of taps inside
  the image. Its matrix is non-negative, so ``abs()`` is itself; its l2 norm is ``1 /
  sqrt(kh kw)`` for non-overlapping windows (stride = window, no padding): the rows are
  disjoint with norm ``sqrt(kh kw) / (kh kw)``. Overlapping windows are left to the bounds'
  norm computations, like any operator. The transpose (``Adjoint``, its VJP) spreads each
  output back over its window.
  """

  in_shape: Shape = struct.field(pytree_node=False)
  window: tuple[int, int] = struct.field(pytree_node=False)
  strides: tuple[int, int] = struct.field(pytree_node=False)
  padding: tuple[tuple[int, int], tuple[int, int]] = struct.field(
    pytree_node=False, default=((0, 0), (0, 0))
  )
  count_include_pad: bool = struct.field(pytree_node=False, default=True)

  @property
  def out_shape(self) -> Shape:
    h, w, c = self.in_shape
    (kh, kw), (sh, sw), ((pt, pb), (pl, pr)) = self.window, self.strides, self.padding
    return ((h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1, c)

  def divisor(self) -> np.ndarray:
    """``d`` of shape ``(H', W', 1)`` (float64): the number each window sum is divided by."""
    h, w, _ = self.in_shape
    (kh, kw), (sh, sw), (ph, pw) = self.window, self.strides, self.padding
    if self.count_include_pad:
      return np.full(self.out_shape[:2] + (1,), float(kh * kw))
    rows, cols = _window_counts(h, kh, sh, ph), _window_counts(w, kw, sw, pw)
    return (rows[:, None] * cols[None, :])[..., None]

  def __call__(self, x):
    def pool(z):
      sums = jax.lax.reduce_window(
        z,
        np.zeros((), z.dtype),  # a constant 0 with lax.add: the differentiable window sum
        jax.lax.add,
        (1, *self.window, 1),
        (1, *self.strides, 1),
        ((0, 0), *self.padding, (0, 0)),
      )
      return sums / jnp.asarray(self.divisor(), z.dtype)

    return _batched(pool, x, self.in_shape, 3)

  def abs(self):
    return self


@struct.dataclass
class GlobalAvgPool:
  """The mean over the spatial axes, ``(H, W, C) -> (C,)``: l2 norm ``1 / sqrt(H W)``, l_inf 1."""

  in_shape: Shape = struct.field(pytree_node=False)

  @property
  def out_shape(self) -> Shape:
    return (self.in_shape[-1],)

  def __call__(self, x):
    return _batched(lambda z: z.mean(axis=(1, 2)), x, self.in_shape, 1)

  def abs(self):
    return self
