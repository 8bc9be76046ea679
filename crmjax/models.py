"""The paper's architectures as layer specs, a registry by name, and their LipLT form.

Every model is ``crmjax.layers.Sequential(layers)``; ``Model.lipnet(params)`` builds its
eq. 17 form for the bounds, generically (``crmjax.network.from_layers``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from crmjax import controlled as C
from crmjax import layers as L
from crmjax import network


def _c(features, k, s, p):
  return L.Conv(features, k, s, p)


def four_c_three_f(num_classes: int = 10) -> tuple:
  """4C3F (MNIST): 4 convolutions, then dense 512, 512, K."""
  return (
    _c(32, 3, 1, 1),
    L.Act(),
    _c(32, 4, 2, 1),
    L.Act(),
    _c(64, 3, 1, 1),
    L.Act(),
    _c(64, 4, 2, 1),
    L.Act(),
    L.Flatten(),
    L.Dense(512),
    L.Act(),
    L.Dense(512),
    L.Act(),
    L.Dense(num_classes),
  )


def six_c_two_f(num_classes: int = 10) -> tuple:
  """6C2F (CIFAR-10): 6 convolutions, then dense 512, K."""
  return (
    _c(32, 3, 1, 1),
    L.Act(),
    _c(32, 4, 2, 1),
    L.Act(),
    _c(64, 3, 1, 1),
    L.Act(),
    _c(64, 4, 2, 1),
    L.Act(),
    _c(64, 3, 1, 1),
    L.Act(),
    _c(64, 4, 2, 1),
    L.Act(),
    L.Flatten(),
    L.Dense(512),
    L.Act(),
    L.Dense(num_classes),
  )


def eight_c_two_f(num_classes: int = 200) -> tuple:
  """8C2F (Tiny-ImageNet, 64x64x3): 8 convolutions, then dense 256 (from 6x6x256), K."""
  return (
    _c(64, 3, 1, 1),
    L.Act(),
    _c(64, 3, 1, 1),
    L.Act(),
    _c(64, 4, 2, 0),
    L.Act(),
    _c(128, 3, 1, 1),
    L.Act(),
    _c(128, 3, 1, 1),
    L.Act(),
    _c(128, 4, 2, 0),
    L.Act(),
    _c(256, 3, 1, 1),
    L.Act(),
    _c(256, 4, 2, 0),
    L.Act(),
    L.Flatten(),
    L.Dense(256),
    L.Act(),
    L.Dense(num_classes),
  )


def res_4c3f(num_classes: int = 10) -> tuple:
  """A small residual variant of 4C3F: two ``x + conv(relu(conv x))`` blocks (H = I)."""
  return (
    _c(32, 3, 1, 1),
    L.Act(),
    L.Residual((_c(32, 3, 1, 1), L.Act(), _c(32, 3, 1, 1))),
    _c(64, 4, 2, 1),
    L.Act(),
    L.Residual((_c(64, 3, 1, 1), L.Act(), _c(64, 3, 1, 1))),
    _c(64, 4, 2, 1),
    L.Act(),
    L.Flatten(),
    L.Dense(512),
    L.Act(),
    L.Dense(num_classes),
  )


def mlp(num_classes: int = 10, hidden: tuple[int, ...] = (256, 256)) -> tuple:
  """A small multilayer perceptron (flatten, then dense layers)."""
  body = tuple(x for h in hidden for x in (L.Dense(h), L.Act()))
  return (L.Flatten(),) + body + (L.Dense(num_classes),)


def res_mlp(num_classes: int = 10, width: int = 64, blocks: int = 2) -> tuple:
  """A small residual MLP: flatten, dense ``width`` + ReLU, ``blocks`` x ``x + W2 relu(W1 x)``."""
  res = L.Residual((L.Dense(width), L.Act(), L.Dense(width)))
  return (L.Flatten(), L.Dense(width), L.Act()) + (res,) * blocks + (L.Dense(num_classes),)


def ctrl_conv(
  num_classes: int = 10, width: int = 16, depth: int = 2, dense: int = 128, rescaling: str = "aol"
) -> tuple:
  """CtrlConv (MNIST-size): Proposition 3.1 layers (``crmjax.controlled``) in a LipNet.

  A lifting conv (``width`` channels) + ReLU, ``depth`` controlled 3x3 convs (``rho = 1``:
  each 1-Lipschitz, ``H = I``), a strided conv (``2 width`` channels, half resolution) +
  ReLU, flatten, dense ``dense`` + ReLU, two controlled dense layers (``rho = 1``), dense K.
  On 28x28x1: 28x28x16 -> 14x14x32 -> 128 -> K; ``depth + 5`` blocks of eq. 17 (7 by
  default). ``rescaling``: ``'aol'`` or ``'sll'`` for every controlled layer.
  """
  conv = C.Controlled("conv", width, rescaling=rescaling)
  fc = C.Controlled("dense", dense, rescaling=rescaling)
  return (
    (_c(width, 3, 1, 1), L.Act())
    + (conv,) * depth
    + (
      _c(2 * width, 4, 2, 1),
      L.Act(),
      L.Flatten(),
      L.Dense(dense),
      L.Act(),
      fc,
      fc,
      L.Dense(num_classes),
    )
  )


ARCHITECTURES: dict[str, Callable[..., tuple]] = {
  "4C3F": four_c_three_f,
  "6C2F": six_c_two_f,
  "8C2F": eight_c_two_f,
  "Res4C3F": res_4c3f,
  "MLP": mlp,
  "ResMLP": res_mlp,
  "CtrlConv": ctrl_conv,
}


INIT_SCHEMES = ("flax", "torch")


def torch_default_init(params, key: jax.Array):
  """Redraws every ``kernel`` and ``bias`` as PyTorch's default layer init does.

  PyTorch initialises ``nn.Conv2d`` / ``nn.Linear`` weights with
  ``kaiming_uniform_(a=sqrt(5))`` and biases with ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``;
  both are ``U(-b, b)`` with ``b = 1 / sqrt(fan_in)`` (kaiming's gain ``sqrt(2 / (1 + 5))``
  times ``sqrt(3 / fan_in)``). ``fan_in`` is the product of all but the last kernel axis
  (``kh * kw * c_in`` for Flax's HWIO convolution kernels, ``d_in`` for dense ones). Each
  kernel's standard deviation is ``1 / sqrt(3 fan_in)``, ``sqrt(3)`` below Flax's LeCun
  normal, so a depth-L network starts with a Lipschitz bound ~``3^(L/2)`` smaller.

  Args:
    params: a params tree whose layers are dicts with ``kernel`` (and ``bias``).
    key: PRNG key.

  Returns:
    The same tree with new kernels and biases; other leaves are kept.
  """

  def redraw(tree, key):
    if not isinstance(tree, dict):
      return tree
    out = {}
    for i, name in enumerate(sorted(tree)):
      out[name] = redraw(tree[name], jax.random.fold_in(key, i))
    if "kernel" in tree and getattr(tree["kernel"], "ndim", 0) >= 2:
      kernel = tree["kernel"]
      bound = 1.0 / math.sqrt(math.prod(kernel.shape[:-1]))
      kk, kb = jax.random.split(jax.random.fold_in(key, len(tree)))
      out["kernel"] = jax.random.uniform(kk, kernel.shape, kernel.dtype, -bound, bound)
      if "bias" in tree:
        bias = tree["bias"]
        out["bias"] = jax.random.uniform(kb, bias.shape, bias.dtype, -bound, bound)
    return out

  return redraw(dict(params), key)


@dataclasses.dataclass(frozen=True)
class Model:
  """A classifier: its layers, input shape, and (optional) fixed input normalisation."""

  name: str
  layers: tuple
  input_shape: tuple[int, ...]

  @property
  def module(self) -> L.Sequential:
    return L.Sequential(self.layers)

  @property
  def num_classes(self) -> int:
    return self.layers[-1].features

  def init(self, key: jax.Array, *, scheme: str = "flax"):
    """Fresh params ``{'layer_i': ...}`` (the ``'params'`` collection).

    Args:
      key: PRNG key.
      scheme: ``'flax'`` (Flax's defaults: LeCun-normal kernels, zero biases) or
        ``'torch'`` (PyTorch's default for ``nn.Conv2d`` / ``nn.Linear``, the reference
        implementation's init; see ``torch_default_init``).
    """
    if scheme not in INIT_SCHEMES:
      raise ValueError(f"unknown init scheme {scheme!r}; use one of {list(INIT_SCHEMES)}")
    k_flax, k_torch = jax.random.split(key)
    params = self.module.init(k_flax, jnp.zeros((1, *self.input_shape)))["params"]
    return torch_default_init(params, k_torch) if scheme == "torch" else params

  def apply(self, params, x: jax.Array) -> jax.Array:
    """Logits ``(B, K)`` of images ``(B, *input_shape)`` in [0, 1] pixel space."""
    return self.module.apply({"params": params}, x)

  def lipnet(self, params) -> network.LipNet:
    """The eq. 17 form of this network with ``params`` (for ``crmjax.liplt``)."""
    return network.from_layers(self.layers, params, self.input_shape)


def get_model(
  name: str,
  *,
  input_shape: tuple[int, ...],
  num_classes: int,
  normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
  **kwargs,
) -> Model:
  """A registered architecture by name.

  Args:
    name: one of ``ARCHITECTURES``: ``'4C3F'``, ``'6C2F'``, ``'8C2F'``, ``'Res4C3F'``,
      ``'MLP'``, ``'ResMLP'``, ``'CtrlConv'`` (Proposition 3.1 layers in a LipNet, MNIST-size; see
      ``ctrl_conv``).
    input_shape: one image's ``(H, W, C)``.
    num_classes: K.
    normalize: optional ``(mean, std)`` per channel; becomes a fixed first layer, inside
      the Lipschitz bound (certificates stay in [0, 1] pixel space).
    **kwargs: passed to the architecture's function (e.g. ``width``, ``rescaling`` of
      ``ctrl_conv``).
  """
  if name not in ARCHITECTURES:
    raise ValueError(
      f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)} "
      "(or register yours in crmjax.models.ARCHITECTURES)"
    )
  layers = ARCHITECTURES[name](num_classes=num_classes, **kwargs)
  if normalize is not None:
    layers = (L.Normalize(tuple(normalize[0]), tuple(normalize[1])),) + layers
  return Model(name, layers, tuple(input_shape))
