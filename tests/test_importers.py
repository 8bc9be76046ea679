"""crmjax.importers against a float64 numpy re-implementation of the PyTorch forward pass.

torch is not needed: the state dicts are PyTorch-layout numpy arrays (conv OIHW, linear
(O, I)), and the reference below is PyTorch's semantics written out (NCHW convolution,
(C, H, W) flatten, ``x @ W.T + b``).
"""

import sys

import jax
import numpy as np
import pytest

from crmjax import certify, importers, liplt, models, soundness
from crmjax import layers as L
from tests.certificate_checks import assert_pgd_breaks_no_certificate

# The small net: input 8x8x1; conv 4 3x3 s1 p1, ReLU, conv 4 4x4 s2 p1, ReLU, flatten,
# linear 16, ReLU, linear 10.  As (kind, state-dict prefix, stride, padding):
TORCH_NET = (
  ("conv", "0", 1, 1),
  ("relu",),
  ("conv", "2", 2, 1),
  ("relu",),
  ("flatten",),
  ("linear", "5"),
  ("relu",),
  ("linear", "7"),
)
SPECS = (
  L.Conv(4, 3, 1, 1),
  L.Act(),
  L.Conv(4, 4, 2, 1),
  L.Act(),
  L.Flatten(),
  L.Dense(16),
  L.Act(),
  L.Dense(10),
)
INPUT_HWC = (8, 8, 1)
K = 10


def _rand(rng, *shape):
  fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
  return rng.normal(size=shape) / np.sqrt(fan_in)


def small_state_dict(seed=0):
  rng = np.random.default_rng(seed)
  return {
    "0.weight": _rand(rng, 4, 1, 3, 3),
    "0.bias": 0.1 * rng.normal(size=4),
    "2.weight": _rand(rng, 4, 4, 4, 4),
    "2.bias": 0.1 * rng.normal(size=4),
    "5.weight": _rand(rng, 16, 4 * 4 * 4),
    "5.bias": 0.1 * rng.normal(size=16),
    "7.weight": _rand(rng, K, 16),
    "7.bias": 0.1 * rng.normal(size=K),
  }


# --------------------------------------------------------------------------- reference


def torch_conv2d(x, w, b, stride, pad):
  """PyTorch ``F.conv2d``: x (N, C, H, W), w (O, I, kh, kw) -> (N, O, H', W')."""
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  _, _, h, wd = x.shape
  _, _, kh, kw = w.shape
  oh, ow = (h - kh) // stride + 1, (wd - kw) // stride + 1
  out = np.zeros((x.shape[0], w.shape[0], oh, ow))
  for i in range(oh):
    for j in range(ow):
      patch = x[:, :, i * stride : i * stride + kh, j * stride : j * stride + kw]
      out[:, :, i, j] = np.einsum("ncab,ocab->no", patch, w)
  return out if b is None else out + b[None, :, None, None]


BN_KEYS = ("weight", "bias", "running_mean", "running_var")


def torch_avg_pool2d(x, k, stride, pad, count_include_pad):
  """PyTorch ``F.avg_pool2d`` (floor mode): x (N, C, H, W) -> (N, C, H', W')."""
  n, c, h, w = x.shape
  oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
  out = np.zeros((n, c, oh, ow))
  for i in range(oh):
    for j in range(ow):
      y0, x0 = i * stride - pad, j * stride - pad
      ys = slice(max(y0, 0), min(y0 + k, h))
      xs = slice(max(x0, 0), min(x0 + k, w))
      total = x[:, :, ys, xs].sum(axis=(2, 3))
      count = k * k if count_include_pad else (ys.stop - ys.start) * (xs.stop - xs.start)
      out[:, :, i, j] = total / count
  return out


def torch_forward(sd, net, x_nchw, masks=None, bias=True):
  """The PyTorch logits (float64); ``masks`` given: ReLU replaced by those fixed 0/1 masks."""
  x = np.asarray(x_nchw, np.float64)
  found, k = [], 0
  for op in net:
    if op[0] == "conv":
      x = torch_conv2d(
        x, sd[op[1] + ".weight"], sd[op[1] + ".bias"] if bias else None, op[2], op[3]
      )
    elif op[0] == "linear":
      x = x @ np.asarray(sd[op[1] + ".weight"]).T + (sd[op[1] + ".bias"] if bias else 0.0)
    elif op[0] == "flatten":
      x = x.reshape(x.shape[0], -1)  # (C, H, W) order
    elif op[0] == "normalize":
      x = (x - op[1][None, :, None, None]) / op[2][None, :, None, None]
    elif op[0] == "bn":  # BatchNorm1d / 2d in eval mode: running statistics, over axis 1
      shape = (1, -1) + (1,) * (x.ndim - 2)
      p = {k: np.asarray(sd[f"{op[1]}.{k}"], np.float64).reshape(shape) for k in BN_KEYS}
      x = (x - (p["running_mean"] if bias else 0.0)) / np.sqrt(p["running_var"] + op[2])
      x = x * p["weight"] + (p["bias"] if bias else 0.0)
    elif op[0] == "avgpool":
      x = torch_avg_pool2d(x, *op[1:])
    elif op[0] == "adaptive_avg_1x1":
      x = x.mean(axis=(2, 3), keepdims=True)
    elif op[0] == "dropout":  # eval mode: the identity
      pass
    else:  # relu
      m = (x > 0).astype(np.float64) if masks is None else masks[k]
      found.append(m)
      x = x * m
      k += 1
  return x, found


def torch_jacobian(sd, net, x_chw):
  """d logits / d x at one input (K, C*H*W): ReLU activation pattern times the linear maps."""
  _, masks = torch_forward(sd, net, x_chw[None])
  basis = np.eye(x_chw.size).reshape(x_chw.size, *x_chw.shape)
  out, _ = torch_forward(
    sd,
    net,
    basis,
    masks=[np.broadcast_to(m, (x_chw.size,) + m.shape[1:]) for m in masks],
    bias=False,
  )
  return out.T


def _nhwc(x_nchw):
  return np.asarray(x_nchw, np.float32).transpose(0, 2, 3, 1)


def _logits(model, params, x_nchw):
  return np.asarray(model.apply(params, _nhwc(x_nchw)), np.float64)


# --------------------------------------------------------------------------- logits


@pytest.mark.parametrize("mode", ["layers", "inferred"])
def test_logits_match_torch_forward(mode):
  sd = small_state_dict()
  if mode == "layers":
    model, params = importers.import_torch_sequential(sd, input_shape=INPUT_HWC, layers=SPECS)
  else:
    model, params = importers.import_torch_sequential(
      sd, input_shape=INPUT_HWC, conv_strides=[1, 2], conv_paddings=[1, 1]
    )
  assert model.layers == SPECS
  assert model.input_shape == INPUT_HWC
  x = np.random.default_rng(1).uniform(size=(5, 1, 8, 8))
  want, _ = torch_forward(sd, TORCH_NET, x)
  np.testing.assert_allclose(_logits(model, params, x), want, rtol=1e-4, atol=1e-5)
  assert params["layer_0"]["kernel"].shape == (3, 3, 1, 4)  # HWIO
  assert params["layer_5"]["kernel"].shape == (64, 16)
  assert set(params) == {"layer_0", "layer_2", "layer_5", "layer_7"}


def test_flatten_permutation_multi_channel_mlp_and_normalize():
  """A torch ``Flatten -> Linear`` on a 3-channel image, with an input normalisation."""
  rng = np.random.default_rng(2)
  sd = {
    "net.1.weight": _rand(rng, 12, 3 * 4 * 5),
    "net.1.bias": rng.normal(size=12),
    "net.3.weight": _rand(rng, 6, 12),
    "net.3.bias": rng.normal(size=6),
  }
  mean, std = np.array([0.4, 0.5, 0.6]), np.array([0.2, 0.25, 0.3])
  model, params = importers.import_torch_sequential(
    sd, input_shape=(4, 5, 3), normalize=(mean, std)
  )
  assert model.layers == (
    L.Normalize(tuple(mean), tuple(std)),
    L.Flatten(),
    L.Dense(12),
    L.Act(),
    L.Dense(6),
  )
  net = (
    ("normalize", mean, std),
    ("flatten",),
    ("linear", "net.1"),
    ("relu",),
    ("linear", "net.3"),
  )
  x = rng.uniform(size=(3, 3, 4, 5))
  want, _ = torch_forward(sd, net, x)
  np.testing.assert_allclose(_logits(model, params, x), want, rtol=1e-4, atol=1e-5)


def test_name_ordering_rule_and_explicit_order():
  """features.* before classifier.*, numeric (2 < 10) not lexicographic, any dict order."""
  base = small_state_dict(3)
  renamed = {"features.0": "0", "features.10": "2", "classifier.1": "5", "classifier.3": "7"}
  items = [
    (f"{new}.{leaf}", base[f"{old}.{leaf}"])
    for new, old in renamed.items()
    for leaf in ("weight", "bias")
  ]
  shuffled = dict(
    [items[2], items[3], items[0], items[1], items[6], items[7], items[4], items[5]]
  )  # features.10 first, classifier.3 before classifier.1
  groups = importers.group_parameters(shuffled)
  assert [p for p, _ in groups] == ["features.0", "features.10", "classifier.1", "classifier.3"]
  x = np.random.default_rng(4).uniform(size=(2, 1, 8, 8))
  want, _ = torch_forward(base, TORCH_NET, x)
  model, params = importers.import_torch_sequential(shuffled, input_shape=INPUT_HWC, layers=SPECS)
  np.testing.assert_allclose(_logits(model, params, x), want, rtol=1e-4, atol=1e-5)

  # Names the rule cannot order (fc registered first): order= fixes it.
  named = {
    "fc_out.weight": base["7.weight"],
    "fc_out.bias": base["7.bias"],
    "conv_a.weight": base["0.weight"],
    "conv_a.bias": base["0.bias"],
    "conv_b.weight": base["2.weight"],
    "conv_b.bias": base["2.bias"],
    "fc_hidden.weight": base["5.weight"],
    "fc_hidden.bias": base["5.bias"],
  }
  with pytest.raises(ValueError, match="fc_out"):
    importers.import_torch_sequential(named, input_shape=INPUT_HWC, layers=SPECS)
  model, params = importers.import_torch_sequential(
    named, input_shape=INPUT_HWC, layers=SPECS, order=["conv_a", "conv_b", "fc_hidden", "fc_out"]
  )
  np.testing.assert_allclose(_logits(model, params, x), want, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match=r"extra arrays.*fc_out"):
    importers.group_parameters(named, order=["conv_a", "conv_b", "fc_hidden"])
  with pytest.raises(ValueError, match="not found"):
    importers.group_parameters(named, order=["conv_a", "nope"])


def test_matches_repo_architecture_4c3f():
  """Torch-layout arrays for 4C3F import into exactly the params tree Model.init makes."""
  rng = np.random.default_rng(5)
  shapes = [
    (32, 1, 3, 3),
    (32, 32, 4, 4),
    (64, 32, 3, 3),
    (64, 64, 4, 4),
    (512, 64 * 7 * 7),
    (512, 512),
    (10, 512),
  ]
  sd = {}
  for i, s in enumerate(shapes):
    sd[f"layers.{2 * i}.weight"] = rng.normal(size=s).astype(np.float32)
    sd[f"layers.{2 * i}.bias"] = np.zeros(s[0], np.float32)
  model, params = importers.import_torch_sequential(
    sd, input_shape=(28, 28, 1), layers=models.four_c_three_f(), normalize=((0.1307,), (0.3081,))
  )
  ref = models.Model("4C3F", model.layers, (28, 28, 1)).init(jax.random.key(0))
  shape_of = lambda t: jax.tree.map(lambda a: a.shape, t)
  assert shape_of(params) == shape_of(ref)
  assert model.apply(params, np.zeros((1, 28, 28, 1), np.float32)).shape == (1, 10)


# --------------------------------------------------------------------------- files


def test_npz_round_trip(tmp_path):
  sd = small_state_dict()
  path = tmp_path / "model.npz"
  np.savez(path, **{f"module.{k}": v for k, v in sd.items()})  # nn.DataParallel names
  loaded = importers.load_state_dict(path)
  assert list(loaded) == list(sd)
  for k in sd:
    np.testing.assert_array_equal(loaded[k], sd[k])
  model, params = importers.import_torch_sequential(loaded, input_shape=INPUT_HWC, layers=SPECS)
  x = np.random.default_rng(6).uniform(size=(2, 1, 8, 8))
  want, _ = torch_forward(sd, TORCH_NET, x)
  np.testing.assert_allclose(_logits(model, params, x), want, rtol=1e-4, atol=1e-5)

  wrapped = tmp_path / "wrapped.npz"
  np.savez(wrapped, **{f"state_dict.{k}": v for k, v in sd.items()})
  assert list(importers.load_state_dict(wrapped)) == list(sd)


def test_pth_without_torch_raises_import_error_with_fix(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
  path = tmp_path / "model.pth"
  path.write_bytes(b"not read")
  with pytest.raises(ImportError, match="pip install torch") as e:
    importers.load_state_dict(path)
  assert "np.savez" in str(e.value) and ".npz" in str(e.value)
  with pytest.raises(ValueError, match="unknown extension"):
    importers.load_state_dict(tmp_path / "model.h5")


# --------------------------------------------------------------------------- bounds


def test_liplt_bound_dominates_gradient_norms():
  sd = small_state_dict(7)
  model, params = importers.import_torch_sequential(sd, input_shape=INPUT_HWC, layers=SPECS)
  bound, _ = liplt.liplt_bound(model.lipnet(params), mode="pairwise", num_iters=500)
  bound = np.asarray(bound, np.float64)
  rng = np.random.default_rng(8)
  worst = np.zeros((K, K))
  for _ in range(20):
    x = rng.uniform(size=(1, 8, 8))
    J = torch_jacobian(sd, TORCH_NET, x)
    # Check the reference Jacobian by a central difference along a random direction.
    d = rng.normal(size=x.shape)
    eps = 1e-6
    fd = (
      torch_forward(sd, TORCH_NET, (x + eps * d)[None])[0]
      - torch_forward(sd, TORCH_NET, (x - eps * d)[None])[0]
    )[0] / (2 * eps)
    np.testing.assert_allclose(J @ d.ravel(), fd, rtol=1e-4, atol=1e-6)
    diff = J[:, None, :] - J[None, :, :]  # (K, K, n): J^T (e_i - e_j)
    worst = np.maximum(worst, np.linalg.norm(diff, axis=-1))
  off = ~np.eye(K, dtype=bool)
  assert worst[off].min() > 0
  assert np.all(bound[off] >= worst[off] * (1 - 1e-4)), (bound - worst)[off].min()
  naive, _ = liplt.naive_bound(model.lipnet(params), mode="pairwise", num_iters=500)
  assert np.all(np.asarray(naive)[off] >= bound[off] * (1 - 1e-4))


# --------------------------------------------------------------------------- errors


def test_missing_array_errors():
  sd = small_state_dict()
  no_bias = {k: v for k, v in sd.items() if k != "2.bias"}
  with pytest.raises(ValueError, match=r"layer_2 Conv.*missing array '2.bias'.*use_bias"):
    importers.import_torch_sequential(no_bias, input_shape=INPUT_HWC, layers=SPECS)
  no_layer = {k: v for k, v in sd.items() if not k.startswith("7.")}
  with pytest.raises(
    ValueError, match=r"layer_7 Dense.*missing array.*\(10, 16\).*Fix: pass the layers="
  ):
    importers.import_torch_sequential(no_layer, input_shape=INPUT_HWC, layers=SPECS)


def test_misshaped_array_error():
  sd = small_state_dict()
  with pytest.raises(
    ValueError,
    match=r"layer_5 Dense.*'5.weight' has shape \(16, 64\), "
    r"expected \(16, 196\).*Fix",
  ):
    # stride 1 instead of 2 in the second conv: flattened size 4*7*7 instead of 4*4*4
    importers.import_torch_sequential(
      sd,
      input_shape=INPUT_HWC,
      layers=(
        L.Conv(4, 3, 1, 1),
        L.Act(),
        L.Conv(4, 4, 1, 1),
        L.Act(),
        L.Flatten(),
        L.Dense(16),
        L.Act(),
        L.Dense(10),
      ),
    )
  bad = dict(sd, **{"2.weight": np.zeros((4, 4, 3, 3))})
  with pytest.raises(
    ValueError,
    match=r"layer_2 Conv.*\(4, 4, 3, 3\), expected "
    r"\(4, 4, 4, 4\) \(O, I, kh, kw\)",
  ):
    importers.import_torch_sequential(bad, input_shape=INPUT_HWC, layers=SPECS)
  with pytest.raises(ValueError, match=r"input_shape must be \(H, W, C\)"):
    importers.import_torch_sequential(sd, input_shape=(8, 8), layers=SPECS)


def test_extra_array_errors():
  sd = small_state_dict()
  extra = dict(sd, **{"9.weight": np.zeros((3, 10)), "9.bias": np.zeros(3)})
  with pytest.raises(ValueError, match=r"extra arrays: \['9.weight', '9.bias'\].*Fix"):
    importers.import_torch_sequential(extra, input_shape=INPUT_HWC, layers=SPECS)
  no_bias_spec = (L.Conv(4, 3, 1, 1, use_bias=False),) + SPECS[1:]
  with pytest.raises(ValueError, match=r"layer_0 Conv.*extra array '0.bias'.*use_bias=True"):
    importers.import_torch_sequential(sd, input_shape=INPUT_HWC, layers=no_bias_spec)
  bn = dict(sd, **{"1.running_mean": np.zeros(4)})
  with pytest.raises(ValueError, match=r"layer '1' is a BatchNorm.*add L.BatchNorm\(\)"):
    importers.import_torch_sequential(bn, input_shape=INPUT_HWC, layers=SPECS)
  with pytest.raises(ValueError, match=r"'1.momentum'.*BatchNorm's weight, bias, running_mean"):
    importers.import_torch_sequential(
      dict(sd, **{"1.momentum": np.zeros(1)}), input_shape=INPUT_HWC, layers=SPECS
    )


def test_convs_without_layers_ask_for_layers():
  with pytest.raises(ValueError, match=r"pass layers=.*conv_strides"):
    importers.import_torch_sequential(small_state_dict(), input_shape=INPUT_HWC)
  with pytest.raises(ValueError, match="only for layers=None"):
    importers.import_torch_sequential(
      small_state_dict(), input_shape=INPUT_HWC, layers=SPECS, conv_strides=[1, 2]
    )
  with pytest.raises(ValueError, match="conv_strides has 3 entries"):
    importers.import_torch_sequential(
      small_state_dict(), input_shape=INPUT_HWC, conv_strides=[1, 2, 1]
    )
  # conv_paddings alone: strides default to 1 (so the flattened size no longer fits).
  with pytest.raises(ValueError, match=r"'5.weight' has shape \(16, 64\), expected \(16, 196\)"):
    importers.import_torch_sequential(small_state_dict(), input_shape=INPUT_HWC, conv_paddings=1)


# --------------------------------------------------------------------------- BatchNorm & co.

# Conv2d(1, 4, 3, 1, 1), BatchNorm2d(4), ReLU, AvgPool2d(2), Dropout, Conv2d(4, 6, 3, 1, 1),
# BatchNorm2d(6, eps=1e-3), ReLU, AdaptiveAvgPool2d((1, 1)), Flatten, Linear(6, 8),
# BatchNorm1d(8), ReLU, Dropout, Linear(8, K).
BN_NET = (
  ("conv", "0", 1, 1),
  ("bn", "1", 1e-5),
  ("relu",),
  ("avgpool", 2, 2, 0, True),
  ("dropout",),
  ("conv", "5", 1, 1),
  ("bn", "6", 1e-3),
  ("relu",),
  ("adaptive_avg_1x1",),
  ("flatten",),
  ("linear", "10"),
  ("bn", "11", 1e-5),
  ("relu",),
  ("dropout",),
  ("linear", "14"),
)
BN_SPECS = (
  L.Conv(4, 3, 1, 1),
  L.BatchNorm(),
  L.Act(),
  L.AvgPool(2),
  L.Dropout(0.5),
  L.Conv(6, 3, 1, 1),
  L.BatchNorm(1e-3),
  L.Act(),
  L.GlobalAvgPool(),
  L.Flatten(),
  L.Dense(8),
  L.BatchNorm(),
  L.Act(),
  L.Dropout(0.5),
  L.Dense(K),
)
# Conv2d(1, 3, 3, 1, 1), BatchNorm2d(3), ReLU, AvgPool2d(3, 2, 1, count_include_pad=False),
# Flatten (a (C, H, W) flatten after pooling), Linear(48, 8), ReLU, Linear(8, K).
POOL_NET = (
  ("conv", "0", 1, 1),
  ("bn", "1", 1e-5),
  ("relu",),
  ("avgpool", 3, 2, 1, False),
  ("flatten",),
  ("linear", "5"),
  ("relu",),
  ("linear", "7"),
)
POOL_SPECS = (
  L.Conv(3, 3, 1, 1),
  L.BatchNorm(),
  L.Act(),
  L.AvgPool(3, strides=2, padding=1, count_include_pad=False),
  L.Flatten(),
  L.Dense(8),
  L.Act(),
  L.Dense(K),
)


def _bn(rng, c):
  gamma = rng.uniform(0.5, 2.0, c) * np.where(np.arange(c) == 0, -1, 1)
  return {
    "weight": gamma,
    "bias": 0.1 * rng.normal(size=c),
    "running_mean": 0.3 * rng.normal(size=c),
    "running_var": rng.uniform(0.2, 2.0, c),
    "num_batches_tracked": np.array(1000),  # read and dropped
  }


def _bn_state_dict(net, seed):
  """Random PyTorch-layout arrays for ``BN_NET`` / ``POOL_NET``."""
  rng = np.random.default_rng(seed)
  if net is BN_NET:  # ints: a BatchNorm's channels
    shapes = {"0": (4, 1, 3, 3), "1": 4, "5": (6, 4, 3, 3), "6": 6, "10": (8, 6), "11": 8}
    shapes["14"] = (K, 8)
  else:
    shapes = {"0": (3, 1, 3, 3), "1": 3, "5": (8, 48), "7": (K, 8)}
  sd = {}
  for prefix, shape in shapes.items():
    if isinstance(shape, int):
      sd.update({f"{prefix}.{k}": v for k, v in _bn(rng, shape).items()})
    else:
      sd[f"{prefix}.weight"] = _rand(rng, *shape)
      sd[f"{prefix}.bias"] = 0.1 * rng.normal(size=shape[0])
  return sd


@pytest.mark.parametrize("name", ["bn_gap", "pool_flatten"])
def test_batchnorm_pooling_dropout_logits_jacobians_and_bound(name):
  net, specs = (BN_NET, BN_SPECS) if name == "bn_gap" else (POOL_NET, POOL_SPECS)
  sd = _bn_state_dict(net, seed=7)
  model, params = importers.import_torch_sequential(sd, input_shape=INPUT_HWC, layers=specs)
  assert params["layer_1"]["scale"].shape == (specs[0].features,)
  x = np.random.default_rng(8).uniform(size=(6, 1, 8, 8))
  want, _ = torch_forward(sd, net, x)
  np.testing.assert_allclose(_logits(model, params, x), want, rtol=1e-4, atol=1e-5)
  bound, _ = soundness.sound_bound(model.lipnet(params))
  jacs = np.stack([torch_jacobian(sd, net, xi) for xi in x])  # (N, K, C*H*W), CHW order
  pair = np.linalg.norm(jacs[:, :, None] - jacs[:, None, :], axis=-1).max(0)
  assert np.all(pair <= bound)
  # Not a trivial lower estimate (global pooling averages away most of each ReLU pattern's
  # gradient, which products of norms cannot see: the sampled norms are 1/65 of the bound).
  assert pair.max() > 0.01 * bound.max()


def test_imported_batchnorm_model_certificates_survive_pgd():
  sd = _bn_state_dict(BN_NET, seed=9)
  model, params = importers.import_torch_sequential(sd, input_shape=INPUT_HWC, layers=BN_SPECS)
  x = np.random.default_rng(10).uniform(size=(32, 8, 8, 1)).astype(np.float32)
  logits_fn = lambda u: model.apply(params, u)
  labels = np.asarray(logits_fn(x).argmax(1))
  radii, _, info = certify.certified_radii(model, params, x, labels)
  assert np.all(radii > 0) and info["kind"] == "guaranteed upper bound"
  assert_pgd_breaks_no_certificate(logits_fn, x, labels, radii, seed=0)


def test_batchnorm_is_inferred_from_running_statistics():
  rng = np.random.default_rng(11)
  sd = {"0.weight": _rand(rng, 4, 1, 3, 3), "0.bias": np.zeros(4)}
  sd.update({f"1.{k}": v for k, v in _bn(rng, 4).items()})
  sd.update({"4.weight": _rand(rng, K, 4 * 8 * 8), "4.bias": np.zeros(K)})
  model, params = importers.import_torch_sequential(
    sd, input_shape=INPUT_HWC, conv_strides=1, conv_paddings=1
  )
  assert model.layers == (L.Conv(4, 3, 1, 1), L.BatchNorm(), L.Act(), L.Flatten(), L.Dense(K))
  net = (("conv", "0", 1, 1), ("bn", "1", 1e-5), ("relu",), ("flatten",), ("linear", "4"))
  x = rng.uniform(size=(3, 1, 8, 8))
  want, _ = torch_forward(sd, net, x)
  np.testing.assert_allclose(_logits(model, params, x), want, rtol=1e-4, atol=1e-5)


def test_batchnorm_import_errors():
  sd = _bn_state_dict(BN_NET, seed=12)
  no_var = {k: v for k, v in sd.items() if k != "6.running_var"}
  with pytest.raises(ValueError, match=r"layer_6 BatchNorm.*lacks \['running_var'\]"):
    importers.import_torch_sequential(no_var, input_shape=INPUT_HWC, layers=BN_SPECS)
  wrong = dict(sd, **{"1.running_mean": np.zeros(5)})
  with pytest.raises(ValueError, match=r"'1.running_mean' has shape \(5,\), expected \(4,\)"):
    importers.import_torch_sequential(wrong, input_shape=INPUT_HWC, layers=BN_SPECS)
  no_bn = tuple(l for l in BN_SPECS if not isinstance(l, L.BatchNorm))
  with pytest.raises(ValueError, match=r"layer '1' is a BatchNorm.*add L.BatchNorm\(\)"):
    importers.import_torch_sequential(sd, input_shape=INPUT_HWC, layers=no_bn)
  rng = np.random.default_rng(13)
  flat_bn = {"0.weight": _rand(rng, 2, 1, 3, 3), "0.bias": np.zeros(2)}
  flat_bn.update({f"2.{k}": v for k, v in _bn(rng, 128).items()})
  flat_bn.update({"3.weight": _rand(rng, K, 128), "3.bias": np.zeros(K)})
  specs = (L.Conv(2, 3, 1, 1), L.Flatten(), L.BatchNorm(), L.Dense(K))
  with pytest.raises(ValueError, match=r"BatchNorm1d right after flattening"):
    importers.import_torch_sequential(flat_bn, input_shape=INPUT_HWC, layers=specs)


# --------------------------------------------------------------------------- torch modules


def _fake(kind, **attrs):
  """A stand-in for a torch module: its class name and the attributes torch gives it."""
  obj = type(kind, (), {})()
  obj.__dict__.update(attrs)
  return obj


class Sequential:
  """A stand-in for ``torch.nn.Sequential``: ``children()`` and a numpy ``state_dict()``."""

  def __init__(self, *mods, sd=None):
    self.mods, self.sd = mods, sd

  def children(self):
    return iter(self.mods)

  def state_dict(self):
    return self.sd


def _conv(i, o, k, s, p, bias=True, **kw):
  attrs = dict(in_channels=i, out_channels=o, kernel_size=(k, k), stride=(s, s), padding=(p, p))
  attrs.update(dilation=(1, 1), groups=1, padding_mode="zeros", bias=0 if bias else None)
  return _fake("Conv2d", **{**attrs, **kw})


def _bn_modules(sd):
  bn = lambda kind, c, eps=1e-5: _fake(kind, num_features=c, eps=eps, track_running_stats=True)
  return Sequential(
    _conv(1, 4, 3, 1, 1),
    bn("BatchNorm2d", 4),
    _fake("ReLU"),
    _fake(
      "AvgPool2d",
      kernel_size=2,
      stride=None,
      padding=0,
      ceil_mode=False,
      count_include_pad=True,
      divisor_override=None,
    ),
    _fake("Dropout", p=0.5),
    Sequential(_conv(4, 6, 3, 1, 1), bn("BatchNorm2d", 6, 1e-3), _fake("ReLU")),  # nested
    _fake("AdaptiveAvgPool2d", output_size=(1, 1)),
    _fake("Flatten", start_dim=1, end_dim=-1),
    _fake("Linear", in_features=6, out_features=8, bias=0),
    bn("BatchNorm1d", 8),
    _fake("ReLU"),
    _fake("Dropout", p=0.5),
    _fake("Linear", in_features=8, out_features=K, bias=0),
    sd=sd,
  )


def test_torch_module_is_read_into_layer_specs_and_imported():
  sd = _bn_state_dict(BN_NET, seed=14)
  module = _bn_modules(sd)
  assert importers.layers_from_torch(module) == tuple(
    l for l in BN_SPECS if not isinstance(l, L.Dropout)
  )
  model, params = importers.import_torch_module(module, input_shape=INPUT_HWC)
  x = np.random.default_rng(15).uniform(size=(4, 1, 8, 8))
  want, _ = torch_forward(sd, BN_NET, x)
  np.testing.assert_allclose(_logits(model, params, x), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
  "module, match",
  [
    (_fake("MaxPool2d", kernel_size=2), r"model\[0\]: max pooling is not of the form"),
    (_fake("LayerNorm"), r"LayerNorm divides by a statistic"),
    (_conv(1, 2, 3, 1, 1, padding_mode="reflect"), r"padding_mode='reflect'"),
    (_conv(1, 2, 3, 1, 1, kernel_size=(3, 1)), r"kernel_size=\(3, 1\) is not square"),
    (_fake("BatchNorm2d", eps=1e-5, track_running_stats=False), r"without running statistics"),
    (_fake("GELU"), r"GELU is not supported.*layers="),
  ],
  ids=["max_pool", "layer_norm", "reflect", "rectangular", "no_stats", "gelu"],
)
def test_torch_modules_that_do_not_fit_raise(module, match):
  with pytest.raises(ValueError, match=match):
    importers.layers_from_torch(Sequential(module))
