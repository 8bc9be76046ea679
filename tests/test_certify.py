"""crmjax.certify and crmjax.soundness against float64 brute force and numpy references.

* Certified radii of tiny 2-D-input networks (sound pairwise bound) never exceed the true
  minimal adversarial distance, found by a dense polar search in float64; the sound and
  training bounds equal eq. 19 computed with explicit float64 matrices (up to the margin),
  and sampled gradient norms come within 7% of the bound on a near-tight network (a bound
  scaled by 0.9 fails both).
* The sound bound is >= the exact (SVD) LipLT / naive value of small conv chains, exact
  up to its margin of ``L + 1`` (LipLT) or ``2L + 1`` (naive) factors when the operators are
  materialised, and above the training power-iteration estimate; with probabilistic norms
  (Lanczos or power method), every interior norm is the exact norm inflated by exactly
  ``1 / sqrt(1 - rel_err)``.
* Certificates use logits at the highest matmul precision; ``certify.evaluate``.
(The failure probabilities and the Lanczos algorithm: ``test_lanczos.py``.)
"""

import dataclasses
import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crmjax import certify, liplt, models, network, refinement, soundness
from crmjax import layers as L
from tests import reference as ref

MARGIN = 1e-4  # soundness.sound_bound's default relative margin per norm


# ------------------------------------------------------------ 2-D brute-force radii

NETS_2D = {
  "relu_8": (L.Dense(8), L.Act(), L.Dense(3)),
  "leaky_6_6": (
    L.Dense(6),
    L.Act("leaky_relu", 0.2),
    L.Dense(6),
    L.Act("leaky_relu", 0.2),
    L.Dense(3),
  ),
  # slopes in [0.8, 1]: LipLT is within a few % of the true constant (sampled test)
  "leaky_tight": (
    L.Dense(6),
    L.Act("leaky_relu", 0.8),
    L.Dense(6),
    L.Act("leaky_relu", 0.8),
    L.Dense(3),
  ),
}


def _act_np(layer):
  s = 0.0 if layer.name == "relu" else layer.negative_slope
  return lambda u: np.where(u >= 0, u, s * u)


def _init(layers, shape, seed, bias_scale=0.0):
  """Random params of ``Sequential(layers)``: shapes from ``jax.eval_shape`` (no
  compilation), values from numpy (kernels ``N(0, 1 / fan_in)``, biases
  ``N(0, bias_scale^2)``)."""
  shapes = jax.eval_shape(
    lambda: L.Sequential(layers).init(jax.random.key(0), jnp.zeros((1, *shape)))
  )["params"]
  rng = np.random.default_rng(seed)

  def draw(path, a):
    if "bias" in jax.tree_util.keystr(path):
      return jnp.asarray(bias_scale * rng.normal(size=a.shape), jnp.float32)
    fan_in = int(np.prod(a.shape[:-1]))
    return jnp.asarray(rng.normal(size=a.shape) / np.sqrt(fan_in), jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _init_state(net, seed):
  """A ``PowerState`` of random unit rows (numpy; no compilation)."""
  shapes = jax.eval_shape(lambda: liplt.init_state(net, jax.random.key(0)))
  rng = np.random.default_rng(seed)

  def draw(a):
    v = rng.normal(size=a.shape)
    v /= np.linalg.norm(v.reshape(len(v), -1), axis=1).reshape((-1,) + (1,) * (v.ndim - 1))
    return jnp.asarray(v, jnp.float32)

  return jax.tree.map(draw, shapes)


def _net_2d(name, seed=0):
  layers = NETS_2D[name]
  # random biases so that the decision regions do not all meet at the origin
  return layers, _init(layers, (2,), seed, bias_scale=0.5)


def _forward64(layers, p):
  """The network as a float64 numpy function of ``(..., 2)`` inputs."""
  ws = []
  for i, l in enumerate(layers):
    if isinstance(l, L.Dense):
      q = p[f"layer_{i}"]
      ws.append(("dense", np.asarray(q["kernel"], np.float64), np.asarray(q["bias"], np.float64)))
    else:
      ws.append(("act", _act_np(l)))

  def f(x):
    for w in ws:
      x = x @ w[1] + w[2] if w[0] == "dense" else w[1](x)
    return x

  return f


def _min_adversarial_distance(f, x0, label, *, r_max=4.0, n_dirs=720, n_steps=200, n_bisect=30):
  """An upper bound on the true minimal distance (every value found is adversarial).

  Scans rays of a dense polar grid; on each ray, the first grid radius where the argmax
  differs from ``label`` is refined by bisection. Returns ``inf`` if nothing is found
  within ``r_max``; 0 if ``x0`` itself is not classified as ``label``.
  """
  if f(x0[None])[0].argmax() != label:
    return 0.0
  th = np.linspace(0.0, 2 * np.pi, n_dirs, endpoint=False)
  dirs = np.stack([np.cos(th), np.sin(th)], 1)
  rs = np.linspace(0.0, r_max, n_steps + 1)[1:]
  pts = x0 + rs[None, :, None] * dirs[:, None, :]  # (D, S, 2)
  adv = f(pts).argmax(-1) != label
  hit = adv.any(1)
  if not hit.any():
    return math.inf
  first = adv.argmax(1)[hit]
  d = dirs[hit]
  hi = rs[first]
  lo = np.where(first > 0, rs[np.maximum(first - 1, 0)], 0.0)
  for _ in range(n_bisect):
    mid = 0.5 * (lo + hi)
    a = f(x0 + mid[:, None] * d).argmax(-1) != label
    hi = np.where(a, mid, hi)
    lo = np.where(a, lo, mid)
  return float(hi.min())  # hi is always adversarial


def _check_against_eq19(net, layers, p, lip):
  """The sound bound is eq. 19 of the explicit float64 matrices up to its margin, and the
  training bound (converged power iteration) equals it up to float32 rounding."""
  blocks, R = ref.blocks_of(layers, jax.tree.map(np.asarray, p), (2,))
  want, _ = ref.liplt_reference(blocks, R, mode="pairwise")
  r = _ratio(lip, want, "pairwise")
  assert np.all(r >= 1.0) and np.all(r <= (1 + MARGIN) ** (len(blocks) + 1) + 1e-6), r
  train, _ = jax.jit(lambda n: liplt.liplt_bound(n, mode="pairwise", num_iters=300))(net)
  np.testing.assert_allclose(_ratio(train, want, "pairwise"), 1.0, rtol=1e-4)


@pytest.mark.parametrize("name", ["leaky_6_6", "relu_8"])
def test_sound_radii_below_brute_force_distance_2d(name):
  layers, p = _net_2d(name)
  f64 = _forward64(layers, p)
  net = network.from_layers(layers, p, (2,))
  lip, info = soundness.sound_bound(net, mode="pairwise")
  assert info["kind"] == "guaranteed upper bound"
  _check_against_eq19(net, layers, p, lip)
  rng = np.random.default_rng(1)
  x = rng.uniform(-1.5, 1.5, (16, 2))
  logits = np.asarray(L.Sequential(layers).apply({"params": p}, jnp.asarray(x, jnp.float32)))
  np.testing.assert_allclose(logits, f64(x), rtol=1e-5, atol=1e-5)
  labels = logits.argmax(1)
  labels[:3] = (labels[:3] + 1) % 3  # three misclassified points
  radii = certify.radii_of(logits, labels, lip)
  dist = np.array([_min_adversarial_distance(f64, xi, yi) for xi, yi in zip(x, labels)])
  assert np.all(radii[:3] == 0.0) and np.all(dist[:3] == 0.0)
  assert np.all(np.isfinite(dist[3:]))  # every correct point has an adversary in range
  assert np.all(radii <= dist), np.c_[radii, dist][radii > dist]
  ok = radii > 0
  print(
    f"{name}: R / true distance in [{(radii[ok] / dist[ok]).min():.3f}, "
    f"{(radii[ok] / dist[ok]).max():.3f}] on {ok.sum()} certified points"
  )
  assert np.sum(radii > 0) >= 6  # not vacuous
  # ... and the search is sharp enough to expose a bound 2.5x too small
  assert np.any(certify.radii_of(logits, labels, 0.4 * lip) > dist)
  # Same count as numpy, and never above the empirical robust accuracy.
  eps = [0.0, 0.01, 0.05, 0.1, 0.2, 0.5]
  got = certify.certified_accuracy(radii, eps)
  np.testing.assert_array_equal(got, [(radii > e).mean() for e in eps])
  assert np.all(got <= np.array([(dist > e).mean() for e in eps]))
  assert isinstance(certify.certified_accuracy(radii, 0.05), float)
  # The radius uses the pairwise bound of the label row: check against numpy.
  want = np.array(
    [
      max(0.0, min((z[y] - z[i]) / lip[y, i] for i in range(3) if i != y))
      for z, y in zip(logits.astype(np.float64), labels)
    ]
  )
  np.testing.assert_allclose(radii, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name,seed,tight", [("leaky_6_6", 3, 0.5), ("leaky_tight", 1, 0.93)])
def test_sound_pairwise_bound_above_sampled_gradient_norms_2d(name, seed, tight):
  """Away from kinks the margin's gradient is exact: ``||grad (z_i - z_j)|| <= L_ij``; on
  the near-tight network some pair comes within 7% of its bound."""
  layers, p = _net_2d(name, seed=seed)
  net = network.from_layers(layers, p, (2,))
  lip, _ = soundness.sound_bound(net, mode="pairwise")
  _check_against_eq19(net, layers, p, lip)
  f = lambda x: L.Sequential(layers).apply({"params": p}, x[None])[0]
  xs = jax.random.uniform(jax.random.key(0), (2048, 2), minval=-3, maxval=3)
  jac = np.asarray(jax.jit(jax.vmap(jax.jacfwd(f)))(xs), np.float64)  # (N, K, 2)
  pair = np.linalg.norm(jac[:, :, None] - jac[:, None, :], axis=-1).max(0)
  assert np.all(pair <= lip)
  off = ~np.eye(3, dtype=bool)
  assert (pair[off] / lip[off]).max() >= tight, (pair[off] / lip[off]).max()


def test_certified_accuracy_and_mean_pairwise():
  radii = np.array([0.0, 0.1, 0.3, 0.3, 1.0])
  np.testing.assert_allclose(
    certify.certified_accuracy(radii, [0.0, 0.1, 0.3, 2.0]), [0.8, 0.6, 0.2, 0.0]
  )
  assert certify.certified_accuracy(radii, 0.0) == 0.8  # radius 0 never counts
  np.testing.assert_array_equal(certify.certified_accuracy(np.zeros(0), [0.1, 0.2]), [0, 0])
  lip = np.array([[0.0, 1.0, 2.0], [1.0, 0.0, 6.0], [2.0, 6.0, 0.0]])
  assert certify.mean_pairwise(lip) == pytest.approx(3.0)


# --------------------------------------------------- sound bound vs exact references

K = 4
CONV_NETS = {
  "conv3": (
    (5, 5, 2),
    (
      L.Conv(3, 3, 1, 1),
      L.Act(),
      L.Conv(4, 3, 2, 1),
      L.Act(),
      L.Flatten(),
      L.Dense(6),
      L.Act("tanh"),
      L.Dense(K),
    ),
  ),
  "conv2": (
    (5, 5, 2),
    (
      L.Conv(3, 3, 1, 1),
      L.Act(),
      L.Conv(4, 3, 2, 1),
      L.Act("leaky_relu", 0.2),
      L.Flatten(),
      L.Dense(K),
    ),
  ),
  "residual_conv": (
    (4, 4, 2),
    (
      L.Conv(3, 3, 1, 1),
      L.Act("leaky_relu", 0.1),
      L.Residual((L.Conv(3, 3, 1, 1), L.Act(), L.Conv(3, 3, 1, 1))),
      L.Flatten(),
      L.Dense(K),
    ),
  ),
}


def _conv_net(name, seed=0):
  shape, layers = CONV_NETS[name]
  p = _init(layers, shape, seed)
  net = network.from_layers(layers, p, shape)
  blocks, R = ref.blocks_of(layers, jax.tree.map(np.asarray, p), shape)
  return net, blocks, R


def _estimates(net, state, method, norm="l2"):
  """The training bound in every mode (3 power iterations for l2), one compilation."""
  f = jax.jit(
    lambda n, s: [
      liplt.lipschitz_bound(n, s, method=method, mode=m, norm=norm, num_iters=3)[0]
      for m in liplt.MODES
    ]
  )
  return dict(zip(liplt.MODES, (np.asarray(b) for b in f(net, state))))


def _ratio(got, want, mode):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  if mode == "pairwise":
    assert np.all(np.diag(got) == 0.0)
    off = ~np.eye(got.shape[0], dtype=bool)
    got, want = got[off], want[off]
  return np.atleast_1d(got / want)


@pytest.mark.parametrize(
  "name,methods",
  [("conv2", ("liplt", "naive")), ("conv3", ("liplt",)), ("residual_conv", ("liplt", "naive"))],
)
def test_sound_bound_exact_materialisation(name, methods):
  net, blocks, R = _conv_net(name)
  n_blocks = len(net.blocks)
  state = _init_state(net, 1)
  refs = {
    "liplt": lambda m: ref.liplt_reference(blocks, R, mode=m)[0],
    "naive": lambda m: ref.naive_reference(blocks, R, mode=m),
  }
  ratios = []
  est = _estimates(net, state, "liplt")
  for method in methods:
    # the margin counts every multiplied norm: L + 1 in eq. 19, 2L + 1 in the naive product
    factors = n_blocks + 1 if method == "liplt" else 2 * n_blocks + 1
    bounds, info = soundness.sound_bounds(net, method=method)
    assert info["kind"] == "guaranteed upper bound" and info["probabilistic_norms"] == 0
    assert info["failure_probability"] == 0.0
    if method == "liplt":
      assert info["exact_norms"] == n_blocks * (n_blocks + 1) // 2
    for mode in liplt.MODES:
      r = _ratio(bounds[mode], refs[method](mode), mode)
      ratios.append(r)
      # sound, and exact up to the margin (1 + 1e-4)^factors plus float32 materialisation
      assert np.all(r >= (1 + MARGIN) ** factors * (1 - 1e-5)), (method, mode, r.min())
      assert np.all(r <= (1 + MARGIN) ** factors * (1 + 1e-5)), (method, mode, r.max())
      if method == "liplt":
        assert np.all(np.asarray(bounds[mode]) >= est[mode]), mode
    assert info["margin_factors"] == factors
  ratios = np.concatenate(ratios)
  print(f"{name}: sound / exact in [{ratios.min():.7f}, {ratios.max():.7f}]")


def _interior_exact(blocks):
  """{'A[e,t]': exact norm of W_e Hhat_{e-1} .. Hhat_t G_{t-1}} from explicit matrices."""
  hh = [ref._hhat(*b) for b in blocks]  # pylint: disable=protected-access
  out = {}
  for e in range(len(blocks)):
    for t in range(e + 1):
      P = blocks[e][0]
      for k in range(e - 1, t - 1, -1):
        P = P @ hh[k][0]
      if t:
        P = P @ hh[t - 1][1]
      out[f"A[{e},{t}]"] = np.linalg.norm(P, 2)
  return out


@pytest.mark.parametrize("estimator,num_iters", [("lanczos", 300), ("lanczos", 20), ("power", 300)])
def test_sound_bound_probabilistic(estimator, num_iters):
  """Every interior norm is the exact norm times 1 / sqrt(1 - rel_err) (the estimates have
  converged on these small operators), and the whole bound is sound."""
  net, blocks, R = _conv_net("conv2")
  state = _init_state(net, 2)
  est = _estimates(net, state, "liplt")
  n_blocks = len(net.blocks)
  exact = _interior_exact(blocks)
  bounds, info = soundness.sound_bounds(
    net, exact_max_dim=1, num_iters=num_iters, estimator=estimator, key=11
  )
  assert info["exact_norms"] == 0 and info["estimator"] == estimator
  assert info["probabilistic_norms"] == n_blocks * (n_blocks + 1) // 2 == len(exact)
  assert info["kind"] == "upper bound with probability >= 0.999999"
  assert info["key"] == 11 and info["num_iters"] == num_iters
  rel = soundness.lanczos_rel_err if estimator == "lanczos" else soundness.power_rel_err
  for d in info["norms"]:
    k = min(num_iters, d["n"]) if estimator == "lanczos" else num_iters
    assert d["rel_err"] == rel(n=d["n"], num_iters=k, delta=1e-6 / len(exact))
    assert 0.0 < d["rel_err"] < 0.5
    inflation = 1.0 / math.sqrt(1.0 - d["rel_err"])
    # >= exact: sound; == exact * inflation: the inflation is applied, the estimate converged
    # (the power method converges slowly: 300 iterations reach 1e-4, Lanczos 1e-7)
    np.testing.assert_allclose(
      d["value"] / exact[d["operator"]],
      inflation,
      rtol=1e-5 if estimator == "lanczos" else 1e-3,
      err_msg=d["operator"],
    )
    assert d["value"] >= exact[d["operator"]], d
  np.testing.assert_allclose(
    np.asarray(info["interior_norms"])[np.tril_indices(n_blocks)],
    [
      d["value"]
      for d in sorted(info["norms"], key=lambda d: (int(d["operator"][2]), int(d["operator"][4])))
    ],
    rtol=1e-12,
  )
  infl = info["max_relative_inflation"]
  for mode in liplt.MODES:
    want, _ = ref.liplt_reference(blocks, R, mode=mode)
    r = _ratio(bounds[mode], want, mode)
    assert np.all(r >= 1.0), (mode, r.min())
    assert np.all(r <= ((1 + infl) * (1 + MARGIN)) ** (n_blocks + 1) * (1 + 1e-4)), r.max()
    assert np.all(np.asarray(bounds[mode]) >= est[mode])
  # A warm start (training vectors) can only raise the estimates (max of warm and fresh):
  # still sound, and not below the cold bound with the same iterations and key.
  warm, info = soundness.sound_bound(
    net, exact_max_dim=1, num_iters=num_iters, warm=state, estimator=estimator, key=11
  )
  assert info["probabilistic_norms"] > 0
  assert np.all(warm >= bounds["pairwise"] * (1 - 1e-6))
  assert np.all(_ratio(warm, ref.liplt_reference(blocks, R)[0], "pairwise") >= 1.0)
  # one iteration gives no guarantee at all (rel_err = 1)
  with pytest.raises(ValueError, match="raise num_iters"):
    soundness.sound_bound(net, exact_max_dim=1, num_iters=1, estimator=estimator)


def test_linf_sound_bound_is_the_linf_liplt_bound_times_the_margin():
  net, blocks, R = _conv_net("conv2")
  n_blocks = len(net.blocks)
  est = _estimates(net, None, "liplt", norm="linf")
  for mode in liplt.MODES:
    got, info = soundness.sound_bound(net, mode=mode, norm="linf")
    assert info["kind"] == "guaranteed upper bound" and info["norm"] == "linf"
    np.testing.assert_allclose(
      got, est[mode].astype(np.float64) * (1 + MARGIN) ** (n_blocks + 1), rtol=1e-6
    )
    exact, _ = ref.liplt_reference(blocks, R, mode=mode, norm="linf")
    assert np.all(np.asarray(got) >= exact), mode


def test_exact_norm_matches_svd_both_sides():
  rng = np.random.default_rng(0)
  for shape in [(5, 9), (9, 5)]:
    A = rng.normal(size=shape).astype(np.float32)
    fn = lambda u: u @ jnp.asarray(A).T
    got = soundness.exact_norm(fn, (shape[1],), (shape[0],), chunk=2)
    np.testing.assert_allclose(got, np.linalg.norm(A.astype(np.float64), 2), rtol=1e-6)


# ------------------------------------------------------------------- evaluate

KEYS = {
  "clean_accuracy",
  "eps",
  "method",
  "estimate_mean_pairwise_lipschitz",
  "estimate_certified_accuracy",
  "certified_accuracy",
  "mean_pairwise_lipschitz",
  "bound_kind",
  "mean_certified_radius",
}


def _tiny_model():
  layers = (L.Conv(2, 3, 2, 1), L.Act(), L.Flatten(), L.Dense(3))
  model = models.Model("tiny", layers, (6, 6, 1))
  params = _init(layers, (6, 6, 1), 0)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (7, 6, 6, 1), dtype=np.uint8)
  logits = np.asarray(jax.jit(model.apply)(params, jnp.asarray(images, jnp.float32) / 255.0))
  labels = logits.argmax(1)
  labels[:2] = (labels[:2] + 1) % 3
  return model, params, images, labels, logits


def test_batched_logits_uint8():
  model, params, images, _, logits = _tiny_model()
  got = certify.batched_logits(model, params, images, batch_size=3)
  np.testing.assert_allclose(got, logits, rtol=1e-5, atol=1e-6)
  assert certify.batched_logits(model, params, images[:0], batch_size=3).shape == (0, 3)


def test_batched_logits_float_images_in_unit_range():
  model, params, images, _, logits = _tiny_model()
  got = certify.batched_logits(model, params, images.astype(np.float32) / 255, batch_size=3)
  np.testing.assert_allclose(got, logits, rtol=1e-5, atol=1e-6)


def test_certificates_use_highest_precision_logits():
  """Every dot and convolution of the certificate's logits carries HIGHEST precision (no
  TF32 / bf16 passes on GPUs), unlike JAX's default; the logits match float64 numpy."""
  model, params, images, _, _ = _tiny_model()
  x = jnp.asarray(images, jnp.float32) / 255

  def products(text):
    return [
      l for l in text.splitlines() if "stablehlo.convolution" in l or "stablehlo.dot_general" in l
    ]

  lowered = products(certify.certified_apply(model).lower(params, x).as_text())
  assert len(lowered) == 2 and all("HIGHEST" in l for l in lowered), lowered
  default = products(jax.jit(model.apply).lower(params, x).as_text())
  assert len(default) == 2 and not any("HIGHEST" in l for l in default), default
  # float64 reference: the conv as an explicit matrix, then ReLU and the dense layer
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  conv, _ = ref.conv_matrix(p["layer_0"]["kernel"], (6, 6, 1), 2, 1)
  h = np.maximum(
    np.asarray(x, np.float64).reshape(7, -1) @ conv.T + np.tile(p["layer_0"]["bias"], 9), 0
  )
  want = h @ p["layer_3"]["kernel"] + p["layer_3"]["bias"]
  got = certify.batched_logits(model, params, images, batch_size=3)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_margin_gradients_run_at_highest_precision_with_params_as_an_argument():
  """Every dot and convolution of the Jacobian program carries HIGHEST precision, and the
  params are arguments (not constants baked into the program): one compile serves new
  params."""
  model, params, images, _, _ = _tiny_model()
  x = jnp.asarray(images, jnp.float32) / 255
  fn = certify.margin_gradient_fn(model)
  text = fn.lower(params, x).as_text()
  ops = [l for l in text.splitlines() if "convolution" in l or "dot_general" in l]
  assert len(ops) >= 3 and all("HIGHEST" in l for l in ops), ops
  counted = jax.jit(chex.assert_max_traces(fn.__wrapped__, n=1))
  other = jax.tree.map(lambda a: 2 * a, params)  # both layers doubled: gradients x 4
  np.testing.assert_allclose(counted(other, x), 4 * counted(params, x), rtol=1e-5, atol=1e-6)


def test_margin_gradient_norms_and_first_order_radii_match_float64_numpy_on_the_tiny_net():
  """At each point and pair, ``||grad (z_i - z_j)||`` against the Jacobian written out in
  float64 numpy (``W_dense^T diag(relu'(pre)) conv``); uint8 and float images and any batch
  size give the same. The first-order radii against eq. 5 computed point by point."""
  model, params, images, labels, logits = _tiny_model()
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  conv, _ = ref.conv_matrix(p["layer_0"]["kernel"], (6, 6, 1), 2, 1)
  x = images.reshape(7, -1).astype(np.float64) / 255
  pre = x @ conv.T + np.tile(p["layer_0"]["bias"], 9)
  jac = np.einsum("mk,nm,md->nkd", p["layer_3"]["kernel"], (pre > 0).astype(float), conv)
  want = np.linalg.norm(jac[:, :, None] - jac[:, None, :], axis=-1)  # (7, 3, 3)
  assert want[:, 0, 1].min() > 0 and np.all(want[:, [0, 1, 2], [0, 1, 2]] == 0)
  assert not np.allclose(want[0], want[1])  # the points have different activation patterns
  for imgs, batch in ((images, 3), (images.astype(np.float32) / 255, 100)):
    got = certify.margin_gradient_norms(model, params, imgs, batch_size=batch)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  assert certify.margin_gradient_norms(model, params, images[:0]).shape == (0, 3, 3)
  radii = certify.first_order_radii(logits, labels, want)
  for n, (z, y) in enumerate(zip(logits.astype(np.float64), labels)):
    r = min((z[y] - z[i]) / want[n, y, i] for i in range(3) if i != y)
    assert radii[n] == pytest.approx(max(r, 0.0), rel=1e-5, abs=1e-7), n
  assert radii[:2].max() == 0 and radii[2:].min() > 0  # the first two are misclassified


@pytest.mark.parametrize("name,seed", [("relu_8", 0), ("leaky_tight", 1)])
def test_margin_gradient_norms_stay_below_the_sound_bound_and_reach_a_linear_nets(name, seed):
  """A lower bound of every valid ``L_ij``: below the sound pairwise bound of a 2-D net
  (within 7% of it on the near-tight net), and equal to ``||w_i - w_j||``, the exact
  constant, on a linear one."""
  layers, p = _net_2d(name, seed=seed)
  model = models.Model(name, layers, (2,))
  lip, _ = soundness.sound_bound(model.lipnet(p), mode="pairwise")
  xs = np.asarray(jax.random.uniform(jax.random.key(0), (2048, 2), minval=-3, maxval=3))
  low = certify.margin_gradient_norms(model, p, xs, batch_size=512).max(0)
  off = ~np.eye(3, dtype=bool)
  assert np.all(low[off] > 0) and np.all(low <= lip)
  if name == "leaky_tight":
    assert (low[off] / lip[off]).max() >= 0.93
  linear = models.Model("linear", (L.Dense(3),), (2,))
  w = np.asarray(jax.random.normal(jax.random.key(seed), (2, 3)), np.float64)
  params = {"layer_0": {"kernel": w, "bias": np.zeros(3)}}
  exact = np.linalg.norm(w.T[:, None] - w.T[None, :], axis=-1)
  got = certify.margin_gradient_norms(linear, params, xs[:5])
  np.testing.assert_allclose(got, np.broadcast_to(exact, (5, 3, 3)), rtol=1e-5, atol=1e-6)


KEYS |= {"certified_accuracy_at"}


@pytest.mark.parametrize("method", ["liplt", "naive"])
def test_evaluate(method):
  model, params, images, labels, logits = _tiny_model()
  net = model.lipnet(params)
  power = _init_state(net, 1)
  out = certify.evaluate(
    model,
    params,
    power,
    images,
    labels,
    eps=0.01,
    batch_size=3,
    eval_iters=5,
    method=method,
    sound=soundness.SoundSettings(iterations=200),
    extra_eps=(0.005, 0.01, 0.02),
  )
  assert KEYS | {"bound_details"} == set(out)
  assert out["bound_kind"] == "guaranteed upper bound"
  assert out["method"] == method and out["eps"] == 0.01
  details = out["bound_details"]
  assert details["method"] == method and details["failure_probability"] == 0.0
  assert details["probabilistic_norms"] == 0 and details["exact_norms"] > 0
  assert {"estimator", "key", "seconds"} <= set(details)
  assert out["clean_accuracy"] == pytest.approx((logits.argmax(1) == labels).mean())
  assert out["clean_accuracy"] == pytest.approx(5 / 7)
  assert out["certified_accuracy"] <= out["clean_accuracy"]
  assert out["estimate_certified_accuracy"] <= out["clean_accuracy"]
  # the sound bound is above the estimate, so it certifies less
  assert out["mean_pairwise_lipschitz"] >= out["estimate_mean_pairwise_lipschitz"]
  assert out["certified_accuracy"] <= out["estimate_certified_accuracy"]
  lip, _ = soundness.sound_bound(net, method=method, mode="pairwise")
  radii = certify.radii_of(logits, labels, lip)
  assert out["mean_certified_radius"] == pytest.approx(radii.mean(), rel=1e-5, abs=1e-7)
  assert out["certified_accuracy"] == pytest.approx((radii > 0.01).mean())
  assert out["mean_pairwise_lipschitz"] == pytest.approx(certify.mean_pairwise(lip))
  # extra radii: keys of 4 significant digits, the primary eps once
  assert list(out["certified_accuracy_at"]) == ["0.01", "0.005", "0.02"]
  for e in (0.005, 0.01, 0.02):
    assert out["certified_accuracy_at"][certify.eps_key(e)] == pytest.approx((radii > e).mean())
  assert out["certified_accuracy_at"]["0.01"] == out["certified_accuracy"]
  assert certify.eps_key(36 / 255) == "0.1412" and certify.eps_key(18 / 255) == "0.07059"

  out = certify.evaluate(
    model,
    params,
    power,
    images,
    labels,
    eps=0.01,
    batch_size=4,
    eval_iters=5,
    method=method,
    sound=None,
  )
  assert set(out) == KEYS
  assert out["bound_kind"] == "power-iteration estimate (not guaranteed)"
  assert out["certified_accuracy"] == out["estimate_certified_accuracy"]
  assert out["certified_accuracy"] <= out["clean_accuracy"]


def test_evaluate_probabilistic_bound_states_key_and_reproduces():
  model, params, images, labels, _ = _tiny_model()
  power = _init_state(model.lipnet(params), 1)
  kw = dict(eps=0.01, batch_size=7, eval_iters=5)
  sound = soundness.SoundSettings(iterations=30, exact_size=1)
  out = certify.evaluate(model, params, power, images, labels, sound=sound, **kw)
  d = out["bound_details"]
  assert d["estimator"] == "lanczos" and d["num_iters"] == 30 and d["exact_norms"] == 0
  assert d["probabilistic_norms"] == 1 and d["failure_probability"] == 1e-6
  assert out["bound_kind"] == "upper bound with probability >= 0.999999"
  assert isinstance(d["key"], int) and d["key"] >= 0
  sound = dataclasses.replace(sound, key=d["key"])
  again = certify.evaluate(model, params, power, images, labels, sound=sound, **kw)
  assert again["mean_pairwise_lipschitz"] == out["mean_pairwise_lipschitz"]
  assert again["bound_details"]["norms"] == d["norms"]
  json.dumps(out)  # JSON-ready


def test_evaluate_with_scales_certifies_with_the_per_pair_minimum_of_two_sound_bounds():
  """With a rescaling D (the one training used), every bound is the per-pair minimum of the
  network's bound and that of ``rescale(net, D)``, both valid: the sound one equals that
  minimum of two independently computed sound bounds, stays above every pair's exact margin
  gradient at sampled inputs, and the two probabilistic bounds share the failure
  probability (union bound)."""
  model, params, images, labels, logits = _tiny_model()
  net = model.lipnet(params)
  power = _init_state(net, 1)
  # A D that lowers one pair's bound and raises the others': the optimised D, perturbed.
  opt, _ = refinement.optimize_scales(net, mode="pairwise", steps=100)
  noise = np.random.default_rng(14).uniform(0.5, 2.0, net.blocks[0].phi_shape)
  scales = [opt[0] * jnp.asarray(noise, jnp.float32)]
  kw = dict(eps=0.01, batch_size=7, eval_iters=5)
  out = certify.evaluate(model, params, power, images, labels, scales=scales, **kw)
  plain, _ = soundness.sound_bound(net, mode="pairwise")
  scaled, _ = soundness.sound_bound(net, scales=scales, mode="pairwise")
  off = ~np.eye(3, dtype=bool)
  assert np.any(scaled[off] < plain[off]) and np.any(scaled[off] > plain[off])
  want = np.minimum(plain, scaled)
  assert out["mean_pairwise_lipschitz"] == pytest.approx(certify.mean_pairwise(want))
  assert out["bound_details"]["rescaled"]["pairs_from_rescaled"] == np.triu(scaled < plain, 1).sum()
  radii = certify.radii_of(logits, labels, want)
  assert out["certified_accuracy"] == pytest.approx((radii > 0.01).mean())
  assert out["mean_certified_radius"] == pytest.approx(radii.mean(), rel=1e-5, abs=1e-7)
  f = lambda x: model.apply(params, x[None])[0]
  xs = jax.random.uniform(jax.random.key(0), (512, 6, 6, 1))
  jac = np.asarray(jax.jit(jax.vmap(jax.jacfwd(f)))(xs), np.float64).reshape(512, 3, -1)
  pair = np.linalg.norm(jac[:, :, None] - jac[:, None, :], axis=-1).max(0)
  assert np.all(pair[off] <= want[off])
  est_plain = certify.evaluate(model, params, power, images, labels, sound=None, **kw)
  assert out["estimate_mean_pairwise_lipschitz"] < est_plain["estimate_mean_pairwise_lipschitz"]
  sound = soundness.SoundSettings(iterations=30, exact_size=1)
  out = certify.evaluate(model, params, power, images, labels, scales=scales, sound=sound, **kw)
  assert out["bound_details"]["failure_probability"] == pytest.approx(1e-6, rel=1e-12)
  assert out["bound_details"]["probabilistic_norms"] == 1
  assert out["bound_kind"] == "upper bound with probability >= 0.999999"
  with pytest.raises(ValueError, match="'liplt' bound only"):
    certify.evaluate(model, params, power, images, labels, method="naive", scales=scales, **kw)
