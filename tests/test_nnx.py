"""crmjax.nnx_bridge: the LipLT bound of Flax NNX models.

References independent of the converter: the NNX model's own forward pass and Jacobians,
its layers' matrices read off by applying each NNX layer to a basis (eq. 19 written out in
float64 by ``tests.reference``), and the hand-written crmjax layer-spec model.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from crmjax import certify, liplt, losses, network, nnx_bridge, soundness
from crmjax import layers as L
from tests import reference as ref
from tests.certificate_checks import assert_pgd_breaks_no_certificate

K = 4
SHAPE = (8, 8, 2)
LEAKY = functools.partial(nnx.leaky_relu, negative_slope=0.1)


def _conv_model(r):
  """'SAME' stride 2 (asymmetric padding), a residual block with a rectangular kernel,
  'VALID', a lambda flatten: (8, 8, 2) -> (4, 4, 3) -> (3, 3, 4) -> 36 -> 6 -> K."""
  return nnx.Sequential(
    nnx.Conv(2, 3, (3, 3), strides=2, rngs=r),
    nnx.relu,
    nnx_bridge.Residual(
      nnx.Conv(3, 3, (3, 3), padding=1, rngs=r),
      LEAKY,
      nnx.Conv(3, 3, (3, 1), padding=((1, 1), (0, 0)), rngs=r),
    ),
    nnx.Conv(3, 4, (2, 2), padding="VALID", rngs=r),
    nnx.relu,
    lambda x: x.reshape(x.shape[0], -1),
    nnx.Sequential(nnx.Linear(36, 6, rngs=r), nnx.relu),  # nested: flattened
    nnx.Linear(6, K, rngs=r),
  )


def _dense_model(r):
  """tanh and sigmoid (a residual branch), on a flat input (5,)."""
  return nnx.Sequential(
    nnx.Linear(5, 6, rngs=r),
    nnx.tanh,
    nnx_bridge.Residual(nnx.Linear(6, 5, rngs=r), nnx.sigmoid, nnx.Linear(5, 6, rngs=r)),
    nnx.Linear(6, K, rngs=r),
  )


MODELS = {"conv": (_conv_model, SHAPE), "dense": (_dense_model, (5,))}


def _init(make, seed=0, biases=True):
  """``make(rngs)`` with numpy-drawn params: kernels N(0, 1 / fan_in), biases N(0, 0.3^2)
  (zero if not ``biases``; the forward pass must carry them). ``nnx.eval_shape`` skips
  NNX's own initialisers, whose eager compilation costs seconds per shape on a CPU."""
  model = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  for _, v in nnx.iter_graph(model):
    if isinstance(v, nnx.Param):
      shape = v.shape
      if len(shape) == 1:
        value = 0.3 * rng.standard_normal(shape) * biases
      else:
        value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
      v.set_value(jnp.asarray(value, jnp.float32))
  return model


def _linear_matrix(layer, in_shape):
  """The (out, in) float64 matrix of an affine NNX layer: its columns ``f(e_i) - f(0)``."""
  n = int(np.prod(in_shape))
  columns = layer(jnp.eye(n).reshape((n, *in_shape))) - layer(jnp.zeros((1, *in_shape)))
  return np.asarray(columns, np.float64).reshape(n, -1).T


def _conv_model_reference(model):
  """Eq. 17 blocks of ``_conv_model`` from its layers' matrices, written out by hand."""
  c1, _, res, c4, _, _, seq, last = model.layers
  c2, act, c3 = res.branch.layers
  lin, _ = seq.layers
  m1 = _linear_matrix(c1, SHAPE)
  m2, m3 = _linear_matrix(c2, (4, 4, 3)), _linear_matrix(c3, (4, 4, 3))
  m4 = _linear_matrix(c4, (4, 4, 3))
  m5, r = _linear_matrix(lin, (36,)), _linear_matrix(last, (6,))
  assert act is LEAKY
  eye = np.eye(m2.shape[1])
  blocks = [
    (m1, None, None, 0.0, 1.0),
    (m2, m3, eye, 0.1, 1.0),
    (m4, None, None, 0.0, 1.0),
    (m5, None, None, 0.0, 1.0),
  ]
  return blocks, r


@pytest.mark.parametrize("name", sorted(MODELS))
def test_converted_layers_compute_the_nnx_forward_pass(name):
  make, shape = MODELS[name]
  model = _init(make)
  layers, params = nnx_bridge.to_layers(model, shape)
  x = jax.random.normal(jax.random.key(1), (5, *shape))
  ours = L.Sequential(layers).apply({"params": params}, x)
  np.testing.assert_allclose(ours, model(x), rtol=1e-5, atol=1e-5)


def test_conv_mask_and_wrapped_activation():
  model = _init(
    lambda r: nnx.Sequential(
      nnx.Conv(2, 3, (3, 3), rngs=r),
      nnx_bridge.Activation(jax.nn.silu, slopes=[-0.1, 1.1]),
      nnx_bridge.Flatten(),
      nnx.Linear(192, K, rngs=r),
    )
  )
  mask = np.random.default_rng(0).integers(0, 2, (3, 3, 2, 3)).astype(np.float32)
  model.layers[0].mask = nnx.data(jnp.asarray(mask))
  layers, params = nnx_bridge.to_layers(model, SHAPE)
  assert layers[1] == L.Act("custom", fn=jax.nn.silu, slopes=(-0.1, 1.1))
  np.testing.assert_array_equal(params["layer_0"]["kernel"], model.layers[0].kernel[...] * mask)
  x = jax.random.normal(jax.random.key(1), (3, *SHAPE))
  np.testing.assert_allclose(
    L.Sequential(layers).apply({"params": params}, x), model(x), rtol=1e-5, atol=1e-5
  )
  with pytest.raises(ValueError, match="alpha <= beta"):
    nnx_bridge.Activation(jax.nn.silu, slopes=(1.0, 0.0))


def test_square_symmetric_convs_become_plain_layer_specs():
  strided = _init(
    lambda r: nnx.Sequential(
      nnx.Conv(2, 3, (4, 4), strides=(2, 2), padding=(1, 1), rngs=r),
      nnx.relu,
      nnx.Conv(3, 3, (3, 3), padding="SAME", rngs=r),
      nnx_bridge.Flatten(),
      nnx.Linear(48, K, rngs=r),
    )
  )
  assert nnx_bridge.to_layers(strided, SHAPE)[0] == (
    L.Conv(3, 4, 2, 1),
    L.Act(),
    L.Conv(3, 3, 1, 1),
    L.Flatten(),
    L.Dense(K),
  )
  layers, _ = nnx_bridge.to_layers(_init(_conv_model), SHAPE)
  c1, _, res, c4 = layers[:4]
  assert c1 == nnx_bridge.GeneralConv(3, (3, 3), (2, 2), ((0, 1), (0, 1)))  # 'SAME', stride 2
  assert res.layers[0] == L.Conv(3, 3, 1, 1)
  assert res.layers[1] == L.Act("leaky_relu", 0.1)
  assert res.layers[2] == nnx_bridge.GeneralConv(3, (3, 1), (1, 1), ((1, 1), (0, 0)))
  assert c4 == L.Conv(4, 2, 1, 0)
  assert layers[4:] == (L.Act(), L.Flatten(), L.Dense(6), L.Act(), L.Dense(K))


def test_lipnet_is_the_bias_free_network():
  """With zero biases a (leaky) ReLU model *is* its eq. 17 form: ``LipNet(x) == model(x)``."""
  model = _init(_conv_model, biases=False)
  net = nnx_bridge.to_lipnet(model, SHAPE)
  assert len(net.blocks) == 4 and net.blocks[1].H is not None  # the residual block: H = I
  x = jax.random.normal(jax.random.key(2), (5, *SHAPE))
  np.testing.assert_allclose(net(x), model(x), rtol=1e-5, atol=1e-5)


def test_bound_matches_float64_reference_from_the_nnx_layers():
  model = _init(_conv_model, seed=1)  # biases do not change the bound
  blocks, r = _conv_model_reference(model)
  bounds, info = soundness.sound_bounds(nnx_bridge.to_lipnet(model, SHAPE))
  assert info["probabilistic_norms"] == 0  # every norm exact (float64 Gram)
  for mode in liplt.MODES:
    expected, _ = ref.liplt_reference(blocks, r, mode=mode)
    assert np.all(bounds[mode] >= expected * (1 - 1e-6)), mode
    np.testing.assert_allclose(bounds[mode], expected, rtol=2e-3, atol=1e-6, err_msg=mode)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bound_exceeds_gradient_norms_and_difference_quotients(name):
  make, shape = MODELS[name]
  model = _init(make, seed=2)
  net = nnx_bridge.to_lipnet(model, shape)
  n = 128
  xs = jax.random.normal(jax.random.key(4), (n, *shape))
  jac = jax.vmap(jax.jacrev(lambda x: model(x[None])[0]))(xs)
  jac = np.asarray(jac, np.float64).reshape(n, K, -1)
  bounds, _ = soundness.sound_bounds(net)
  pair = np.linalg.norm(jac[:, :, None] - jac[:, None, :], axis=-1).max(0)
  assert np.all(pair <= bounds["pairwise"])
  assert np.all(np.linalg.norm(jac, axis=-1).max(0) <= bounds["per_class"])
  assert np.linalg.norm(jac, 2, axis=(1, 2)).max() <= bounds["global"]
  assert pair.max() > 0.1 * bounds["pairwise"].max()  # the lower estimate is not trivial
  # Pairs of nearby points: |m_ij(x) - m_ij(y)| <= L_ij ||x - y|| for the margins m_ij.
  ys = xs + 0.1 * jax.random.normal(jax.random.key(5), xs.shape)
  zx, zy = np.asarray(model(xs), np.float64), np.asarray(model(ys), np.float64)
  dist = np.linalg.norm(np.asarray(xs - ys, np.float64).reshape(n, -1), axis=1)
  dz = zx - zy
  quotient = np.abs(dz[:, :, None] - dz[:, None, :]) / dist[:, None, None]
  assert np.all(quotient.max(0) <= bounds["pairwise"] * (1 + 1e-5))


def _layer_spec_twin(r):
  return nnx.Sequential(
    nnx.Linear(5, 6, rngs=r),
    nnx.tanh,
    nnx_bridge.Residual(nnx.Linear(6, 4, rngs=r), LEAKY, nnx.Linear(4, 6, rngs=r)),
    nnx.Linear(6, K, rngs=r),
  )


def test_same_bound_and_gradients_as_the_layer_spec_model():
  """The NNX model and its crmjax twin (layer specs written by hand, the same arrays)."""
  model = _init(_layer_spec_twin)
  layers = (
    L.Dense(6),
    L.Act("tanh"),
    L.Residual((L.Dense(4), L.Act("leaky_relu", 0.1), L.Dense(6))),
    L.Dense(K),
  )
  arrays = lambda m: {"kernel": m.kernel[...], "bias": m.bias[...]}
  branch = model.layers[2].branch.layers
  params = {
    "layer_0": arrays(model.layers[0]),
    "layer_2": {"layer_0": arrays(branch[0]), "layer_2": arrays(branch[2])},
    "layer_3": arrays(model.layers[3]),
  }
  got_layers, _ = nnx_bridge.to_layers(model, (5,))
  assert got_layers == layers
  x = jax.random.normal(jax.random.key(1), (3, 5))
  np.testing.assert_allclose(
    model(x), L.Sequential(layers).apply({"params": params}, x), rtol=1e-5, atol=1e-6
  )

  def mean_pairwise(net):
    lip, _ = liplt.liplt_bound(net, mode="pairwise", num_iters=2)
    return jnp.sum(lip) / (K * (K - 1))

  ours = nnx.jit(nnx.value_and_grad(lambda m: mean_pairwise(nnx_bridge.to_lipnet(m, (5,)))))(model)
  theirs = jax.jit(
    jax.value_and_grad(lambda p: mean_pairwise(network.from_layers(layers, p, (5,))))
  )(params)
  np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-6)
  g_nnx, g_spec = ours[1], theirs[1]
  pairs = [
    (g_nnx["layers"][0], g_spec["layer_0"]),
    (g_nnx["layers"][2]["branch"]["layers"][0], g_spec["layer_2"]["layer_0"]),
    (g_nnx["layers"][2]["branch"]["layers"][2], g_spec["layer_2"]["layer_2"]),
    (g_nnx["layers"][3], g_spec["layer_3"]),
  ]
  for gn, gs in pairs:
    np.testing.assert_allclose(gn["kernel"][...], gs["kernel"], rtol=1e-4, atol=1e-7)
    assert np.abs(gn["kernel"][...]).max() > 0
    assert np.all(gn["bias"][...] == 0)  # biases do not change the bound


def _sound_mean(model, shape):
  lip, _ = soundness.sound_bound(nnx_bridge.to_lipnet(model, shape))
  return lip.sum() / (K * (K - 1))


def test_nnx_train_step_with_the_bound_reduces_it():
  """``nnx.jit`` + ``nnx.value_and_grad`` of cross-entropy + lam * mean pairwise bound."""
  kc, ky, kn = jax.random.split(jax.random.key(0), 3)
  centers = 2.0 * jax.random.normal(kc, (K, 5))
  y = jax.random.randint(ky, (128,), 0, K)
  x = centers[y] + jax.random.normal(kn, (128, 5))

  @nnx.jit
  def train_step(model, optimizer, power, x, y, lam):
    def loss_fn(model):
      lip, new_power = liplt.liplt_bound(
        nnx_bridge.to_lipnet(model, (5,)), power, mode="pairwise", num_iters=2
      )
      mean_lip = jnp.sum(lip) / (K * (K - 1))
      return losses.cross_entropy(model(x), y) + lam * mean_lip, (new_power, mean_lip)

    (_, (power, mean_lip)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return power, mean_lip

  results = {}
  for lam in (0.0, 1.0):
    model = _init(_dense_model, seed=3)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    power = liplt.init_state(nnx_bridge.to_lipnet(model, (5,)), jax.random.key(1))
    before = _sound_mean(model, (5,))
    for _ in range(30):
      power, _ = train_step(model, optimizer, power, x, y, lam)
    accuracy = float((model(x).argmax(1) == y).mean())
    results[lam] = (before, _sound_mean(model, (5,)), accuracy)
  (b0, a0, acc0), (b1, a1, acc1) = results[0.0], results[1.0]
  assert b0 == b1  # the same initial model
  assert a1 < 0.7 * b1 and a1 < 0.7 * a0, results  # the penalty trains the bound down
  assert acc1 > 0.5 and acc0 > 0.5, results  # and the classifier still learns (4 classes)


def _one_act(fn):
  layers, _ = nnx_bridge.to_layers(nnx.Sequential(fn, nnx.Linear(3, 2, rngs=nnx.Rngs(0))), (3,))
  return layers[0]


ACTIVATIONS = {
  "relu": nnx.relu,
  "leaky_default": nnx.leaky_relu,
  "leaky_0.2": functools.partial(jax.nn.leaky_relu, negative_slope=0.2),
  "tanh": nnx.tanh,
  "sigmoid": nnx.sigmoid,
  "relu6": nnx.relu6,
  "hard_tanh": nnx.hard_tanh,
  "softplus": nnx.softplus,
  "wrapped_silu": nnx_bridge.Activation(jax.nn.silu, slopes=(-0.1, 1.1)),
}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_slope_bounds_hold_and_are_tight(name):
  fn = ACTIVATIONS[name]
  spec = _one_act(fn)
  assert isinstance(spec, L.Act)
  u = np.linspace(-8.0, 8.0, 16001)
  np.testing.assert_allclose(spec.function(jnp.asarray(u)), fn(jnp.asarray(u)), atol=1e-7)
  slope = np.diff(np.asarray(fn(jnp.asarray(u, jnp.float32)), np.float64)) / np.diff(u)
  a, b = spec.slope_bounds
  assert slope.min() >= a - 1e-3 and slope.max() <= b + 1e-3
  assert slope.min() <= a + 0.02 and slope.max() >= b - 0.02  # the bounds are tight here


class _Custom(nnx.Module):
  def __init__(self):
    self.lin = nnx.Linear(3, K, rngs=nnx.Rngs(0))

  def __call__(self, x):
    return self.lin(x)


def _errors():
  r = nnx.Rngs(0)
  lin = lambda i, o: nnx.Linear(i, o, rngs=r)
  conv = lambda i, o, k=(3, 3), **kw: nnx.Conv(i, o, k, rngs=r, **kw)
  flat = nnx_bridge.Flatten()
  img = (6, 6, 2)
  return [
    (
      "batchnorm_training_mode",
      nnx.Sequential(lin(3, 3), nnx.BatchNorm(3, rngs=r), lin(3, K)),
      (3,),
      r"layers\[1\]: nnx.BatchNorm in training mode.*call model.eval\(\)",
    ),
    (
      "max_pool",
      nnx.Sequential(
        conv(2, 3), functools.partial(nnx.max_pool, window_shape=(2, 2)), flat, lin(27, K)
      ),
      img,
      r"layers\[1\]: max pooling is not of the form H x \+ G phi\(W x\).*average pooling",
    ),
    (
      "avg_pool_positional",
      nnx.Sequential(conv(2, 3), functools.partial(nnx.avg_pool, (2, 2)), flat, lin(27, K)),
      img,
      r"give average pooling's settings by keyword",
    ),
    (
      "avg_pool_without_window",
      nnx.Sequential(conv(2, 3), nnx.avg_pool, flat, lin(27, K)),
      img,
      r"give average pooling its window",
    ),
    (
      "layer_norm",
      nnx.Sequential(lin(3, 3), nnx.LayerNorm(3, rngs=r), lin(3, K)),
      (3,),
      r"LayerNorm divides by a statistic of its own input.*Use BatchNorm",
    ),
    (
      "attention",
      nnx.Sequential(nnx.MultiHeadAttention(1, 3, decode=False, rngs=r), lin(3, K)),
      (3,),
      r"MultiHeadAttention \(attention\) multiplies inputs",
    ),
    (
      "gelu",
      nnx.Sequential(lin(3, 3), nnx.gelu, lin(3, K)),
      (3,),
      r"unknown function 'gelu'.*Activation\(fn, slopes=\(alpha, beta\)\)",
    ),
    (
      "prelu",
      nnx.Sequential(lin(3, 3), nnx.PReLU(), lin(3, K)),
      (3,),
      r"PReLU is not supported.*negative_slope",
    ),
    (
      "lora",
      nnx.Sequential(nnx.LoRALinear(3, K, lora_rank=1, rngs=r)),
      (3,),
      r"LoRALinear is not supported",
    ),
    (
      "positional_leaky",
      nnx.Sequential(lin(3, 3), functools.partial(nnx.leaky_relu, 0.2), lin(3, K)),
      (3,),
      r"by keyword",
    ),
    (
      "linear_on_map",
      nnx.Sequential(conv(2, 3), nnx.relu, lin(3, K)),
      img,
      r"nnx.Linear applied to a \(6, 6, 3\) map.*Flatten\(\)",
    ),
    (
      "dilation",
      nnx.Sequential(conv(2, 3, kernel_dilation=2), flat, lin(108, K)),
      img,
      r"kernel_dilation=2 is not supported",
    ),
    (
      "groups",
      nnx.Sequential(conv(2, 2, feature_group_count=2), flat, lin(72, K)),
      img,
      r"feature_group_count=2",
    ),
    (
      "circular",
      nnx.Sequential(conv(2, 3, padding="CIRCULAR"), flat, lin(108, K)),
      img,
      r"padding='CIRCULAR' is not zero padding",
    ),
    ("conv3d", nnx.Sequential(conv(2, 3, (3, 3, 3)), flat, lin(108, K)), img, r"a 3-D nnx.Conv"),
    (
      "conv1d",
      nnx.Sequential(conv(2, 3, 3), flat, lin(108, K)),
      img,
      r"a 1-D nnx.Conv.*kernel_size=3 is 1-D in NNX: write \(3, 3\)",
    ),
    ("in_features", nnx.Sequential(conv(1, 3), flat, lin(108, K)), img, r"in_features=1"),
    (
      "two_acts",
      nnx.Sequential(
        nnx_bridge.Residual(lin(3, 3), nnx.relu, lin(3, 3), nnx.relu, lin(3, 3)), lin(3, K)
      ),
      (3,),
      r"exactly one activation.*it has 2",
    ),
    (
      "residual_shape",
      nnx.Sequential(nnx_bridge.Residual(lin(3, 4), nnx.relu, lin(4, 5)), lin(5, K)),
      (3,),
      r"maps \(3,\) to \(5,\)",
    ),
    ("ends_with_act", nnx.Sequential(lin(3, K), nnx.relu), (3,), r"must end with"),
    ("custom_module", _Custom(), (3,), r"needs an nnx.Sequential, got _Custom"),
    ("bad_shape", nnx.Sequential(lin(3, K)), (1, 3), r"input_shape must be"),
  ]


@pytest.mark.parametrize("case", _errors(), ids=lambda c: c[0])
def test_unsupported_models_raise_clear_errors(case):
  _, model, shape, match = case
  with pytest.raises(ValueError, match=match):
    nnx_bridge.to_lipnet(model, shape)


# --------------------------------------------------------------------------- BatchNorm & co.


def _bn_model(r):
  """BatchNorm after a conv, after a ReLU and after a linear layer; average pooling, a
  'SAME' stride-2 conv, the global mean, Dropout: (8, 8, 1) -> (4, 4, 3) -> (2, 2, 4) -> 4."""
  return nnx.Sequential(
    nnx.Conv(1, 3, (3, 3), rngs=r),
    nnx.BatchNorm(3, rngs=r),
    nnx.relu,
    functools.partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2)),
    nnx.Dropout(0.5, rngs=r),
    nnx.Conv(3, 4, (3, 3), strides=2, rngs=r),
    nnx.relu,
    nnx.BatchNorm(4, rngs=r),
    lambda x: x.mean(axis=(1, 2)),  # read as the global average pooling
    nnx.Linear(4, 5, rngs=r),
    nnx.BatchNorm(5, epsilon=1e-3, rngs=r),
    nnx.relu,
    nnx.Dropout(0.2, rngs=r),
    nnx.Linear(5, K, rngs=r),
  )


BN_SHAPE = (8, 8, 1)


def _init_bn(seed=0, dtype=jnp.float32):
  """``_bn_model`` with numpy-drawn params and running statistics, in evaluation mode."""
  model = nnx.eval_shape(lambda: _bn_model(nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  for path, v in nnx.iter_graph(model):
    if isinstance(v, (nnx.Param, nnx.BatchStat)):
      shape = v.shape
      if path[-1] == "var":
        value = rng.uniform(0.2, 2.0, shape)
      elif path[-1] == "scale":
        value = rng.uniform(0.5, 2.0, shape) * np.where(np.arange(shape[0]) == 0, -1, 1)
      elif len(shape) == 1:
        value = 0.1 * rng.standard_normal(shape)
      else:
        value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
      v.set_value(jnp.asarray(value, dtype))
    elif isinstance(v, nnx.RngKey):  # the Dropout layers' random state
      v.set_value(jax.random.key(0))
    elif isinstance(v, nnx.RngCount):
      v.set_value(jnp.zeros(v.shape, jnp.uint32))
  model.eval()
  return model


@pytest.mark.parametrize("fold", [False, True])
def test_batchnorm_pooling_dropout_forward_pass_in_float64(fold):
  with jax.enable_x64(True):
    model = _init_bn(dtype=jnp.float64)
    layers, params = nnx_bridge.to_layers(model, BN_SHAPE, fold_batchnorm=fold)
    kinds = [type(l).__name__ for l in layers]
    assert kinds.count("BatchNorm") == (1 if fold else 3) and "Dropout" not in kinds
    assert kinds.count("AvgPool") == 1 and kinds.count("GlobalAvgPool") == 1
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, *BN_SHAPE)))
    ours = L.Sequential(layers).apply({"params": params}, x)
    assert ours.dtype == jnp.float64
    np.testing.assert_allclose(ours, model(x), rtol=1e-12, atol=1e-12)


def test_batchnorm_model_bound_gradients_and_pgd():
  model = _init_bn(seed=3)
  composed = nnx_bridge.to_lipnet(model, BN_SHAPE)
  folded = nnx_bridge.to_lipnet(model, BN_SHAPE, fold_batchnorm=True)
  bound, _ = soundness.sound_bound(composed)
  np.testing.assert_allclose(soundness.sound_bound(folded)[0], bound, rtol=1e-5)
  xs = jax.random.normal(jax.random.key(4), (64, *BN_SHAPE))
  jac = np.asarray(jax.vmap(jax.jacrev(lambda x: model(x[None])[0]))(xs), np.float64)
  jac = jac.reshape(len(xs), K, -1)
  pair = np.linalg.norm(jac[:, :, None] - jac[:, None, :], axis=-1).max(0)
  assert np.all(pair <= bound) and pair.max() > 0.05 * bound.max()
  # One call certifies the NNX model; its own logits (eval mode) attacked inside the radii.
  crm_model, params = nnx_bridge.to_model(model, BN_SHAPE)
  labels = np.asarray(model(xs).argmax(1))
  radii, lip, _ = certify.certified_radii(crm_model, params, np.asarray(xs), labels)
  np.testing.assert_allclose(lip, bound, rtol=1e-6)
  assert np.all(radii > 0)
  assert_pgd_breaks_no_certificate(model, xs, labels, radii, seed=5)


def test_bound_is_differentiable_in_the_batchnorm_scale():
  model = _init_bn(seed=4)

  def mean_bound(m):
    lip, _ = liplt.liplt_bound(
      nnx_bridge.to_lipnet(m, BN_SHAPE),
      liplt.init_state(nnx_bridge.to_lipnet(m, BN_SHAPE), jax.random.key(0)),
      num_iters=3,
    )
    return jnp.sum(lip)

  grads = nnx.jit(nnx.grad(mean_bound))(model)  # the running statistics are traced too
  g_scale = np.asarray(grads.layers[1].scale[...])
  assert np.all(np.isfinite(g_scale)) and np.abs(g_scale).max() > 0


@pytest.mark.parametrize(
  "pool",
  [
    functools.partial(nnx.avg_pool, window_shape=(3, 3), strides=(2, 2), padding="SAME"),
    functools.partial(
      nnx.avg_pool,
      window_shape=(2, 3),
      strides=(1, 2),
      padding=((1, 0), (0, 1)),
      count_include_pad=False,
    ),
    functools.partial(nnx.avg_pool, window_shape=(2, 2)),  # strides default to 1 in Flax
  ],
  ids=["same", "exclude_pad", "default_strides"],
)
def test_average_pooling_settings_are_read_exactly(pool):
  x = jnp.asarray(np.random.default_rng(6).standard_normal((3, 7, 8, 2)))
  with jax.enable_x64(True):
    x = x.astype(jnp.float64)
    spec, out = nnx_bridge.function_spec(pool, (7, 8, 2), "pool")
    assert isinstance(spec, L.AvgPool)
    np.testing.assert_allclose(spec.operator({}, (7, 8, 2))(x), pool(x), rtol=1e-12)
    assert out == pool(x).shape[1:]
