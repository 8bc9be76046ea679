"""Layer specifications: one description that both the Flax model and the LipLT bound read.

A network is a tuple of these frozen dataclasses. Each knows how to run itself inside a
Flax module (``apply``) and, for the linear ones, which linear operator its params define
(``operator``). ``crmjax.network.from_layers`` turns a tuple of layers plus params into
the loop-transformed form of paper eq. 17, so no model needs hand-written bound code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from crmjax import operators as ops

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Conv:
  """``features`` filters of ``kernel_size`` x ``kernel_size``, symmetric zero ``padding``."""

  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  use_bias: bool = True

  def apply(self, x, name):
    p = self.padding
    return nn.Conv(
      self.features,
      (self.kernel_size,) * 2,
      strides=(self.stride,) * 2,
      padding=((p, p), (p, p)),
      use_bias=self.use_bias,
      name=name,
    )(x)

  def operator(self, params, in_shape: Shape) -> ops.Operator:
    if len(in_shape) != 3:
      raise ValueError(f"Conv expects an (H, W, C) input, got shape {in_shape}")
    p = self.padding
    return ops.Conv(params["kernel"], tuple(in_shape), (self.stride,) * 2, ((p, p), (p, p)))


@dataclasses.dataclass(frozen=True)
class Dense:
  features: int
  use_bias: bool = True

  def apply(self, x, name):
    return nn.Dense(self.features, use_bias=self.use_bias, name=name)(x)

  def operator(self, params, in_shape: Shape) -> ops.Operator:
    if len(in_shape) != 1:
      raise ValueError(f"Dense expects a flat input, got shape {in_shape}: add Flatten()")
    return ops.Dense(params["kernel"])


@dataclasses.dataclass(frozen=True)
class Flatten:
  """Flattens an ``(H, W, C)`` map in HWC order (Flax's layout)."""

  def apply(self, x, name):
    del name
    return x.reshape((x.shape[0], -1))

  def operator(self, params, in_shape: Shape) -> ops.Operator:
    del params
    return ops.Reshape(tuple(in_shape), (int(np.prod(in_shape)),))


@dataclasses.dataclass(frozen=True)
class Normalize:
  """Fixed per-channel input normalisation ``(x - mean) / std``, part of the network.

  Certificates are stated in [0, 1] pixel space, so this layer is inside the bound
  (it contributes ``max 1/|std|``).
  """

  mean: tuple[float, ...]
  std: tuple[float, ...]

  def apply(self, x, name):
    del name
    return (x - jnp.asarray(self.mean, x.dtype)) / jnp.asarray(self.std, x.dtype)

  def operator(self, params, in_shape: Shape) -> ops.Operator:
    del params
    return ops.Scale(1.0 / jnp.asarray(self.std, jnp.float32), tuple(in_shape))


def _leaky(slope):
  return lambda x: jax.nn.leaky_relu(x, slope)


_ACTIVATIONS: dict[str, tuple[Callable | None, tuple[float, float] | None]] = {
  "relu": (jax.nn.relu, (0.0, 1.0)),
  "tanh": (jnp.tanh, (0.0, 1.0)),
  "sigmoid": (jax.nn.sigmoid, (0.0, 0.25)),
  "leaky_relu": (None, None),  # slopes from negative_slope
  "custom": (None, None),  # fn and slopes given by the user
}


@dataclasses.dataclass(frozen=True)
class Act:
  """Elementwise activation, slope-restricted: ``alpha <= phi'(x) <= beta`` everywhere.

  ``name`` is ``relu`` (0, 1), ``tanh`` (0, 1), ``sigmoid`` (0, 1/4), ``leaky_relu``
  (``negative_slope``, 1), or ``custom`` with a user-given ``fn`` and ``slopes``.
  """

  name: str = "relu"
  negative_slope: float = 0.01
  fn: Callable | None = None
  slopes: tuple[float, float] | None = None

  def __post_init__(self):
    if self.name not in _ACTIVATIONS:
      raise ValueError(f"unknown activation {self.name!r}; known: {sorted(_ACTIVATIONS)}")
    if self.name == "custom" and (self.fn is None or self.slopes is None):
      raise ValueError("Act('custom') needs fn= and slopes=(alpha, beta)")
    a, b = self.slope_bounds
    if not a <= b:
      raise ValueError(f"activation slopes need alpha <= beta, got {(a, b)}")

  @property
  def slope_bounds(self) -> tuple[float, float]:
    if self.slopes is not None:
      return tuple(float(s) for s in self.slopes)
    if self.name == "leaky_relu":
      return (min(self.negative_slope, 1.0), max(self.negative_slope, 1.0))
    return _ACTIVATIONS[self.name][1]

  @property
  def function(self) -> Callable:
    if self.fn is not None:
      return self.fn
    if self.name == "leaky_relu":
      return _leaky(self.negative_slope)
    return _ACTIVATIONS[self.name][0]

  def apply(self, x, name):
    del name
    return self.function(x)


@dataclasses.dataclass(frozen=True)
class Residual:
  """``x -> x + post(phi(pre(x)))``: a block with ``H = I`` (paper eq. 17).

  ``layers`` is linear layers, exactly one ``Act``, then linear layers; the output must
  have the shape of the input.
  """

  layers: tuple

  def __post_init__(self):
    acts = [l for l in self.layers if isinstance(l, Act)]
    if len(acts) != 1:
      raise ValueError(
        "Residual(layers) needs exactly one Act among its layers "
        f"(the H x + G phi(W x) form of eq. 17); got {len(acts)}"
      )

  def apply(self, x, name):
    return x + Sequential(tuple(self.layers), name=name)(x)


LINEAR = (Conv, Dense, Flatten, Normalize)


class Sequential(nn.Module):
  """A Flax module running a tuple of layer specs; submodule ``i`` is named ``layer_i``."""

  layers: tuple

  @nn.compact
  def __call__(self, x):
    for i, layer in enumerate(self.layers):
      x = layer.apply(x, f"layer_{i}")
    return x
