"""Flax linen models in crmjax: the layer specs, eq. 17 form and certificates of a linen model.

``to_layers(model, variables, input_shape)`` reads a linen model in evaluation mode into
crmjax layer specs (``crmjax.layers``) and a params tree; ``to_lipnet`` is
``network.from_layers`` of those (the loop-transformed form of paper eq. 17 that
``crmjax.liplt`` and ``crmjax.soundness`` bound), ``to_model`` a ``crmjax.models.Model``
that ``crmjax.certify.certified_radii`` certifies. ``variables`` is what ``model.init``
returns and training updates: ``{'params': ..., 'batch_stats': ...}``.

The model is either

* an ``nn.Sequential`` (nested ones are read too): its submodules' params are
  ``variables['params']['layers_i']``, ``i`` the position in its list; or
* any other module (one with its own ``__call__``), described as the list of what its
  ``__call__`` does in order: ``(path, layer)`` pairs for layers with variables (``path``
  names the layer's subtree in ``variables['params']`` and ``variables['batch_stats']``,
  e.g. ``'Conv_0'`` or ``'encoder/Dense_1'``; ``layer`` a linen layer with the same settings,
  whose attributes are read: ``nn.Conv(8, (3, 3), strides=2)``) and plain functions::

    class CNN(nn.Module):
      @nn.compact
      def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.avg_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = nn.Dropout(0.1, deterministic=not train)(x)
        return nn.Dense(10)(x.reshape(x.shape[0], -1))

    steps = [("Conv_0", nn.Conv(8, (3, 3))), ("BatchNorm_0", nn.BatchNorm()), nn.relu,
             functools.partial(nn.avg_pool, window_shape=(2, 2), strides=(2, 2)),
             nn.Dropout(0.1),  # left out (the identity at evaluation); may be omitted
             linen_bridge.Flatten(), ("Dense_0", nn.Dense(10))]
    model, params = linen_bridge.to_model(steps, variables, (28, 28, 1))

  Check the description once:
  ``model.apply(params, x)`` must equal ``CNN().apply(variables, x)`` (``train=False``).

What is read: ``nn.Conv`` (2-D, zero padding, no dilation or feature groups; the rules of
``crmjax.nnx_bridge``), ``nn.Dense`` (on a flat input), ``nn.BatchNorm`` (last axis, with its
running statistics: ``crmjax.layers.BatchNorm``; ``fold_batchnorm=True`` folds it into a
directly preceding conv / dense layer), ``nn.Dropout`` (the identity at evaluation, left
out), and the functions of ``crmjax.nnx_bridge.function_spec``: the activations (``nn.relu``,
``nn.leaky_relu``, ``nn.tanh``, ... or ``nnx_bridge.Activation(fn, slopes)``), a flatten,
``functools.partial(nn.avg_pool, window_shape=.., strides=.., padding=..)`` and a global
spatial mean. Max pooling, ``nn.LayerNorm`` / ``nn.GroupNorm`` / ``nn.RMSNorm`` and attention
are not of the eq. 17 form and raise a ``ValueError`` saying what to use instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn

from crmjax import layers as L
from crmjax import models, network, nnx_bridge

__all__ = ["Flatten", "GlobalAvgPool", "to_layers", "to_lipnet", "to_model"]

Shape = tuple[int, ...]
Flatten = nnx_bridge.Flatten  # the same parameter-free functions as for NNX
GlobalAvgPool = nnx_bridge.GlobalAvgPool

_SUPPORTED = (
  "Supported: nn.Sequential (nested), nn.Conv (2-D, zero padding, no dilation or feature "
  "groups), nn.Dense (on a flat input), nn.BatchNorm (use_running_average=True), nn.Dropout "
  "(left out), activations (nn.relu, nn.leaky_relu via functools.partial(nn.leaky_relu, "
  "negative_slope=s), nn.tanh, nn.sigmoid, nn.relu6, nn.hard_tanh, nn.softplus, or "
  "crmjax.nnx_bridge.Activation(fn, slopes=(alpha, beta))), a flatten "
  "(crmjax.linen_bridge.Flatten() or lambda x: x.reshape(x.shape[0], -1)), "
  "functools.partial(nn.avg_pool, window_shape=.., strides=..), GlobalAvgPool()."
)


def _subtree(tree: Any, path: str, what: str, where: str) -> Mapping:
  node = tree
  for part in path.split("/"):
    if not isinstance(node, Mapping) or part not in node:
      have = sorted(node) if isinstance(node, Mapping) else type(node).__name__
      raise ValueError(
        f"{where}: no {what} at {path!r} (found {have}); name the layer's subtree as "
        "model.init(...) lays it out, e.g. 'Conv_0' or 'block/Dense_1'"
      )
    node = node[part]
  return node


def _conv(conv: nn.Conv, p: Mapping, shape: Shape, where: str):
  kernel = p["kernel"]
  if kernel.ndim != 4:
    raise ValueError(
      f"{where}: a {kernel.ndim - 2}-D nn.Conv; only 2-D convolutions (kernel_size=(kh, kw), "
      "NHWC input) convert"
    )
  if len(shape) != 3 or shape[-1] != kernel.shape[2]:
    raise ValueError(
      f"{where}: nn.Conv with a {kernel.shape[2]}-channel kernel applied to shape {shape}; "
      "check input_shape (H, W, C) and the preceding layers"
    )
  if conv.feature_group_count != 1:
    raise ValueError(f"{where}: feature_group_count={conv.feature_group_count} is not supported")
  for what in ("kernel_dilation", "input_dilation"):
    if nnx_bridge._pair(getattr(conv, what), what, where) != (1, 1):
      raise ValueError(f"{where}: {what}={getattr(conv, what)} is not supported (dilation 1)")
  kernel_size = tuple(int(k) for k in kernel.shape[:2])
  strides = nnx_bridge._pair(conv.strides, "strides", where)
  pads = nnx_bridge._conv_pads(conv.padding, shape[:2], kernel_size, strides, where)
  spec = nnx_bridge._conv_spec(kernel.shape[3], kernel_size, strides, pads, conv.use_bias)
  params = {"kernel": kernel if conv.mask is None else kernel * conv.mask}
  if conv.use_bias:
    params["bias"] = p["bias"]
  out = tuple(spec.operator(params, shape).out_shape)
  if min(out) <= 0:
    raise ValueError(f"{where}: maps the {shape} input to an empty {out} output")
  return spec, params, out


def _dense(dense: nn.Dense, p: Mapping, shape: Shape, where: str):
  kernel = p["kernel"]
  if len(shape) != 1 or shape[0] != kernel.shape[0]:
    raise ValueError(
      f"{where}: nn.Dense with a {kernel.shape[0]}-input kernel applied to shape {shape}; "
      "flatten first (crmjax.linen_bridge.Flatten()) and check input_shape"
    )
  params = {"kernel": kernel, **({"bias": p["bias"]} if dense.use_bias else {})}
  return L.Dense(int(kernel.shape[1]), use_bias=dense.use_bias), params, (int(kernel.shape[1]),)


def _batchnorm(bn: nn.BatchNorm, p: Mapping, stats: Mapping, shape: Shape, where: str):
  if bn.use_running_average is False:
    raise ValueError(
      f"{where}: nn.BatchNorm(use_running_average=False) normalises with each batch's "
      "statistics, not a fixed map; describe it with use_running_average=True (the "
      "evaluation-mode network, which the certificate is for) and apply the model with "
      "train=False"
    )
  if bn.axis not in (-1, len(shape)):
    raise ValueError(f"{where}: nn.BatchNorm(axis={bn.axis}): only the last (channel) axis")
  params = L.batchnorm_affine(
    mean=stats["mean"],
    var=stats["var"],
    epsilon=float(bn.epsilon),
    gamma=p["scale"] if bn.use_scale else None,
    beta=p["bias"] if bn.use_bias else None,
  )
  if params["scale"].shape != (shape[-1],):
    raise ValueError(f"{where}: BatchNorm statistics of shape {stats['mean'].shape} on {shape}")
  return L.BatchNorm(float(bn.epsilon)), params, tuple(shape)


def _module(layer: nn.Module, path: str, variables: Mapping, shape: Shape, where: str):
  """``(spec, params, out_shape)`` of one linen layer with variables at ``path``."""
  if isinstance(layer, nn.Dropout):
    return None, {}, tuple(shape)
  error = nnx_bridge.not_eq17_error(layer, where)
  if error is not None:
    raise error
  kinds = ((nn.Conv, _conv), (nn.Dense, _dense))
  for cls, convert in kinds:
    if type(layer) is cls:
      return convert(layer, _subtree(variables["params"], path, "params", where), shape, where)
  if type(layer) is nn.BatchNorm:
    p = _subtree(variables["params"], path, "params", where) if _bn_has_params(layer) else {}
    stats = _subtree(variables.get("batch_stats", {}), path, "batch_stats", where)
    return _batchnorm(layer, p, stats, shape, where)
  raise ValueError(
    f"{where}: {type(layer).__name__} is not supported (a subclass may compute something "
    "else; describe a custom module as a list of its layers, module docstring). " + _SUPPORTED
  )


def _bn_has_params(bn: nn.BatchNorm) -> bool:
  return bool(bn.use_scale or bn.use_bias)


def _steps(model: Any, prefix: str, where: str) -> list[tuple[str, Any, str]]:
  """``[(where, layer_or_fn, path)]`` of an ``nn.Sequential`` (nested) or a step list."""
  if isinstance(model, nn.Sequential):
    out = []
    for i, layer in enumerate(model.layers):
      path = f"{prefix}layers_{i}"
      if isinstance(layer, nn.Sequential):
        out += _steps(layer, path + "/", f"{where}.layers[{i}]")
      else:
        out.append((f"{where}.layers[{i}]", layer, path))
    return out
  if isinstance(model, nn.Module):
    raise ValueError(
      f"to_layers needs an nn.Sequential or a list describing the model, got "
      f"{type(model).__name__}: a custom module's __call__ cannot be read. Pass "
      "[(path, layer) or function, ...] in the order of its __call__ (crmjax.linen_bridge "
      "module docstring). " + _SUPPORTED
    )
  if not isinstance(model, Sequence) or isinstance(model, str):
    raise ValueError(f"to_layers needs an nn.Sequential or a list of steps, got {model!r}")
  out = []
  for i, step in enumerate(model):
    here = f"steps[{i}]"
    if isinstance(step, tuple) and len(step) == 2 and isinstance(step[0], str):
      if not isinstance(step[1], nn.Module):
        raise ValueError(f"{here}: (path, layer) needs a linen layer, got {step[1]!r}")
      out.append((here, step[1], step[0]))
    elif isinstance(step, nn.Module) and not isinstance(step, nn.Dropout):
      raise ValueError(
        f"{here}: a {type(step).__name__} without the path of its variables; write "
        f"('{type(step).__name__}_0', layer) with the name model.init gave it"
      )
    else:
      out.append((here, step, ""))
  return out


def to_layers(
  model: nn.Sequential | Sequence[Any],
  variables: Mapping[str, Any],
  input_shape: Shape,
  *,
  fold_batchnorm: bool = False,
) -> tuple[tuple, dict[str, Any]]:
  """The crmjax layer specs and params of a linen model's evaluation-mode network.

  Args:
    model: an ``nn.Sequential``, or the list of steps of a custom module (module docstring).
    variables: ``{'params': ..., 'batch_stats': ...}`` as ``model.init`` returns them.
    input_shape: one example's shape without the batch axis: ``(H, W, C)`` or ``(D,)``.
    fold_batchnorm: fold each BatchNorm directly after a conv / dense layer into it
      (``crmjax.layers.fold_batchnorm``): the same function and bounds.

  Returns:
    ``(layers, params)``: ``layers.Sequential(layers).apply({'params': params}, x)`` equals
    the model's logits with ``train=False``; ``params`` holds the linen arrays (BatchNorm as
    ``{'scale', 'bias'}`` of its running statistics), differentiable in them.

  Raises:
    ValueError: a layer or function that cannot be converted, a missing variable subtree,
      or shapes that do not fit, naming the step and what to do.
  """
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise ValueError(
      "variables must be what model.init returns, {'params': ..., 'batch_stats': ...}; got "
      f"{type(variables).__name__} with keys {list(variables) if isinstance(variables, Mapping) else '-'}"
    )
  shape = tuple(int(d) for d in input_shape)
  if len(shape) not in (1, 3):
    raise ValueError(f"input_shape must be (H, W, C) or (D,) without the batch axis, got {shape}")
  converted = []
  for where, step, path in _steps(model, "", "model"):
    if isinstance(step, nn.Module):
      spec, p, shape = _module(step, path, variables, shape, where)
    else:
      spec, shape = nnx_bridge.function_spec(step, shape, where)
      p = {}
    converted.append((spec, p))
  return L.sequential_specs(converted, logits_layer="nn.Dense", fold=fold_batchnorm)


def to_model(
  model: nn.Sequential | Sequence[Any],
  variables: Mapping[str, Any],
  input_shape: Shape,
  *,
  fold_batchnorm: bool = False,
  name: str = "linen",
) -> tuple[models.Model, dict[str, Any]]:
  """A crmjax ``Model`` and params computing the linen model's evaluation-mode logits.

  ``crmjax.certify.certified_radii(*to_model(model, variables, shape), images, labels)``
  certifies it. Args as ``to_layers``.
  """
  shape = tuple(int(d) for d in input_shape)
  layers, params = to_layers(model, variables, shape, fold_batchnorm=fold_batchnorm)
  return models.Model(name, layers, shape), params


def to_lipnet(
  model: nn.Sequential | Sequence[Any],
  variables: Mapping[str, Any],
  input_shape: Shape,
  *,
  fold_batchnorm: bool = False,
) -> network.LipNet:
  """The eq. 17 form (``network.LipNet``) of a linen model; args as ``to_layers``."""
  shape = tuple(int(d) for d in input_shape)
  layers, params = to_layers(model, variables, shape, fold_batchnorm=fold_batchnorm)
  return network.from_layers(layers, params, shape)
