"""crmjax.linen_bridge: linen models (nn.Sequential or a custom module described by its steps).

References independent of the converter: the linen model's own ``apply`` (evaluation mode),
its sampled Jacobians, the bound of the hand-written crmjax layer specs, and PGD.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crmjax import certify, linen_bridge, liplt, network, soundness
from crmjax import layers as L
from tests.certificate_checks import assert_pgd_breaks_no_certificate

K = 3
SHAPE = (8, 8, 1)


def _sequential():
  """Conv, BatchNorm, ReLU, average pooling, Dropout, strided conv, ReLU, BatchNorm, global
  mean, dense, BatchNorm, tanh, dense: (8, 8, 1) -> (4, 4, 3) -> (2, 2, 4) -> 4 -> K."""
  return nn.Sequential(
    [
      nn.Conv(3, (3, 3)),
      nn.BatchNorm(use_running_average=True),
      nn.relu,
      functools.partial(nn.avg_pool, window_shape=(2, 2), strides=(2, 2)),
      nn.Dropout(0.5, deterministic=True),
      nn.Sequential([nn.Conv(4, (3, 3), strides=2, padding=1), nn.relu]),  # nested
      nn.BatchNorm(use_running_average=True, epsilon=1e-3),
      linen_bridge.GlobalAvgPool(),
      nn.Dense(5),
      nn.BatchNorm(use_running_average=True, use_scale=False),
      nn.tanh,
      nn.Dense(K),
    ]
  )


class CustomCNN(nn.Module):
  """A custom module: its __call__ is described to the converter by ``STEPS``."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(3, (3, 3), use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.avg_pool(nn.leaky_relu(x, 0.1), (2, 2), strides=(2, 2), padding=((1, 1), (1, 1)))
    x = nn.Dropout(0.3, deterministic=not train)(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(6)(x)
    return nn.Dense(K)(nn.relu(x))


STEPS = [
  ("Conv_0", nn.Conv(3, (3, 3), use_bias=False)),
  ("BatchNorm_0", nn.BatchNorm(use_running_average=True)),
  functools.partial(nn.leaky_relu, negative_slope=0.1),
  functools.partial(nn.avg_pool, window_shape=(2, 2), strides=(2, 2), padding=((1, 1), (1, 1))),
  nn.Dropout(0.3),
  linen_bridge.Flatten(),
  ("Dense_0", nn.Dense(6)),
  nn.relu,
  ("Dense_1", nn.Dense(K)),
]


def _variables(module, seed=0, dtype=jnp.float32):
  """Random params and running statistics (positive variances, one negative BN scale)."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, *SHAPE))))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    shape = leaf.shape
    if name == "var":
      v = rng.uniform(0.2, 2.0, shape)
    elif name == "scale":
      v = rng.uniform(0.5, 2.0, shape) * np.where(np.arange(shape[0]) == 0, -1, 1)
    elif len(shape) == 1:
      v = 0.1 * rng.standard_normal(shape)
    else:
      v = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    return jnp.asarray(v, dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


MODELS = {"sequential": (_sequential, None), "custom": (CustomCNN, STEPS)}


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_converted_forward_pass_equals_linen_apply_in_float64(name, fold):
  make, steps = MODELS[name]
  module = make()
  with jax.enable_x64(True):
    variables = _variables(module, dtype=jnp.float64)
    model, params = linen_bridge.to_model(steps or module, variables, SHAPE, fold_batchnorm=fold)
    kinds = [type(l).__name__ for l in model.layers]
    assert "Dropout" not in kinds and ("AvgPool" in kinds)
    if fold:  # only the BatchNorm after an activation (sequential) stays
      assert kinds.count("BatchNorm") == (1 if name == "sequential" else 0)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, *SHAPE)))
    ours = model.apply(params, x)
    assert ours.dtype == jnp.float64
    np.testing.assert_allclose(ours, module.apply(variables, x), rtol=1e-12, atol=1e-12)


def test_same_bound_as_the_hand_written_layer_specs():
  """The converter's specs are those a user would write for the custom module."""
  module = CustomCNN()
  variables = _variables(module, seed=2)
  p, stats = variables["params"], variables["batch_stats"]
  by_hand = (
    L.Conv(3, 3, 1, 1, use_bias=False),
    L.BatchNorm(),
    L.Act("leaky_relu", negative_slope=0.1),
    L.AvgPool(2, padding=1),
    L.Flatten(),
    L.Dense(6),
    L.Act(),
    L.Dense(K),
  )
  bn = L.batchnorm_affine(
    mean=stats["BatchNorm_0"]["mean"],
    var=stats["BatchNorm_0"]["var"],
    epsilon=1e-5,
    gamma=p["BatchNorm_0"]["scale"],
    beta=p["BatchNorm_0"]["bias"],
  )
  hand_params = {"layer_0": p["Conv_0"], "layer_1": bn, "layer_5": p["Dense_0"]}
  hand_params["layer_7"] = p["Dense_1"]
  layers, params = linen_bridge.to_layers(STEPS, variables, SHAPE)
  assert layers == by_hand
  a, _ = soundness.sound_bound(linen_bridge.to_lipnet(STEPS, variables, SHAPE))
  b, _ = soundness.sound_bound(network.from_layers(by_hand, hand_params, SHAPE))
  np.testing.assert_allclose(a, b, rtol=1e-6)


def test_certified_points_of_a_linen_model_survive_pgd():
  module = _sequential()
  variables = _variables(module, seed=3)
  logits_fn = functools.partial(module.apply, variables)
  model, params = linen_bridge.to_model(module, variables, SHAPE)
  xs = jax.random.uniform(jax.random.key(4), (48, *SHAPE))
  labels = np.asarray(logits_fn(xs).argmax(1))
  radii, lip, info = certify.certified_radii(model, params, np.asarray(xs), labels)
  jac = np.asarray(jax.vmap(jax.jacrev(lambda x: logits_fn(x[None])[0]))(xs), np.float64)
  jac = jac.reshape(len(xs), K, -1)
  pair = np.linalg.norm(jac[:, :, None] - jac[:, None, :], axis=-1).max(0)
  assert np.all(pair <= lip) and pair.max() > 0.05 * lip.max()
  assert np.all(radii > 0) and info["probabilistic_norms"] == 0
  assert_pgd_breaks_no_certificate(logits_fn, xs, labels, radii, seed=5)


def _error_cases():
  conv, dense = nn.Conv(3, (3, 3)), nn.Dense(K)
  flat = linen_bridge.Flatten()
  return [
    (
      "max_pool",
      nn.Sequential([conv, functools.partial(nn.max_pool, window_shape=(2, 2)), flat, dense]),
      r"layers\[1\]: max pooling is not of the form.*average pooling",
    ),
    (
      "layer_norm",
      nn.Sequential([conv, nn.LayerNorm(), flat, dense]),
      r"LayerNorm divides by a statistic of its own input",
    ),
    (
      "attention",
      nn.Sequential([flat, nn.MultiHeadDotProductAttention(num_heads=1), dense]),
      r"MultiHeadDotProductAttention \(attention\)",
    ),
    (
      "batchnorm_training",
      nn.Sequential([conv, nn.BatchNorm(use_running_average=False), flat, dense]),
      r"use_running_average=False.*use_running_average=True",
    ),
    ("custom_module", CustomCNN(), r"custom module's __call__ cannot be read.*\(path, layer\)"),
    ("steps_without_path", [nn.Conv(3, (3, 3)), flat, dense], r"steps\[0\].*'Conv_0'"),
    ("wrong_path", [("Conv_7", conv), flat, ("Dense_0", dense)], r"no params at 'Conv_7'"),
  ]


@pytest.mark.parametrize("case", _error_cases(), ids=lambda c: c[0])
def test_models_that_do_not_fit_raise_clear_errors(case):
  _, model, match = case
  variables = {"params": {"layers_0": {}, "Conv_0": {}}}
  if isinstance(model, nn.Sequential):
    with pytest.raises(ValueError, match=match):
      variables = model.init(jax.random.key(0), jnp.zeros((1, *SHAPE)))
      linen_bridge.to_layers(model, variables, SHAPE)
  else:
    with pytest.raises(ValueError, match=match):
      linen_bridge.to_layers(model, variables, SHAPE)
  with pytest.raises(ValueError, match=r"variables must be what model.init returns"):
    linen_bridge.to_layers(STEPS, {"Conv_0": {}}, SHAPE)


def test_bound_is_differentiable_under_jit_in_the_linen_variables():
  module = _sequential()
  variables = _variables(module, seed=6)

  @jax.jit
  def bound_and_grad(variables):
    def total(v):
      net = linen_bridge.to_lipnet(module, v, SHAPE)
      lip, _ = liplt.liplt_bound(net, liplt.init_state(net, jax.random.key(0)), num_iters=3)
      return jnp.sum(lip)

    return jax.value_and_grad(total)(variables)

  value, grads = bound_and_grad(variables)
  g = np.asarray(grads["params"]["layers_1"]["scale"])  # the first BatchNorm's gamma
  assert np.isfinite(float(value)) and np.all(np.isfinite(g)) and np.abs(g).max() > 0
