"""Bring your own model: import a PyTorch sequential conv/linear network's weights.

A PyTorch ``state_dict`` holds arrays only (no strides, paddings or activations), so the
architecture comes from crmjax layer specs (``layers=``, e.g.
``crmjax.models.four_c_three_f()``) or, for the plain "conv, ReLU, ..., flatten, linear,
ReLU, ..., linear" pattern, is inferred from the array shapes plus ``conv_strides`` /
``conv_paddings``. The result is a ``crmjax.models.Model`` and its params
``{'layer_i': {'kernel', 'bias'}}``: train, attack or certify it like any crmjax model
(``crmjax.certify.certified_radii(model, params, images, labels)``). BatchNorm (its running
statistics), average pooling and Dropout import as ``crmjax.layers.BatchNorm``,
``AvgPool`` / ``GlobalAvgPool`` and ``Dropout`` (``import_torch_sequential``). With torch at
hand, ``import_torch_module(model, input_shape=...)`` reads the architecture of an
``nn.Sequential`` from its modules (``layers_from_torch``) and the arrays from its state dict.

Layouts (PyTorch -> crmjax):

* images: NCHW -> NHWC, i.e. feed the imported model ``x_nchw.transpose(0, 2, 3, 1)``;
* conv weight ``(O, I, kh, kw)`` -> HWIO kernel ``(kh, kw, I, O)`` (``transpose(2, 3, 1, 0)``);
* linear weight ``(O, I)`` -> kernel ``(I, O)`` (``W.T``);
* flatten: PyTorch flattens a map in ``(C, H, W)`` order, crmjax in ``(H, W, C)`` order, so
  the linear layer right after a flatten of an ``(H, W, C)`` map gets its input rows
  permuted, ``W.reshape(O, C, H, W).transpose(0, 2, 3, 1).reshape(O, -1).T``: the
  imported network computes exactly the PyTorch logits.

Example (runs without torch: a state dict is any mapping of names to numpy arrays)::

  import numpy as np
  from crmjax import importers, liplt
  from crmjax import layers as L

  rng = np.random.default_rng(0)
  sd = {"0.weight": rng.normal(size=(4, 1, 3, 3)), "0.bias": np.zeros(4),  # Conv2d(1, 4, 3, 1, 1)
        "2.weight": rng.normal(size=(10, 4 * 8 * 8)), "2.bias": np.zeros(10)}  # Linear(256, 10)
  layers = (L.Conv(4, 3, stride=1, padding=1), L.Act(), L.Flatten(), L.Dense(10))
  model, params = importers.import_torch_sequential(sd, input_shape=(8, 8, 1), layers=layers)
  logits = model.apply(params, np.zeros((2, 8, 8, 1), np.float32))      # (2, 10)
  bound, _ = liplt.liplt_bound(model.lipnet(params), num_iters=100)     # (10, 10)

  # From a file: importers.load_state_dict("model.npz") (numpy only) or "model.pth" (torch).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from crmjax import layers as L
from crmjax import models

__all__ = [
  "conv_kernel",
  "dense_kernel",
  "group_parameters",
  "import_torch_module",
  "import_torch_sequential",
  "infer_layers",
  "layers_from_torch",
  "load_state_dict",
]

Params = dict[str, dict[str, Any]]
Groups = list[tuple[str, dict[str, np.ndarray]]]

_LEAVES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_BN_STATS = ("running_mean", "running_var")
_TORCH_FIX = (
  "Either `pip install torch`, or convert the checkpoint to .npz where torch is "
  "installed (numpy is enough to read that):\n"
  "  python -c \"import torch, numpy as np; sd = torch.load('model.pth', "
  "map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); "
  "np.savez('model.npz', **{k: v.float().numpy() for k, v in sd.items()})\""
)


# --------------------------------------------------------------------------- files


def _unwrap(obj: Any) -> Mapping[str, Any]:
  """``{'state_dict': {...}}`` (Lightning & co.) -> the inner dict; ``module.`` dropped."""
  while isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise ValueError(
      f"expected a state dict (a mapping of names to arrays), got "
      f"{type(obj).__name__}; save `model.state_dict()`, not the model"
    )
  if obj and all(k.startswith("module.") for k in obj):  # nn.DataParallel wrapper
    obj = {k[len("module.") :]: v for k, v in obj.items()}
  return obj


def _to_numpy(v: Any) -> np.ndarray:
  if hasattr(v, "detach"):  # a torch.Tensor
    v = v.detach().cpu()
    if v.is_floating_point():
      v = v.float()  # bfloat16 / float16 have no (exact) numpy counterpart
    return v.numpy()
  return np.asarray(v)


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a PyTorch-layout state dict from ``.npz`` (numpy) or ``.pth`` / ``.pt`` (torch).

  Args:
    path: an ``.npz`` written by ``np.savez(path, **state_dict)``, or a ``.pth`` / ``.pt``
      written by ``torch.save(model.state_dict(), path)``. A ``{'state_dict': ...}``
      wrapper (as written by e.g. PyTorch Lightning) is unwrapped, and a ``module.`` prefix
      on every name (``nn.DataParallel``) is dropped.

  Returns:
    ``{name: array}`` in the file's order, arrays in PyTorch layout (conv ``(O, I, kh,
    kw)``, linear ``(O, I)``, bias ``(O,)``).

  Raises:
    ImportError: a ``.pth`` / ``.pt`` file while torch is not installed (with the fix).
    ValueError: an unknown file extension, or a file that holds no state dict.
  """
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  if ext == ".npz":
    with np.load(path, allow_pickle=False) as f:
      sd = {k: f[k] for k in f.files}
    if len(sd) == 1 and "state_dict" in sd:
      raise ValueError(
        f"{path}: holds one array 'state_dict'; save the arrays themselves, "
        "np.savez(path, **state_dict)"
      )
    if sd and all(k.startswith("state_dict.") for k in sd):  # a flattened wrapper
      sd = {k[len("state_dict.") :]: v for k, v in sd.items()}
    return {k: np.asarray(v) for k, v in _unwrap(sd).items()}
  if ext in (".pth", ".pt"):
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError(
        f"reading {path} needs PyTorch, which is not installed. " + _TORCH_FIX
      ) from e
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return {k: _to_numpy(v) for k, v in _unwrap(obj).items()}
  raise ValueError(f"{path}: unknown extension {ext!r}; expected .npz, .pth or .pt")


# --------------------------------------------------------------------------- names


def _natural_key(prefix: str) -> tuple[int, ...]:
  return tuple(int(d) for d in re.findall(r"\d+", prefix))


def _module_group(prefix: str) -> str:
  return re.sub(r"\d+", "#", prefix)


def group_parameters(state_dict: Mapping[str, Any], order: Sequence[str] | None = None) -> Groups:
  """Splits a state dict into layers ``[(prefix, {'weight': .., 'bias': ..})]``, in order.

  A name ``<prefix>.<leaf>`` (``leaf`` is ``weight`` or ``bias``; a bare ``weight`` has
  prefix ``''``) belongs to layer ``prefix``. The layer order is:

  * ``order`` when given: exactly these prefixes, in this order (every layer of the state
    dict must be listed, every listed prefix must exist);
  * otherwise: prefixes are grouped by their module pattern, the prefix with every digit
    run replaced by ``#`` (``features.0`` and ``features.10`` -> ``features.#``;
    ``classifier.1`` -> ``classifier.#``; ``conv1`` -> ``conv#``; ``0`` -> ``#``). Groups
    come in order of first appearance in ``state_dict``; inside a group, prefixes are
    sorted by the tuple of their integers (numerically: ``2`` before ``10``).

  So ``features.*`` before ``classifier.*`` (as PyTorch registers them) and
  ``linear.3`` after ``linear.1`` whatever the dict order. Use ``order`` where this rule
  does not give the forward order (e.g. ``fc.weight`` registered before ``conv.weight``).

  BatchNorm's ``running_mean`` / ``running_var`` belong to its layer like ``weight`` and
  ``bias``; its ``num_batches_tracked`` counter is dropped.

  Raises:
    ValueError: a name that is not ``*.weight`` / ``*.bias`` / a BatchNorm statistic, or an
      ``order`` that does not match the state dict.
  """
  layers: dict[str, dict[str, np.ndarray]] = {}
  for name, value in state_dict.items():
    prefix, _, leaf = name.rpartition(".")
    if leaf not in _LEAVES:
      raise ValueError(
        f"state dict entry {name!r}: only '<layer>.weight' and '<layer>.bias' of "
        "Conv2d / Linear layers and BatchNorm's weight, bias, running_mean and running_var "
        "can be imported; drop buffers the forward pass does not use."
      )
    if leaf == "num_batches_tracked":  # BatchNorm's step counter: not used at evaluation
      continue
    layers.setdefault(prefix, {})[leaf] = np.asarray(_to_numpy(value))
  if order is not None:
    order = list(order)
    unknown = [p for p in order if p not in layers]
    if unknown:
      raise ValueError(
        f"order={order}: {unknown} not found in the state dict; its layers are {list(layers)}"
      )
    if len(set(order)) != len(order):
      raise ValueError(f"order={order} lists a layer twice")
    extra = [p for p in layers if p not in order]
    if extra:
      raise ValueError(
        f"extra arrays in the state dict: layers {extra} are not in "
        f"order={order}; add them to order= (or delete them from the dict)"
      )
    return [(p, layers[p]) for p in order]
  groups: dict[str, list[str]] = {}
  for p in layers:
    groups.setdefault(_module_group(p), []).append(p)
  return [(p, layers[p]) for members in groups.values() for p in sorted(members, key=_natural_key)]


# --------------------------------------------------------------------------- arrays


def conv_kernel(weight: np.ndarray) -> np.ndarray:
  """PyTorch conv weight ``(O, I, kh, kw)`` -> Flax HWIO kernel ``(kh, kw, I, O)``."""
  return np.transpose(np.asarray(weight), (2, 3, 1, 0))


def dense_kernel(
  weight: np.ndarray, flattened_from: tuple[int, int, int] | None = None
) -> np.ndarray:
  """PyTorch linear weight ``(O, I)`` -> Flax kernel ``(I, O)``.

  Args:
    weight: ``(O, I)``.
    flattened_from: the ``(H, W, C)`` map this layer's input was flattened from
      (``I = H * W * C``), or ``None`` for a flat input. PyTorch's input index is
      ``(c, h, w)``, crmjax's ``(h, w, c)``: the rows are reordered to match.

  Returns:
    ``(I, O)``: ``x_hwc_flat @ kernel == x_chw_flat @ weight.T``.
  """
  weight = np.asarray(weight)
  if flattened_from is None:
    return weight.T
  h, w, c = flattened_from
  o = weight.shape[0]
  return weight.reshape(o, c, h, w).transpose(0, 2, 3, 1).reshape(o, -1).T


# --------------------------------------------------------------------------- architecture


def _per_conv(value, n: int, what: str) -> list | None:
  if value is None:
    return None
  if isinstance(value, (int, np.integer)):
    return [int(value)] * n
  value = list(value)
  if len(value) != n:
    raise ValueError(
      f"{what} has {len(value)} entries but the state dict has {n} conv "
      "layers (give one per conv, or a single int for all)"
    )
  return [int(v) for v in value]


def infer_layers(
  groups: Groups,
  input_shape: tuple[int, ...],
  *,
  conv_strides: Sequence[int] | int | None = None,
  conv_paddings: Sequence[int] | int | None = None,
) -> tuple:
  """Layer specs for ``conv, ReLU, ..., conv, ReLU, flatten, linear, ReLU, ..., linear``.

  A 4-D weight is a ``Conv`` (square kernels only), a 2-D one a ``Dense``, a layer with
  ``running_mean`` a ``BatchNorm`` (``eps = 1e-5``, PyTorch's default) right after the
  preceding layer; ``Act()`` (ReLU) goes between consecutive conv / linear layers (after
  their BatchNorm), ``Flatten()`` before the first dense layer that
  sees an ``(H, W, C)`` map. Strides and paddings are not in a state dict: ``conv_strides``
  and ``conv_paddings`` (one int per conv, or one int for all) say what they are; if only
  one is given the other defaults to stride 1 / padding ``kernel_size // 2`` ("same" for
  odd kernels). With neither (and any conv), this raises: pass ``layers=`` instead.
  """
  kinds = ["bn" if "running_mean" in g else np.ndim(g.get("weight")) for _, g in groups]
  n_conv = sum(k == 4 for k in kinds)
  if n_conv and conv_strides is None and conv_paddings is None:
    convs = [p for (p, _), k in zip(groups, kinds) if k == 4]
    raise ValueError(
      f"the state dict has {n_conv} conv layer(s) ({convs}) but a state dict does not "
      "record strides or paddings: pass layers= (crmjax.layers specs of the PyTorch "
      "model, e.g. (Conv(32, 3, stride=1, padding=1), Act(), ..., Flatten(), Dense(10))), "
      "or conv_strides=[...] and conv_paddings=[...] (one per conv)"
    )
  strides = _per_conv(conv_strides, n_conv, "conv_strides")
  paddings = _per_conv(conv_paddings, n_conv, "conv_paddings")
  out: list = []
  spatial = len(input_shape) == 3
  j = 0
  for (prefix, g), kind in zip(groups, kinds):
    if kind == "bn":
      out.append(L.BatchNorm())
      continue
    if "weight" not in g:
      raise ValueError(
        f"layer {prefix!r}: missing array {prefix + '.weight'!r} "
        f"(found only {sorted(g)}); fix the state dict or pass order="
      )
    w = g["weight"]
    if out:
      out.append(L.Act())
    if kind == 4:
      if not spatial:
        raise ValueError(
          f"layer {prefix!r}: a conv weight {w.shape} after a flatten / on "
          "a flat input; pass layers= or order= to describe the model"
        )
      if w.shape[2] != w.shape[3]:
        raise ValueError(
          f"layer {prefix!r}: non-square conv kernel {w.shape[2:]} is not "
          "supported (crmjax.layers.Conv has square kernels)"
        )
      k = int(w.shape[2])
      s = strides[j] if strides is not None else 1
      p = paddings[j] if paddings is not None else k // 2
      out.append(L.Conv(int(w.shape[0]), k, stride=s, padding=p, use_bias="bias" in g))
      j += 1
    elif kind == 2:
      if spatial:
        out.append(L.Flatten())
        spatial = False
      out.append(L.Dense(int(w.shape[0]), use_bias="bias" in g))
    else:
      raise ValueError(
        f"layer {prefix!r}: weight of shape {w.shape} is neither a Conv2d "
        "(O, I, kh, kw) nor a Linear (O, I) weight; only those import"
      )
  if not out:
    raise ValueError("the state dict has no '<layer>.weight' arrays")
  return tuple(out)


def _spec_str(layer) -> str:
  fields = ", ".join(f"{f.name}={getattr(layer, f.name)!r}" for f in dataclasses.fields(layer))
  return f"{type(layer).__name__}({fields})"


def _convert(layers: tuple, groups: Groups, input_shape: tuple[int, ...]) -> Params:
  """Checks every array against ``layers`` and converts them; ``{'layer_i': {...}}``."""
  params: Params = {}
  shape = tuple(input_shape)
  flattened_from: tuple[int, int, int] | None = None
  queue = list(groups)
  n_weight_layers = sum(isinstance(l, (L.Conv, L.Dense, L.BatchNorm)) for l in layers)
  for i, layer in enumerate(layers):
    where = f"layer_{i} {_spec_str(layer)}"
    if isinstance(layer, (L.Act, L.Normalize, L.Dropout)):
      continue
    if isinstance(layer, L.Flatten):
      flattened_from = shape if len(shape) == 3 else None
      shape = (int(np.prod(shape)),)
      continue
    if isinstance(layer, (L.AvgPool, L.GlobalAvgPool)):
      shape = tuple(layer.operator({}, shape).out_shape)
      continue
    if isinstance(layer, L.BatchNorm):
      if not queue:
        raise ValueError(
          f"{where}: missing BatchNorm arrays: all {len(groups)} layers of the state dict are "
          "used up. Fix: pass the layers= of the model that wrote the state dict"
        )
      params[f"layer_{i}"] = _batchnorm(layer, *queue.pop(0), shape, flattened_from, where)
      continue
    if not isinstance(layer, (L.Conv, L.Dense)):
      raise ValueError(
        f"{where}: only Conv, Dense, BatchNorm, AvgPool, GlobalAvgPool, Dropout, Flatten, "
        "Normalize and Act layers can be imported from a sequential PyTorch model"
      )
    if isinstance(layer, L.Conv):
      if len(shape) != 3:
        raise ValueError(f"{where}: a Conv needs an (H, W, C) input, got {shape}")
      h, w, c = shape
      k, s, p = layer.kernel_size, layer.stride, layer.padding
      expected = (layer.features, c, k, k)
      layout = "(O, I, kh, kw)"
      oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
      if oh <= 0 or ow <= 0:
        raise ValueError(
          f"{where}: maps the {shape} input to an empty {(oh, ow)} output; "
          "check input_shape and the conv strides / paddings"
        )
      new_shape = (oh, ow, layer.features)
    else:
      if len(shape) != 1:
        raise ValueError(
          f"{where}: a Dense needs a flat input, got {shape}: put Flatten() before it in layers="
        )
      expected = (layer.features, shape[0])
      layout = "(O, I)"
      new_shape = (layer.features,)
    if not queue:
      raise ValueError(
        f"{where}: missing array: expects a PyTorch weight of shape {expected} {layout}, "
        f"but all {len(groups)} weight layers of the state dict are used up "
        f"(layers= has {n_weight_layers}). Fix: pass the layers= of the model that "
        "wrote the state dict, or load the complete state dict"
      )
    prefix, g = queue.pop(0)
    wname, bname = f"{prefix}.weight".lstrip("."), f"{prefix}.bias".lstrip(".")
    if "running_mean" in g:
      raise ValueError(
        f"{where}: the state dict's layer {prefix!r} is a BatchNorm (it has running_mean); "
        "add L.BatchNorm() to layers= where the PyTorch model has it"
      )
    if "weight" not in g:
      raise ValueError(
        f"{where}: missing array {wname!r} (shape {expected} {layout}); the "
        f"state dict has only {sorted(prefix + '.' + n for n in g)}. Fix: "
        "add it, or pass order= to match layers to names"
      )
    weight = g["weight"]
    if tuple(weight.shape) != expected:
      raise ValueError(
        f"{where}: array {wname!r} has shape {tuple(weight.shape)}, expected {expected} "
        f"{layout}. Fix: make layers= match the PyTorch model (features, kernel size, "
        "strides and paddings, which set the flattened size) and input_shape=(H, W, C) "
        "match its input, or pass order= if the layers are taken in the wrong order"
      )
    if layer.use_bias and "bias" not in g:
      raise ValueError(
        f"{where}: missing array {bname!r} (shape {(layer.features,)}). Fix: "
        "use_bias=False in layers= if the PyTorch layer has bias=False"
      )
    if not layer.use_bias and "bias" in g:
      raise ValueError(
        f"{where}: extra array {bname!r}: the layer has use_bias=False. Fix: "
        "use_bias=True in layers="
      )
    p_i = {}
    if isinstance(layer, L.Conv):
      p_i["kernel"] = conv_kernel(weight)
      flattened_from = None
    else:
      p_i["kernel"] = dense_kernel(weight, flattened_from)
      flattened_from = None
    if layer.use_bias:
      bias = g["bias"]
      if tuple(bias.shape) != (layer.features,):
        raise ValueError(
          f"{where}: array {bname!r} has shape {tuple(bias.shape)}, expected "
          f"{(layer.features,)}. Fix: make layers= match the PyTorch model"
        )
      p_i["bias"] = bias
    params[f"layer_{i}"] = {k: jnp.asarray(v, jnp.float32) for k, v in p_i.items()}
    shape = new_shape
  if queue:
    extra = [n for pfx, g in queue for n in (f"{pfx}.{leaf}".lstrip(".") for leaf in g)]
    raise ValueError(
      f"extra arrays: {extra} are left over after the {n_weight_layers} Conv/Dense "
      "layers of layers=. Fix: add the missing layers to layers=, or delete those "
      "entries from the state dict"
    )
  return params


def _batchnorm(
  layer: L.BatchNorm,
  prefix: str,
  g: dict[str, np.ndarray],
  shape: tuple[int, ...],
  flattened_from: tuple[int, int, int] | None,
  where: str,
) -> dict[str, Any]:
  """``{'scale', 'bias'}`` (float32) of a PyTorch ``BatchNorm1d`` / ``BatchNorm2d`` layer."""
  c = shape[-1]
  missing = [leaf for leaf in _BN_STATS if leaf not in g]
  if missing:
    raise ValueError(
      f"{where}: the state dict's layer {prefix!r} ({sorted(g)}) is not a BatchNorm: it lacks "
      f"{missing}. Fix: make layers= match the PyTorch model, or pass order="
    )
  if flattened_from is not None:
    raise ValueError(
      f"{where}: a BatchNorm1d right after flattening an {flattened_from} map normalises "
      "PyTorch's (C, H, W)-ordered features; not supported: put a Dense between them, or "
      "normalise the map before flattening"
    )
  for leaf, v in g.items():
    if tuple(np.shape(v)) != (c,):
      raise ValueError(
        f"{where}: array '{prefix}.{leaf}' has shape {tuple(np.shape(v))}, expected {(c,)} "
        f"(one per channel of the {shape} input)"
      )
  with np.errstate(all="ignore"):
    var = np.asarray(g["running_var"], np.float64)
    if not np.all(var + layer.epsilon > 0):
      raise ValueError(f"{where}: '{prefix}.running_var' + eps must be positive")
    scale = 1.0 / np.sqrt(var + layer.epsilon)
  if "weight" in g:
    scale = scale * np.asarray(g["weight"], np.float64)
  bias = -np.asarray(g["running_mean"], np.float64) * scale
  if "bias" in g:
    bias = bias + np.asarray(g["bias"], np.float64)
  return {"scale": jnp.asarray(scale, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}


def import_torch_sequential(
  state_dict: Mapping[str, Any],
  *,
  input_shape: tuple[int, ...],
  layers: tuple | None = None,
  normalize: tuple[Sequence[float], Sequence[float]] | None = None,
  order: Sequence[str] | None = None,
  conv_strides: Sequence[int] | int | None = None,
  conv_paddings: Sequence[int] | int | None = None,
  name: str = "imported",
) -> tuple[models.Model, Params]:
  """A crmjax ``Model`` and params computing the logits of a sequential PyTorch network.

  The PyTorch model is ``nn.Sequential``-like: ``Conv2d`` / ``Linear`` layers with ReLU
  (or, via ``layers=``, any ``crmjax.layers.Act``) between them and one flatten between the
  last conv and the first linear layer. In evaluation mode (``model.eval()``) its
  ``BatchNorm1d`` / ``BatchNorm2d`` (``L.BatchNorm(eps)``: the running statistics become a
  per-channel affine map), ``AvgPool2d`` (``L.AvgPool(kernel_size, stride, padding,
  count_include_pad)``), ``AdaptiveAvgPool2d((1, 1))`` + flatten (``L.GlobalAvgPool()``)
  and ``Dropout`` (``L.Dropout()``, the identity, or left out) are of the eq. 17 form;
  ``MaxPool2d``, ``LayerNorm`` and attention are not. Pooling and dropout hold no arrays:
  describe them in ``layers=``.

  Args:
    state_dict: ``{name: array}`` in PyTorch layout, e.g. ``model.state_dict()`` or
      ``load_state_dict(path)``: conv weights ``(O, I, kh, kw)``, linear ``(O, I)``,
      biases ``(O,)``. Layers are taken in the order of ``group_parameters``.
    input_shape: one image's ``(H, W, C)`` (PyTorch's ``(C, H, W)`` reordered), or
      ``(D,)`` for a flat-input MLP.
    layers: crmjax layer specs of the PyTorch model (strides and paddings cannot be read
      from a state dict), e.g. ``crmjax.models.four_c_three_f()``; every array is checked
      against them. ``None``: infer them (``infer_layers``), which needs ``conv_strides``
      and/or ``conv_paddings`` if there is any conv.
    normalize: optional ``(mean, std)`` per channel, the PyTorch input transform; becomes
      a fixed first ``Normalize`` layer so the model takes [0, 1] pixels (inside the
      Lipschitz bound, as in ``crmjax.models.get_model``).
    order: explicit layer-name prefixes in forward order (``['conv1', 'conv2', 'fc1']``);
      overrides the default ordering rule.
    conv_strides: with ``layers=None``: each conv's stride (list, or one int for all).
    conv_paddings: with ``layers=None``: each conv's symmetric zero padding.
    name: the returned model's name.

  Returns:
    ``(model, params)``: ``model.apply(params, x_nhwc)`` with ``x_nhwc =
    x_nchw.transpose(0, 2, 3, 1)`` is ``(B, K)``, equal to the PyTorch logits up to float32
    rounding; ``params`` is ``{'layer_i': {'kernel', 'bias'}}`` (float32).

  Raises:
    ValueError: a missing, extra or mis-shaped array (naming the layer, the expected and
      the found shape, and the fix), unsupported entries (unknown buffers, non-square
      kernels), or convs without ``layers=`` / ``conv_strides`` / ``conv_paddings``.
  """
  input_shape = tuple(int(d) for d in input_shape)
  if len(input_shape) not in (1, 3):
    raise ValueError(
      f"input_shape must be (H, W, C) (or (D,) for a flat input), got "
      f"{input_shape}; a PyTorch (C, H, W) input is (H, W, C) here"
    )
  groups = group_parameters(state_dict, order)
  if layers is None:
    layers = infer_layers(
      groups, input_shape, conv_strides=conv_strides, conv_paddings=conv_paddings
    )
  elif conv_strides is not None or conv_paddings is not None:
    raise ValueError(
      "conv_strides / conv_paddings are only for layers=None; with layers= "
      "put stride and padding into its Conv specs"
    )
  layers = tuple(layers)
  if normalize is not None:
    mean, std = (tuple(float(v) for v in a) for a in normalize)
    layers = (L.Normalize(mean, std),) + layers
  if not layers or not isinstance(layers[-1], L.Dense):
    raise ValueError("layers= must end with the Dense layer giving the logits")
  params = _convert(layers, groups, input_shape)
  return models.Model(name, layers, input_shape), params


# --------------------------------------------------------------------------- torch modules

_NOT_EQ17 = "is not of the form H x + G phi(W x) of eq. 17, so LipLT cannot bound it"
_TORCH_ERRORS = {
  "MaxPool2d": "max pooling " + _NOT_EQ17 + "; use AvgPool2d or a strided Conv2d and fine-tune",
  "AdaptiveMaxPool2d": "max pooling " + _NOT_EQ17 + "; use AdaptiveAvgPool2d((1, 1))",
  "LayerNorm": "LayerNorm divides by a statistic of its input: it " + _NOT_EQ17,
  "GroupNorm": "GroupNorm divides by a statistic of its input: it " + _NOT_EQ17,
  "InstanceNorm2d": "InstanceNorm divides by a statistic of its input: it " + _NOT_EQ17,
  "MultiheadAttention": "attention multiplies inputs with each other: it " + _NOT_EQ17,
}
_TORCH_ACTS = {"ReLU": L.Act(), "Tanh": L.Act("tanh"), "Sigmoid": L.Act("sigmoid")}


def _square(value, what: str, where: str) -> int:
  v = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
  if len(v) != 2 or v[0] != v[1]:
    raise ValueError(f"{where}: {what}={value} is not square; only square settings import")
  return int(v[0])


def _torch_conv(m, where: str) -> L.Conv:
  if m.groups != 1 or _square(m.dilation, "dilation", where) != 1:
    raise ValueError(f"{where}: grouped or dilated convolutions are not supported")
  if m.padding_mode != "zeros":
    raise ValueError(f"{where}: padding_mode={m.padding_mode!r}: only zero padding imports")
  k = _square(m.kernel_size, "kernel_size", where)
  if isinstance(m.padding, str):
    if m.padding == "same" and k % 2 == 0:
      raise ValueError(f"{where}: padding='same' with an even kernel pads asymmetrically")
    pad = 0 if m.padding == "valid" else k // 2
  else:
    pad = _square(m.padding, "padding", where)
  stride = _square(m.stride, "stride", where)
  return L.Conv(int(m.out_channels), k, stride=stride, padding=pad, use_bias=m.bias is not None)


def _torch_layer(m, where: str):
  """The crmjax spec of one PyTorch module (duck-typed by class name), ``None`` to drop it."""
  kind = type(m).__name__
  if kind in _TORCH_ERRORS:
    raise ValueError(f"{where}: {_TORCH_ERRORS[kind]}")
  if kind in ("Dropout", "Dropout1d", "Dropout2d", "Identity"):
    return None
  if kind in _TORCH_ACTS:
    return _TORCH_ACTS[kind]
  if kind == "LeakyReLU":
    return L.Act("leaky_relu", negative_slope=float(m.negative_slope))
  if kind == "Conv2d":
    return _torch_conv(m, where)
  if kind == "Linear":
    return L.Dense(int(m.out_features), use_bias=m.bias is not None)
  if kind in ("BatchNorm1d", "BatchNorm2d"):
    if not m.track_running_stats:
      raise ValueError(
        f"{where}: BatchNorm without running statistics normalises every batch by itself; "
        "it has no fixed evaluation map"
      )
    return L.BatchNorm(float(m.eps))
  if kind == "AvgPool2d":
    if m.ceil_mode or m.divisor_override is not None:
      raise ValueError(f"{where}: AvgPool2d with ceil_mode or divisor_override is not supported")
    stride = m.stride if m.stride is not None else m.kernel_size
    return L.AvgPool(m.kernel_size, stride, m.padding, bool(m.count_include_pad))
  if kind == "AdaptiveAvgPool2d":
    if m.output_size not in (1, (1, 1), [1, 1]):
      raise ValueError(f"{where}: AdaptiveAvgPool2d({m.output_size}): only (1, 1) imports")
    return L.GlobalAvgPool()
  if kind == "Flatten":
    if m.start_dim != 1 or m.end_dim != -1:
      raise ValueError(f"{where}: Flatten(start_dim=1, end_dim=-1) only")
    return L.Flatten()
  raise ValueError(
    f"{where}: {kind} is not supported. Supported: Sequential, Conv2d, Linear, BatchNorm1d/2d, "
    "AvgPool2d, AdaptiveAvgPool2d((1, 1)), Flatten, Dropout, ReLU, LeakyReLU, Tanh, Sigmoid; "
    "or pass layers= (crmjax.layers specs) to import_torch_sequential"
  )


def layers_from_torch(module: Any, where: str = "model") -> tuple:
  """crmjax layer specs of a PyTorch ``nn.Sequential`` (nested ones are flattened).

  Reads each module's settings (strides, paddings, eps, pool sizes) by class name and
  attributes, so torch itself is not imported here. ``GlobalAvgPool`` stands for
  ``AdaptiveAvgPool2d((1, 1))`` (its flatten follows as usual); Dropout is left out.

  Raises:
    ValueError: a module that is not of the eq. 17 form (max pooling, LayerNorm, attention)
      or not readable, naming it (``model[i]``) and what to do.
  """
  out = []
  for i, m in enumerate(module.children()):
    here = f"{where}[{i}]"
    if type(m).__name__ == "Sequential":
      out.extend(layers_from_torch(m, here))
      continue
    spec = _torch_layer(m, here)
    if spec is not None:
      out.append(spec)
  return tuple(out)


def import_torch_module(
  module: Any,
  *,
  input_shape: tuple[int, ...],
  normalize: tuple[Sequence[float], Sequence[float]] | None = None,
  name: str = "imported",
) -> tuple[models.Model, Params]:
  """``import_torch_sequential(module.state_dict(), layers=layers_from_torch(module))``.

  One call for a PyTorch ``nn.Sequential`` (e.g. ``Conv2d, BatchNorm2d, ReLU, AvgPool2d,
  Dropout, ..., Flatten, Linear``): the architecture is read from the modules, the arrays
  (BatchNorm's running statistics included) from the state dict, in registration order.
  """
  layers = layers_from_torch(module)
  return import_torch_sequential(
    module.state_dict(), input_shape=input_shape, layers=layers, normalize=normalize, name=name
  )
