"""Flax NNX models in crmjax: the eq. 17 form (and LipLT bound) of an ``nnx.Sequential``.

``to_layers(model, input_shape)`` reads an NNX model into crmjax layer specs
(``crmjax.layers``) and a params tree; ``to_lipnet(model, input_shape)`` is
``network.from_layers`` of those, the loop-transformed form of paper eq. 17 that
``crmjax.liplt`` and ``crmjax.soundness`` bound. The params are the NNX variables' values, so
inside ``nnx.value_and_grad`` / ``nnx.jit`` the bound is differentiable in the model's
``nnx.Param`` s and can be trained (the power-iteration ``liplt.PowerState`` is an ordinary
pytree passed through the step).

What the converter reads (anything else raises a ``ValueError`` that says so):

* ``nnx.Sequential`` (nested ones are flattened);
* ``nnx.Conv``, 2-D, zero padding (``'SAME'``, ``'VALID'``, ints, per-axis ints or
  ``(low, high)`` pairs), any strides, rectangular kernels, ``mask``; no dilation or feature
  groups. Input ``(H, W, C)`` (NHWC batches), kernel ``(kh, kw, in, out)`` as in Flax;
* ``nnx.Linear`` on a flat input (flatten first);
* activations as plain functions: ``nnx.relu``, ``nnx.leaky_relu`` (also
  ``functools.partial(nnx.leaky_relu, negative_slope=s)``), ``nnx.tanh``, ``nnx.sigmoid``,
  ``nnx.relu6``, ``nnx.hard_tanh``, ``nnx.softplus`` (the ``jax.nn`` / ``jnp`` functions are
  the same objects), or any slope-restricted ``fn`` wrapped as ``Activation(fn, slopes=(alpha,
  beta))`` with ``alpha <= fn' <= beta``;
* a flatten: ``Flatten()``, or any function that reshapes ``(B, H, W, C)`` to
  ``(B, H * W * C)`` in row-major order, e.g. ``lambda x: x.reshape(x.shape[0], -1)``
  (checked on a random input);
* a residual block ``Residual(*fns)``: ``x -> x + fns(x)`` (``H = I`` in eq. 17) whose branch
  is linear layers, exactly one activation, linear layers, with output shape = input shape;
* ``nnx.BatchNorm`` in evaluation mode (``model.eval()``, i.e. ``use_running_average=True``):
  the per-channel affine map of its running statistics, ``crmjax.layers.BatchNorm``
  (``fold_batchnorm=True`` folds it into a directly preceding conv / linear layer);
* average pooling: ``functools.partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))``
  (any window, strides, zero padding, ``count_include_pad``) and the global mean
  ``GlobalAvgPool()`` (or a function computing ``x.mean(axis=(1, 2))``, checked on a random
  input);
* ``nnx.Dropout``: the identity at evaluation, left out.

The converted network is the model's evaluation-mode network; the certificates of
``crmjax.certify.certified_radii(*to_model(model, shape), images, labels)`` are computed from
its own logits. Max pooling, LayerNorm / RMSNorm / GroupNorm and attention are not of the eq.
17 form and raise (the message says what to use instead).

Example::

  from flax import nnx
  from crmjax import liplt, nnx_bridge

  rngs = nnx.Rngs(0)
  model = nnx.Sequential(
      nnx.Conv(1, 8, (3, 3), rngs=rngs), nnx.relu,
      nnx_bridge.Residual(nnx.Conv(8, 8, (3, 3), rngs=rngs), nnx.relu,
                          nnx.Conv(8, 8, (3, 3), rngs=rngs)),
      nnx.Conv(8, 16, (4, 4), strides=2, rngs=rngs), nnx.relu,
      nnx_bridge.Flatten(), nnx.Linear(16 * 14 * 14, 10, rngs=rngs))
  net = nnx_bridge.to_lipnet(model, (28, 28, 1))
  lip, _ = liplt.liplt_bound(net, mode="pairwise", num_iters=10)  # (10, 10)

A model that is not an ``nnx.Sequential`` (a custom ``nnx.Module`` with its own
``__call__``) cannot be read: keep its layers in an ``nnx.Sequential`` attribute and pass
that, or describe the network with ``crmjax.layers`` specs directly.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from crmjax import layers as L
from crmjax import models, network
from crmjax import operators as ops

__all__ = [
  "Activation",
  "Flatten",
  "GeneralConv",
  "GlobalAvgPool",
  "Residual",
  "function_spec",
  "to_layers",
  "to_lipnet",
  "to_model",
]

Shape = tuple[int, ...]
Pads = tuple[tuple[int, int], tuple[int, int]]

_SUPPORTED = (
  "Supported: nnx.Sequential (nested), nnx.Conv (2-D, zero padding, no dilation or "
  "feature groups), nnx.Linear (on a flat input), crmjax.nnx_bridge.Residual(*fns), "
  "crmjax.nnx_bridge.Flatten() (or lambda x: x.reshape(x.shape[0], -1)), and the "
  "activations nnx.relu, nnx.leaky_relu (functools.partial(nnx.leaky_relu, "
  "negative_slope=s)), nnx.tanh, nnx.sigmoid, nnx.relu6, nnx.hard_tanh, nnx.softplus. "
  "Wrap any other slope-restricted activation as crmjax.nnx_bridge.Activation(fn, "
  "slopes=(alpha, beta)) with alpha <= fn' <= beta; nnx.BatchNorm (model.eval()), "
  "functools.partial(nnx.avg_pool, window_shape=.., strides=..), "
  "crmjax.nnx_bridge.GlobalAvgPool(), nnx.Dropout (left out). Or describe the network "
  "with crmjax.layers specs."
)
_NOT_EQ17 = (
  "is not of the form H x + G phi(W x) of eq. 17 (not linear between slope-restricted "
  "activations), so LipLT cannot bound it"
)
_MAX_POOL_FIX = (
  "max pooling " + _NOT_EQ17 + ". Replace it by average pooling "
  "(functools.partial(nnx.avg_pool, window_shape=.., strides=..)) or a strided convolution "
  "and fine-tune the model (e.g. with the CRM loss)"
)
_NORM_FIX = (
  "{name} divides by a statistic of its own input: it " + _NOT_EQ17 + ". Use BatchNorm "
  "(fixed running statistics at evaluation) or no normalisation, and retrain"
)
_ATTENTION_FIX = (
  "{name} (attention) multiplies inputs with each other: it " + _NOT_EQ17 + "; "
  "crmjax certifies convolutional and dense networks"
)


# --------------------------------------------------------------------------- NNX-side parts


@dataclasses.dataclass(frozen=True)
class Activation:
  """A slope-restricted activation ``fn`` (``alpha <= fn' <= beta``) for an NNX model.

  Use it in ``nnx.Sequential`` like the function itself, e.g.
  ``Activation(nnx.gelu, slopes=(-0.13, 1.13))``; the bound uses ``slopes``. The slopes are
  the user's claim: LipLT is an upper bound only if they hold everywhere.
  """

  fn: Callable[[jax.Array], jax.Array]
  slopes: tuple[float, float]

  def __post_init__(self):
    slopes = tuple(float(s) for s in self.slopes)
    if len(slopes) != 2 or not slopes[0] <= slopes[1]:
      raise ValueError(
        f"Activation slopes must be (alpha, beta) with alpha <= beta, got {self.slopes!r}"
      )
    object.__setattr__(self, "slopes", slopes)  # hashable: NNX keeps it as static data

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fn(x)


@dataclasses.dataclass(frozen=True)
class Flatten:
  """Flattens ``(B, H, W, C)`` to ``(B, H * W * C)`` (row-major, as ``crmjax.layers.Flatten``)."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return x.reshape((x.shape[0], -1))


@dataclasses.dataclass(frozen=True)
class GlobalAvgPool:
  """The spatial mean ``(B, H, W, C) -> (B, C)`` (as ``crmjax.layers.GlobalAvgPool``)."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return x.mean(axis=(1, 2))


class Residual(nnx.Module):
  """``x -> x + branch(x)`` with ``branch = nnx.Sequential(*fns)``: a block with ``H = I``.

  For the bound (paper eq. 17, ``x + G phi(W x)``) the branch is linear layers
  (``nnx.Conv`` / ``nnx.Linear``), exactly one activation, then linear layers, and maps its
  input to the same shape.
  """

  def __init__(self, *fns: Callable[..., Any]):
    self.branch = nnx.Sequential(*fns)

  def __call__(self, x: jax.Array) -> jax.Array:
    return x + self.branch(x)


# --------------------------------------------------------------------------- layer specs


@dataclasses.dataclass(frozen=True)
class GeneralConv(L.Conv):
  """``crmjax.layers.Conv`` with a ``(kh, kw)`` kernel, ``(sh, sw)`` strides and explicit
  zero padding ``((top, bottom), (left, right))``.

  What ``nnx.Conv`` needs beyond the square, symmetric ``L.Conv``: its ``'SAME'`` padding is
  asymmetric for even strides (``(0, 1)`` for a 3x3 kernel, stride 2, even input). A layer
  spec like any other: ``layers.Sequential`` runs it, ``network.from_layers`` reads it.
  """

  kernel_size: tuple[int, int]
  stride: tuple[int, int] = (1, 1)
  padding: Pads = ((0, 0), (0, 0))
  use_bias: bool = True

  def apply(self, x, name):
    return nn.Conv(
      self.features,
      self.kernel_size,
      strides=self.stride,
      padding=self.padding,
      use_bias=self.use_bias,
      name=name,
    )(x)

  def operator(self, params, in_shape: Shape) -> ops.Operator:
    if len(in_shape) != 3:
      raise ValueError(f"Conv expects an (H, W, C) input, got shape {in_shape}")
    return ops.Conv(params["kernel"], tuple(in_shape), self.stride, self.padding)


def _conv_spec(
  features: int, kernel_size: tuple[int, int], strides: tuple[int, int], pads: Pads, use_bias: bool
) -> L.Conv:
  """``L.Conv`` where it can express the layer (square, symmetric), else ``GeneralConv``."""
  (pt, pb), (pl, pr) = pads
  if kernel_size[0] == kernel_size[1] and strides[0] == strides[1] and pt == pb == pl == pr:
    return L.Conv(features, kernel_size[0], strides[0], pt, use_bias)
  return GeneralConv(features, kernel_size, strides, pads, use_bias)


# --------------------------------------------------------------------------- activations

_FIXED_ACTIVATIONS: tuple[tuple[Callable, L.Act], ...] = (
  (jax.nn.relu, L.Act("relu")),
  (jnp.tanh, L.Act("tanh")),
  (jax.nn.sigmoid, L.Act("sigmoid")),
  (jax.nn.leaky_relu, L.Act("leaky_relu", negative_slope=0.01)),  # its default slope
  (jax.nn.relu6, L.Act("custom", fn=jax.nn.relu6, slopes=(0.0, 1.0))),
  (jax.nn.hard_tanh, L.Act("custom", fn=jax.nn.hard_tanh, slopes=(0.0, 1.0))),
  (jax.nn.softplus, L.Act("custom", fn=jax.nn.softplus, slopes=(0.0, 1.0))),
)


def _activation(fn: Any) -> L.Act | None:
  """The ``L.Act`` spec (slope bounds) of a known activation function, else ``None``."""
  if isinstance(fn, Activation):
    return L.Act("custom", fn=fn.fn, slopes=fn.slopes)
  if isinstance(fn, functools.partial) and fn.func is jax.nn.leaky_relu:
    if fn.args or set(fn.keywords) - {"negative_slope"}:
      raise ValueError(
        f"{fn!r}: give the slope by keyword, functools.partial(nnx.leaky_relu, negative_slope=s)"
      )
    return L.Act("leaky_relu", negative_slope=float(fn.keywords.get("negative_slope", 0.01)))
  for known, spec in _FIXED_ACTIVATIONS:
    if fn is known:
      return spec
  return None


def _probe(fn: Callable, shape: Shape) -> tuple[np.ndarray, np.ndarray | None]:
  """A random ``(2, *shape)`` input and ``fn`` of it (``None`` if ``fn`` fails on it)."""
  x = np.random.default_rng(0).standard_normal((2, *shape)).astype(np.float32)
  try:
    with jax.ensure_compile_time_eval():
      return x, np.asarray(fn(jnp.asarray(x)))
  except Exception:  # pylint: disable=broad-except  # any failure: not this function
    return x, None


def _is_flatten(fn: Callable, shape: Shape) -> bool:
  """Whether ``fn`` maps a random ``(2, *shape)`` input to its row-major ``(2, -1)`` flatten."""
  x, y = _probe(fn, shape)
  return y is not None and y.shape == (2, math.prod(shape)) and np.array_equal(y, x.reshape(2, -1))


def _is_global_mean(fn: Callable, shape: Shape) -> bool:
  """Whether ``fn`` maps a random ``(2, H, W, C)`` input to its spatial mean ``(2, C)``."""
  if len(shape) != 3:
    return False
  x, y = _probe(fn, shape)
  want = x.astype(np.float64).mean(axis=(1, 2))
  return y is not None and y.shape == want.shape and np.allclose(y, want, rtol=1e-5, atol=1e-6)


_POOL_ARGS = ("inputs", "window_shape", "strides", "padding", "count_include_pad")


def _avg_pool_spec(fn: functools.partial, shape: Shape, where: str) -> L.AvgPool:
  """``L.AvgPool`` of ``functools.partial(nnx.avg_pool, window_shape, strides, padding, ..)``."""
  kwargs = dict(fn.keywords)
  if fn.args or set(kwargs) - set(_POOL_ARGS[1:]) or "window_shape" not in kwargs:
    raise ValueError(
      f"{where}: give average pooling's settings by keyword (its first argument is the "
      "input): functools.partial(nnx.avg_pool, window_shape=(kh, kw), strides=(sh, sw), "
      f"padding=.., count_include_pad=..); got {fn!r}"
    )
  if len(shape) != 3:
    raise ValueError(f"{where}: average pooling needs an (H, W, C) input, got shape {shape}")
  window = _pair(kwargs["window_shape"], "window_shape", where)
  strides = _pair(kwargs.get("strides"), "strides", where)  # Flax's default: 1
  pads = _conv_pads(kwargs.get("padding", "VALID"), shape[:2], window, strides, where)
  spec = L.AvgPool(window, strides, pads, bool(kwargs.get("count_include_pad", True)))
  spec.operator({}, shape)  # raises for an empty output
  return spec


def function_spec(f: Any, shape: Shape, where: str) -> tuple[Any, Shape]:
  """The layer spec and output shape of a parameter-free function of a Flax model.

  Reads the activations and ``Activation`` of the module docstring, ``Flatten`` (or any
  row-major flatten), average pooling (``functools.partial(avg_pool, ..)``),
  ``GlobalAvgPool`` (or any spatial mean). ``flax.linen`` and ``flax.nnx`` share these
  functions. Raises a ``ValueError`` naming ``where`` for max pooling and unknown functions.
  """
  spec = _activation(f)
  if spec is not None:
    return spec, tuple(shape)
  if isinstance(f, Flatten):
    return L.Flatten(), (math.prod(shape),)
  if isinstance(f, GlobalAvgPool) or (callable(f) and _is_global_mean(f, shape)):
    if len(shape) != 3:
      raise ValueError(f"{where}: GlobalAvgPool needs an (H, W, C) input, got shape {shape}")
    return L.GlobalAvgPool(), (shape[-1],)
  base = f.func if isinstance(f, functools.partial) else f
  if base is nn.avg_pool and isinstance(f, functools.partial):
    spec = _avg_pool_spec(f, shape, where)
    return spec, tuple(spec.operator({}, shape).out_shape)
  if base is nn.avg_pool:
    raise ValueError(
      f"{where}: give average pooling its window, functools.partial(nnx.avg_pool, "
      "window_shape=(2, 2), strides=(2, 2))"
    )
  if base is nn.max_pool or "max_pool" in getattr(base, "__name__", ""):
    raise ValueError(f"{where}: " + _MAX_POOL_FIX)
  if callable(f) and _is_flatten(f, shape):
    return L.Flatten(), (math.prod(shape),)
  name = getattr(f, "__name__", None) or type(f).__name__
  raise ValueError(
    f"{where}: unknown function {name!r}: neither a known activation (slope "
    "bounds unknown), a flatten nor average pooling (a lambda around nnx.avg_pool cannot be "
    "read: write functools.partial(nnx.avg_pool, window_shape=.., strides=..)). " + _SUPPORTED
  )


# --------------------------------------------------------------------------- conversion


def _pair(value, what: str, where: str) -> tuple[int, int]:
  if value is None:
    return (1, 1)
  if isinstance(value, (int, np.integer)):
    return (int(value),) * 2
  value = tuple(int(v) for v in value)
  if len(value) != 2:
    raise ValueError(f"{where}: {what}={value} is not 2-D; only 2-D convolutions convert")
  return value


def _conv_pads(padding, in_hw, kernel_size, strides, where: str) -> Pads:
  """``nnx.Conv``'s padding as explicit ``((top, bottom), (left, right))`` zeros."""
  if isinstance(padding, str):
    if padding.upper() not in ("SAME", "VALID", "SAME_LOWER"):
      raise ValueError(
        f"{where}: padding={padding!r} is not zero padding; only 'SAME', "
        "'VALID' and explicit ints / pairs convert (the bound's Conv "
        "operator pads with zeros)"
      )
    pads = jax.lax.padtype_to_pads(in_hw, kernel_size, strides, padding)
  elif isinstance(padding, (int, np.integer)):
    pads = [(int(padding),) * 2] * 2
  else:
    padding = list(padding)
    if len(padding) != 2:
      raise ValueError(f"{where}: padding={padding!r} is not 2-D")
    pads = [(int(p),) * 2 if isinstance(p, (int, np.integer)) else tuple(p) for p in padding]
  pads = tuple(tuple(int(v) for v in p) for p in pads)
  if any(len(p) != 2 for p in pads):
    raise ValueError(f"{where}: padding={padding!r}: give ints or (low, high) pairs")
  return pads


def _convert_conv(conv: nnx.Conv, shape: Shape, where: str):
  if len(conv.kernel_size) != 2:
    hint = (
      f" (kernel_size={conv.kernel_size[0]} is 1-D in NNX: write {(conv.kernel_size[0],) * 2})"
      if len(conv.kernel_size) == 1
      else ""
    )
    raise ValueError(
      f"{where}: a {len(conv.kernel_size)}-D nnx.Conv; only 2-D "
      f"convolutions (kernel_size=(kh, kw), NHWC input) convert{hint}"
    )
  if len(shape) != 3:
    raise ValueError(
      f"{where}: nnx.Conv needs an (H, W, C) input, got shape {shape} "
      "(input_shape excludes the batch axis, e.g. (28, 28, 1))"
    )
  if shape[-1] != conv.in_features:
    raise ValueError(
      f"{where}: nnx.Conv has in_features={conv.in_features} but its input "
      f"has shape {shape}; check input_shape and the preceding layers"
    )
  if conv.feature_group_count != 1:
    raise ValueError(
      f"{where}: feature_group_count={conv.feature_group_count} (grouped / "
      "depthwise convolution) is not supported. " + _SUPPORTED
    )
  for what in ("kernel_dilation", "input_dilation"):
    if _pair(getattr(conv, what), what, where) != (1, 1):
      raise ValueError(
        f"{where}: {what}={getattr(conv, what)} is not supported (dilation 1 only). " + _SUPPORTED
      )
  kernel_size = _pair(conv.kernel_size, "kernel_size", where)
  strides = _pair(conv.strides, "strides", where)
  pads = _conv_pads(conv.padding, shape[:2], kernel_size, strides, where)
  spec = _conv_spec(conv.out_features, kernel_size, strides, pads, conv.use_bias)
  kernel = conv.kernel[...]
  if conv.mask is not None:
    kernel = kernel * conv.mask
  params = {"kernel": kernel}
  if conv.use_bias:
    params["bias"] = conv.bias[...]
  out = spec.operator(params, shape).out_shape
  if min(out) <= 0:
    raise ValueError(
      f"{where}: maps the {shape} input to an empty {out} output; check "
      "input_shape, strides and padding"
    )
  return spec, params, tuple(out)


def _convert_linear(lin: nnx.Linear, shape: Shape, where: str):
  if len(shape) != 1:
    raise ValueError(
      f"{where}: nnx.Linear applied to a {shape} map; the converter needs a "
      "flat input: put crmjax.nnx_bridge.Flatten() (or lambda x: "
      "x.reshape(x.shape[0], -1)) before it, or use a 1x1 nnx.Conv"
    )
  if shape[0] != lin.in_features:
    raise ValueError(
      f"{where}: nnx.Linear has in_features={lin.in_features} but its input "
      f"has {shape[0]} features; check input_shape and the preceding layers"
    )
  params = {"kernel": lin.kernel[...]}
  if lin.use_bias:
    params["bias"] = lin.bias[...]
  return L.Dense(lin.out_features, use_bias=lin.use_bias), params, (lin.out_features,)


def _flat_children(seq: nnx.Sequential, where: str):
  for j, f in enumerate(seq.layers):
    path = f"{where}.layers[{j}]"
    if _is(f, nnx.Sequential):
      yield from _flat_children(f, path)
    else:
      yield path, f


def _convert_residual(block: Residual, shape: Shape, where: str):
  specs, params, s = [], {}, shape
  for path, f in _flat_children(block.branch, f"{where}.branch"):
    if _is(f, Residual):
      raise ValueError(
        f"{path}: a Residual inside a residual branch is not of the form x + "
        "G phi(W x) (eq. 17); put the blocks one after the other"
      )
    spec, p, s = _convert_one(f, s, path)
    if spec is None:
      continue
    if p:
      params[f"layer_{len(specs)}"] = p
    specs.append(spec)
  acts = [i for i, sp in enumerate(specs) if isinstance(sp, L.Act)]
  if len(acts) != 1:
    raise ValueError(
      f"{where}: a Residual branch needs exactly one activation between its "
      f"linear layers (x + G phi(W x), paper eq. 17); it has {len(acts)}. Split "
      "a longer branch into several Residual blocks"
    )
  if any(isinstance(sp, (L.Flatten, L.GlobalAvgPool)) for sp in specs):
    raise ValueError(
      f"{where}: a Residual branch cannot flatten (its output must have the input's shape)"
    )
  if tuple(s) != tuple(shape):
    raise ValueError(
      f"{where}: the Residual branch maps {shape} to {s}; x + branch(x) needs equal shapes"
    )
  return L.Residual(tuple(specs)), params, tuple(shape)


def _convert_batchnorm(bn: nnx.BatchNorm, shape: Shape, where: str):
  if not bn.use_running_average:
    raise ValueError(
      f"{where}: nnx.BatchNorm in training mode normalises with the statistics of each batch, "
      "which is not a fixed map; call model.eval() before converting (the certificate is "
      "for the evaluation-mode network, BatchNorm with its running statistics). To fine-tune "
      "with the bound, train in model.eval() mode: the BatchNorm scale and bias still train"
    )
  if bn.axis not in (-1, len(shape)):
    raise ValueError(f"{where}: nnx.BatchNorm(axis={bn.axis}): only the last (channel) axis")
  if shape[-1] != bn.num_features:
    raise ValueError(
      f"{where}: nnx.BatchNorm has num_features={bn.num_features} but its input has shape {shape}"
    )
  params = L.batchnorm_affine(
    mean=bn.mean[...],
    var=bn.var[...],
    epsilon=float(bn.epsilon),
    gamma=bn.scale[...] if bn.use_scale else None,
    beta=bn.bias[...] if bn.use_bias else None,
  )
  return L.BatchNorm(float(bn.epsilon)), params, tuple(shape)


_NOT_READABLE = {
  "LayerNorm": _NORM_FIX,
  "RMSNorm": _NORM_FIX,
  "GroupNorm": _NORM_FIX,
  "InstanceNorm": _NORM_FIX,
  "MultiHeadAttention": _ATTENTION_FIX,
  "MultiHeadDotProductAttention": _ATTENTION_FIX,
  "SelfAttention": _ATTENTION_FIX,
}


def not_eq17_error(f: Any, where: str) -> ValueError | None:
  """The error for a normalisation or attention layer (by class name), else ``None``."""
  for cls in type(f).__mro__:
    if cls.__name__ in _NOT_READABLE:
      return ValueError(f"{where}: " + _NOT_READABLE[cls.__name__].format(name=cls.__name__))
  return None


def _is(f: Any, cls: type) -> bool:
  """``f`` is a ``cls`` that computes what ``cls`` does (a subclass such as
  ``nnx.LoRALinear`` that overrides ``__call__`` is not read as its base)."""
  return isinstance(f, cls) and type(f).__call__ is cls.__call__


def _convert_one(f: Any, shape: Shape, where: str):
  """``(spec, params, out_shape)`` of one NNX layer / function; raises if unknown."""
  if _is(f, nnx.Conv):
    return _convert_conv(f, shape, where)
  if _is(f, nnx.Linear):
    return _convert_linear(f, shape, where)
  if _is(f, Residual):
    return _convert_residual(f, shape, where)
  if _is(f, nnx.BatchNorm):
    return _convert_batchnorm(f, shape, where)
  if _is(f, nnx.Dropout):
    return None, {}, tuple(shape)  # the identity at evaluation
  if isinstance(f, nnx.Module):
    error = not_eq17_error(f, where)
    if error is not None:
      raise error
    raise ValueError(
      f"{where}: {type(f).__name__} is not supported (its __call__ cannot be "
      "read; a trainable-slope nnx.PReLU has no fixed slope bounds: use "
      "functools.partial(nnx.leaky_relu, negative_slope=s)). " + _SUPPORTED
    )
  spec, out = function_spec(f, shape, where)
  return spec, {}, out


def to_layers(
  model: nnx.Sequential, input_shape: Shape, *, fold_batchnorm: bool = False
) -> tuple[tuple, dict[str, Any]]:
  """The crmjax layer specs and params of an NNX model (its evaluation-mode network).

  Args:
    model: an ``nnx.Sequential`` of the layers listed in the module docstring.
    input_shape: one example's shape without the batch axis: ``(H, W, C)`` or ``(D,)``.
    fold_batchnorm: fold each ``nnx.BatchNorm`` that directly follows an ``nnx.Conv`` /
      ``nnx.Linear`` into it (``crmjax.layers.fold_batchnorm``); the same function and
      bounds, one operator fewer.

  Returns:
    ``(layers, params)``: ``crmjax.layers`` specs (``L.Conv`` where a convolution is square
    and symmetric, else ``GeneralConv``; ``L.Dense``, ``L.Flatten``, ``L.Act``,
    ``L.Residual``, ``L.BatchNorm``, ``L.AvgPool``, ``L.GlobalAvgPool``; ``nnx.Dropout`` is
    left out) and ``{'layer_i': {'kernel', 'bias'}}`` (``{'scale', 'bias'}`` of a
    BatchNorm) computed from the NNX variables' values (differentiable under ``nnx.grad``). ``layers.Sequential(layers)
    .apply({'params': params}, x)`` equals ``model(x)``; ``models.Model(name, layers,
    input_shape)`` is a crmjax model for training, attacks and certification.

  Raises:
    ValueError: a layer that cannot be converted, or shapes that do not fit, naming the
      layer (``model.layers[i]``), what is supported and how to proceed.
  """
  if not _is(model, nnx.Sequential):
    raise ValueError(
      f"to_layers needs an nnx.Sequential, got {type(model).__name__}: a custom module's "
      "__call__ cannot be read. Express the network as nnx.Sequential(...) (a custom "
      "module can hold one as an attribute and call it; convert that attribute). " + _SUPPORTED
    )
  shape = tuple(int(d) for d in input_shape)
  if len(shape) not in (1, 3):
    raise ValueError(f"input_shape must be (H, W, C) or (D,) without the batch axis, got {shape}")
  converted = []
  for path, f in _flat_children(model, "model"):
    spec, p, shape = _convert_one(f, shape, path)
    converted.append((spec, p))
  return L.sequential_specs(converted, logits_layer="nnx.Linear", fold=fold_batchnorm)


def to_model(
  model: nnx.Sequential, input_shape: Shape, *, fold_batchnorm: bool = False, name: str = "nnx"
) -> tuple[models.Model, dict[str, Any]]:
  """A crmjax ``Model`` and params computing ``model``'s evaluation-mode logits.

  ``crmjax.certify.certified_radii(*to_model(model, shape), images, labels)`` certifies the
  NNX model: logits and bound both come from the converted network. Args as ``to_layers``.
  """
  shape = tuple(int(d) for d in input_shape)
  layers, params = to_layers(model, shape, fold_batchnorm=fold_batchnorm)
  return models.Model(name, layers, shape), params


def to_lipnet(
  model: nnx.Sequential, input_shape: Shape, *, fold_batchnorm: bool = False
) -> network.LipNet:
  """The eq. 17 form of an NNX model: ``network.from_layers(*to_layers(model, input_shape))``.

  Pure in the model's parameters: call it inside the loss (``nnx.value_and_grad``,
  ``nnx.jit``) and ``liplt.liplt_bound(to_lipnet(model, shape), power, ...)`` gives
  gradients to every ``nnx.Conv`` / ``nnx.Linear`` kernel (biases do not change the bound).

  Args:
    model: an ``nnx.Sequential`` (module docstring).
    input_shape: one example's shape, ``(H, W, C)`` or ``(D,)``.

  Returns:
    The ``network.LipNet`` for ``crmjax.liplt`` and ``crmjax.soundness``.
  """
  layers, params = to_layers(model, input_shape, fold_batchnorm=fold_batchnorm)
  return network.from_layers(layers, params, tuple(int(d) for d in input_shape))
