"""Layer specifications: one description that both the Flax model and the LipLT bound read.

A network is a tuple of these frozen dataclasses. Each knows how to run itself inside a
Flax module (``apply``) and, for the linear ones, which linear operator its params define
(``operator``). ``crmjax.network.from_layers`` turns a tuple of layers plus params into
the loop-transformed form of paper eq. 17, so no model needs hand-written bound code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

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


# --------------------------------------------------------------------------- inference layers
# What a trained model runs at evaluation and the eq. 17 form holds exactly: BatchNorm with
# its running statistics is a per-channel affine map, average pooling a fixed linear map,
# Dropout the identity. Max pooling, LayerNorm and attention are not of that form.


class _ChannelAffine(nn.Module):
  """``x * scale + bias`` over the last axis (params ``scale`` and ``bias``, shape ``(C,)``)."""

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    return x * scale.astype(x.dtype) + bias.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class BatchNorm:
  """BatchNorm at inference: ``x -> x * scale + bias`` per channel (the last axis).

  With running statistics ``mean``, ``var`` and the learnt ``gamma``, ``beta``, BatchNorm
  computes ``gamma (x - mean) / sqrt(var + epsilon) + beta``: this layer's params are
  ``scale = gamma / sqrt(var + epsilon)`` and ``bias = beta - mean * scale``
  (``batchnorm_affine``). Its operator is the diagonal ``Scale(scale)``; the bias does not
  change a Lipschitz constant. Training it (e.g. CRM fine-tuning) trains the affine map:
  there are no batch statistics. ``epsilon`` is the one the statistics are folded with.
  """

  epsilon: float = 1e-5

  def apply(self, x, name):
    return _ChannelAffine(name=name)(x)

  def operator(self, params, in_shape: Shape) -> ops.Operator:
    return ops.Scale(params["scale"], tuple(in_shape))


def batchnorm_affine(*, mean, var, epsilon: float, gamma=None, beta=None) -> dict:
  """The ``BatchNorm`` params ``{'scale', 'bias'}`` of running statistics (shapes ``(C,)``).

  ``scale = gamma / sqrt(var + epsilon)``, ``bias = beta - mean * scale`` (``gamma = 1``,
  ``beta = 0`` when absent). Pure ``jnp``: differentiable in ``gamma`` and ``beta``, and
  traceable (inside ``jit`` the variance is not checked).
  """
  var = jnp.asarray(var)
  if not isinstance(var, jax.core.Tracer) and np.any(np.asarray(var) + epsilon <= 0):
    raise ValueError("BatchNorm running variance + epsilon must be positive")
  scale = jax.lax.rsqrt(var + epsilon)
  if gamma is not None:
    scale = jnp.asarray(gamma) * scale
  bias = -jnp.asarray(mean) * scale
  if beta is not None:
    bias = bias + jnp.asarray(beta)
  return {"scale": scale, "bias": bias}


def _pair(v, what: str) -> tuple[int, int]:
  v = (int(v),) * 2 if isinstance(v, (int, np.integer)) else tuple(int(a) for a in v)
  if len(v) != 2 or min(v) < 0:
    raise ValueError(f"AvgPool {what} must be an int or a pair of ints >= 0, got {v}")
  return v


@dataclasses.dataclass(frozen=True)
class AvgPool:
  """2-D average pooling (``flax.linen.avg_pool`` / ``torch.nn.AvgPool2d``), a linear layer.

  ``window`` and ``strides`` (default ``window``) are ints or ``(h, w)`` pairs; ``padding``
  is zero padding: an int, ``(ph, pw)`` or ``((top, bottom), (left, right))``.
  ``count_include_pad``: divide by the window size (Flax's and PyTorch's default) or by the
  number of taps inside the image.
  """

  window: tuple[int, int]
  strides: tuple[int, int] | None = None
  padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
  count_include_pad: bool = True

  def __post_init__(self):
    window = _pair(self.window, "window")
    strides = window if self.strides is None else _pair(self.strides, "strides")
    pad = self.padding
    if isinstance(pad, (int, np.integer)):
      pad = ((int(pad),) * 2,) * 2
    else:
      pad = tuple(
        (int(p),) * 2 if isinstance(p, (int, np.integer)) else _pair(p, "padding") for p in pad
      )
    if min(window) < 1 or min(strides) < 1 or len(pad) != 2:
      raise ValueError(f"AvgPool needs window, strides >= 1 and 2-D padding, got {self}")
    object.__setattr__(self, "window", window)
    object.__setattr__(self, "strides", strides)
    object.__setattr__(self, "padding", pad)

  def apply(self, x, name):
    del name
    return nn.avg_pool(x, self.window, self.strides, self.padding, self.count_include_pad)

  def operator(self, params, in_shape: Shape) -> ops.Operator:
    del params
    if len(in_shape) != 3:
      raise ValueError(f"AvgPool expects an (H, W, C) input, got shape {in_shape}")
    op = ops.AvgPool(
      tuple(in_shape), self.window, self.strides, self.padding, self.count_include_pad
    )
    if min(op.out_shape) <= 0:
      raise ValueError(f"AvgPool {self} maps {in_shape} to an empty {op.out_shape} output")
    return op


@dataclasses.dataclass(frozen=True)
class GlobalAvgPool:
  """The spatial mean ``(H, W, C) -> (C,)`` (``torch.nn.AdaptiveAvgPool2d((1, 1))`` + flatten)."""

  def apply(self, x, name):
    del name
    return x.mean(axis=(1, 2))

  def operator(self, params, in_shape: Shape) -> ops.Operator:
    del params
    if len(in_shape) != 3:
      raise ValueError(f"GlobalAvgPool expects an (H, W, C) input, got shape {in_shape}")
    return ops.GlobalAvgPool(tuple(in_shape))


@dataclasses.dataclass(frozen=True)
class Dropout:
  """Dropout at inference: the identity (``rate`` is kept for the record only)."""

  rate: float = 0.0

  def apply(self, x, name):
    del name
    return x

  def operator(self, params, in_shape: Shape) -> ops.Operator:
    del params
    return ops.Identity(tuple(in_shape))


def sequential_specs(
  converted: Sequence[tuple[Any, dict]], *, logits_layer: str, fold: bool = False
) -> tuple[tuple, dict]:
  """The ``(layers, params)`` of ``Sequential`` from converted steps, for the converters.

  Args:
    converted: ``(spec, params)`` per step of the source model, in order; a ``None`` spec
      (a step that is the identity at inference, e.g. Dropout) is dropped.
    logits_layer: the source framework's name of the dense layer that must come last (for
      the error message).
    fold: fold each BatchNorm into the conv / dense layer before it (``fold_batchnorm``).

  Returns:
    ``(layers, {'layer_i': params})`` with ``i`` the index of each layer with params.

  Raises:
    ValueError: if the last layer is not a ``Dense`` (the logits).
  """
  specs, params = [], {}
  for spec, p in converted:
    if spec is None:
      continue
    if p:
      params[f"layer_{len(specs)}"] = p
    specs.append(spec)
  if not specs or not isinstance(specs[-1], Dense):
    raise ValueError(
      f"the model must end with the {logits_layer} layer giving the logits "
      f"(got {type(specs[-1]).__name__ if specs else 'no layers'})"
    )
  if fold:
    return fold_batchnorm(tuple(specs), params)
  return tuple(specs), params


def fold_batchnorm(layers: tuple, params: dict) -> tuple[tuple, dict]:
  """Folds every ``BatchNorm`` that directly follows a ``Conv`` / ``Dense`` into that layer.

  ``(x W + b) * s + t = x (W s) + (b s + t)``: the kernel's output channels are scaled by
  ``s`` and the bias becomes ``b s + t`` (``use_bias=True``). The folded network computes
  the same function and its operators are the same linear maps (``W`` then ``Scale(s)``
  becomes one operator), so its bounds are those of the unfolded one up to rounding. Other
  ``BatchNorm`` layers (e.g. after an activation) stay diagonal operators; residual
  branches are folded inside.

  Args:
    layers: layer specs; params: ``{'layer_i': {...}}`` of them.

  Returns:
    ``(layers, params)`` with the folded ``BatchNorm`` layers removed (layers renumbered).
  """
  out_layers, out_params = [], {}
  for i, layer in enumerate(layers):
    p = params.get(f"layer_{i}", {})
    prev = out_layers[-1] if out_layers else None
    if isinstance(layer, BatchNorm) and isinstance(prev, (Conv, Dense)):
      key = f"layer_{len(out_layers) - 1}"
      q = out_params[key]
      bias = q["bias"] * p["scale"] if "bias" in q else 0.0
      out_params[key] = {**q, "kernel": q["kernel"] * p["scale"], "bias": bias + p["bias"]}
      out_layers[-1] = dataclasses.replace(prev, use_bias=True)
      continue
    if isinstance(layer, Residual):
      inner, p = fold_batchnorm(tuple(layer.layers), p)
      layer = Residual(inner)
    if p:
      out_params[f"layer_{len(out_layers)}"] = p
    out_layers.append(layer)
  return tuple(out_layers), out_params


LINEAR = (Conv, Dense, Flatten, Normalize, BatchNorm, AvgPool, GlobalAvgPool, Dropout)


class Sequential(nn.Module):
  """A Flax module running a tuple of layer specs; submodule ``i`` is named ``layer_i``."""

  layers: tuple

  @nn.compact
  def __call__(self, x):
    for i, layer in enumerate(self.layers):
      x = layer.apply(x, f"layer_{i}")
    return x
