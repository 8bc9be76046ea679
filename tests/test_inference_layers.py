"""BatchNorm, average pooling and Dropout at evaluation: operators, layer specs and bounds.

References independent of the code under test: explicit float64 matrices built with loops
(``tests.reference``), exact SVD norms, BatchNorm's formula written out, eq. 19 by hand,
sampled Jacobians, and an l2 PGD attack on the certified points.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crmjax import attacks, certify, models, network, soundness
from crmjax import layers as L
from crmjax import operators as ops
from tests import reference as ref

# (in_shape, window, strides, padding, count_include_pad)
POOLS = {
  "non_overlapping": ((6, 6, 2), (2, 3), (2, 3), ((0, 0), (0, 0)), True),
  "overlapping_padded": ((5, 6, 2), (3, 2), (1, 2), ((1, 1), (0, 1)), True),
  "exclude_pad": ((5, 6, 2), (3, 3), (2, 2), ((1, 1), (1, 1)), False),
}


@pytest.mark.parametrize("name", sorted(POOLS))
def test_avg_pool_operator_is_its_matrix(name):
  in_shape, window, strides, pads, include = POOLS[name]
  M, out_shape = ref.avg_pool_matrix(in_shape, window, strides, pads, include)
  op = ops.AvgPool(in_shape, window, strides, pads, include)
  assert op.out_shape == out_shape
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    x = rng.standard_normal((3, *in_shape))
    y = rng.standard_normal((3, *out_shape))
    np.testing.assert_allclose(np.asarray(op(x)).reshape(3, -1), x.reshape(3, -1) @ M.T, atol=1e-12)
    adj = np.asarray(ops.Adjoint(op)(y)).reshape(3, -1)  # the VJP of the operator
    np.testing.assert_allclose(adj, y.reshape(3, -1) @ M, atol=1e-12)
    np.testing.assert_allclose(
      np.asarray(op.abs()(x)).reshape(3, -1), x.reshape(3, -1) @ np.abs(M).T, atol=1e-12
    )
  # The bounds' exact l2 norm (materialised) and l_inf norm (|A| 1) of the operator itself.
  assert soundness.exact_norm(op, in_shape, out_shape) == pytest.approx(
    np.linalg.norm(M, 2), rel=1e-5
  )
  linf = float(np.max(np.asarray(op.abs()(jnp.ones(in_shape)))))
  assert linf == pytest.approx(np.abs(M).sum(1).max(), rel=1e-6)
  if name == "non_overlapping":  # disjoint rows: exactly 1 / sqrt(kh kw)
    assert np.linalg.norm(M, 2) == pytest.approx(1 / np.sqrt(6), rel=1e-12)


def test_global_avg_pool_operator():
  op = ops.GlobalAvgPool((3, 4, 2))
  M, out = ref.layer_matrix(L.GlobalAvgPool(), {}, (3, 4, 2))
  assert op.out_shape == out == (2,)
  x = np.random.default_rng(1).standard_normal((5, 3, 4, 2))
  with jax.enable_x64(True):
    np.testing.assert_allclose(np.asarray(op(x)), x.reshape(5, -1) @ M.T, atol=1e-12)
    np.testing.assert_allclose(np.asarray(ops.Adjoint(op)(np.eye(2))).reshape(2, -1), M, atol=1e-12)
  assert np.linalg.norm(M, 2) == pytest.approx(1 / np.sqrt(12))
  assert soundness.exact_norm(op, (3, 4, 2), (2,)) == pytest.approx(1 / np.sqrt(12), rel=1e-6)


def test_batchnorm_affine_is_the_batchnorm_formula():
  rng = np.random.default_rng(2)
  gamma, beta, mean = rng.standard_normal((3, 4))
  var = rng.uniform(0.1, 2.0, 4)
  x = rng.standard_normal((6, 4))
  with jax.enable_x64(True):
    p = L.batchnorm_affine(mean=mean, var=var, epsilon=1e-3, gamma=gamma, beta=beta)
    got = np.asarray(L.Sequential((L.BatchNorm(1e-3),)).apply({"params": {"layer_0": p}}, x))
  want = gamma * (x - mean) / np.sqrt(var + 1e-3) + beta
  np.testing.assert_allclose(got, want, rtol=1e-12)
  with pytest.raises(ValueError, match="variance"):
    L.batchnorm_affine(mean=mean, var=-var, epsilon=1e-3)


# A small CNN with every inference layer: BatchNorm after a conv (foldable), after an
# activation (not foldable) and after a dense layer (foldable), pooling, Dropout.
SHAPE = (6, 6, 1)
K = 3
LAYERS = (
  L.Conv(3, 3, 1, 1),
  L.BatchNorm(),
  L.Act(),
  L.AvgPool(2),
  L.Conv(4, 3, 1, 1),
  L.Act("leaky_relu", negative_slope=0.1),
  L.BatchNorm(),
  L.AvgPool(3, strides=1, padding=1),
  L.GlobalAvgPool(),
  L.Dropout(0.3),
  L.Dense(5),
  L.BatchNorm(),
  L.Act(),
  L.Dense(K),
)


def _params(seed=0, dtype=np.float32):
  """Kernels N(0, 1/fan_in), BatchNorm from random statistics (one negative gamma)."""
  model = models.Model("bn", LAYERS, SHAPE)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0)))
  rng = np.random.default_rng(seed)
  params = {}
  for name, p in shapes.items():
    layer = LAYERS[int(name.split("_")[1])]
    if isinstance(layer, L.BatchNorm):
      c = p["scale"].shape[0]
      gamma = rng.uniform(0.5, 2.0, c) * np.where(np.arange(c) == 0, -1, 1)
      p = L.batchnorm_affine(
        mean=0.3 * rng.standard_normal(c),
        var=rng.uniform(0.2, 2.0, c),
        epsilon=layer.epsilon,
        gamma=gamma,
        beta=0.1 * rng.standard_normal(c),
      )
      params[name] = {k: np.asarray(v, dtype) for k, v in p.items()}
    else:
      k = p["kernel"].shape
      params[name] = {
        "kernel": (rng.standard_normal(k) / np.sqrt(np.prod(k[:-1]))).astype(dtype),
        "bias": (0.1 * rng.standard_normal(k[-1])).astype(dtype),
      }
  return model, params


def test_layer_specs_forward_pass_is_the_float64_reference():
  model, params = _params(dtype=np.float64)
  x = np.random.default_rng(3).uniform(size=(4, *SHAPE))
  with jax.enable_x64(True):
    got = np.asarray(model.apply(params, x))
  # Written out: conv as a matrix + bias, BatchNorm's affine map, pooling matrices, ReLU.
  h, shape = x.reshape(4, -1), SHAPE
  for i, layer in enumerate(LAYERS):
    p = params.get(f"layer_{i}", {})
    if isinstance(layer, L.Act):
      h = np.where(h >= 0, h, layer.slope_bounds[0] * h)
      continue
    M, shape = ref.layer_matrix(layer, p, shape)
    h = h @ M.T
    if "bias" in p:
      h = h + np.broadcast_to(p["bias"], shape).ravel()
  np.testing.assert_allclose(got, h, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("method", ["liplt", "naive"])
def test_sound_bound_is_the_float64_reference(method, norm):
  model, params = _params()
  blocks, R = ref.blocks_of(LAYERS, params, SHAPE)
  want_fn = ref.liplt_reference if method == "liplt" else ref.naive_reference
  want = want_fn(blocks, R, mode="pairwise", norm=norm)
  want = want[0] if method == "liplt" else want
  got, info = soundness.sound_bound(model.lipnet(params), method=method, norm=norm)
  assert info["probabilistic_norms"] == 0  # small: every norm exact
  assert np.all(got >= want * (1 - 1e-6))
  if norm == "l2":  # l_inf chains are bounded by |A_n| .. |A_1| 1, not their exact norms
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-9)


def test_folded_batchnorm_same_function_and_bound():
  model, params = _params()
  layers, folded = L.fold_batchnorm(LAYERS, params)
  kinds = [type(l).__name__ for l in layers]
  assert kinds.count("BatchNorm") == 1  # the one after the activation stays diagonal
  assert len(layers) == len(LAYERS) - 2
  folded_model = models.Model("folded", layers, SHAPE)
  x = np.random.default_rng(4).uniform(size=(5, *SHAPE)).astype(np.float32)
  np.testing.assert_allclose(
    folded_model.apply(folded, x), model.apply(params, x), rtol=1e-5, atol=1e-5
  )
  composed_net, folded_net = model.lipnet(params), folded_model.lipnet(folded)
  assert len(composed_net.blocks) == len(folded_net.blocks)
  assert isinstance(composed_net.blocks[0].W, ops.Chain)  # Conv then Scale(gamma / sigma)
  assert isinstance(folded_net.blocks[0].W, ops.Conv)
  for method in ("liplt", "naive"):
    for norm in ("l2", "linf"):
      a, _ = soundness.sound_bound(composed_net, method=method, norm=norm)
      b, _ = soundness.sound_bound(folded_net, method=method, norm=norm)
      np.testing.assert_allclose(a, b, rtol=1e-5, err_msg=f"{method} {norm}")


NO_BOX = {"clip_min": -np.inf, "clip_max": np.inf}  # certificates hold in all of R^n


def _sampled_pair_norms(logits_fn, xs):
  jac = jax.vmap(jax.jacrev(lambda x: logits_fn(x[None])[0]))(xs)
  jac = np.asarray(jac, np.float64).reshape(len(xs), K, -1)
  return np.linalg.norm(jac[:, :, None] - jac[:, None, :], axis=-1).max(0)


def test_bound_exceeds_sampled_gradients_and_certificates_survive_pgd():
  model, params = _params(seed=2)
  logits_fn = functools.partial(model.apply, params)
  xs = jax.random.uniform(jax.random.key(5), (64, *SHAPE))
  labels = np.asarray(logits_fn(xs).argmax(1))  # every point correct: every radius > 0
  radii, lip, info = certify.certified_radii(model, params, np.asarray(xs), labels)
  pair = _sampled_pair_norms(logits_fn, xs)
  assert np.all(pair <= lip)
  assert pair.max() > 0.1 * lip.max()  # the sampled lower estimate is not trivial
  assert info["kind"] == "guaranteed upper bound" and np.all(radii > 0)
  attack = jax.jit(
    functools.partial(
      attacks.pgd_l2, logits_fn, num_steps=40, num_restarts=3, loss="multitarget", **NO_BOX
    )
  )
  inside = attack(xs, labels, key=jax.random.key(6), eps=0.999 * radii)
  attacks.raise_on_violation(np.ones(len(radii), bool), np.asarray(inside.success))
  # The same attack breaks every point further out (this pooled network's true radii are
  # 10 to 30 times the certified ones: the bound multiplies norms that averaging shrinks).
  outside = attack(xs, labels, key=jax.random.key(6), eps=30.0 * radii)
  assert np.asarray(outside.success).all()


def test_layer_specs_that_do_not_fit_raise():
  with pytest.raises(ValueError, match="window"):
    L.AvgPool(0)
  net = models.Model("p", (L.AvgPool(4), L.Flatten(), L.Dense(2)), (3, 3, 1))
  with pytest.raises(ValueError, match="empty"):
    net.lipnet({"layer_2": {"kernel": jnp.zeros((1, 2))}})
  with pytest.raises(ValueError, match=r"\(H, W, C\)"):
    network.from_layers((L.GlobalAvgPool(), L.Dense(2)), {"layer_1": {}}, (4,))


def test_lanczos_and_rescaled_bounds_handle_the_new_operators():
  """Lanczos (jax.vjp through pooling and BatchNorm) agrees with the exact norms, and the
  AOL-rescaled bound (|A| and the transposes of the operators) stays above gradients."""
  model, params = _params(seed=3)
  net = model.lipnet(params)
  exact, info = soundness.sound_bound(net)
  assert info["probabilistic_norms"] == 0
  lanczos, info = soundness.sound_bound(net, exact_max_dim=8, num_iters=200, key=0)
  assert info["probabilistic_norms"] > 0
  assert np.all(lanczos >= exact * (1 - 1e-6))
  np.testing.assert_allclose(lanczos, exact, rtol=0.05)
  aol, info = soundness.sound_bound(net, method="liplt_aol")
  assert info["rescaling"] == "aol"
  xs = jax.random.normal(jax.random.key(7), (64, *SHAPE))
  pair = _sampled_pair_norms(functools.partial(model.apply, params), xs)
  assert np.all(pair <= aol)
