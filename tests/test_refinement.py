"""Theorem 3.2 (l2 refinement of the one-layer bound) and its multi-layer use."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crmjax import layers as L
from crmjax import liplt, network, rescaling, soundness
from crmjax import operators as ops
from crmjax import refinement as R
from tests import reference as ref

ITERS = 2000
try:
  import cvxpy  # noqa: F401  (the 'sdp' choice of T)

  HAVE_CVXPY = True
except ImportError:
  HAVE_CVXPY = False
needs_cvxpy = pytest.mark.skipif(not HAVE_CVXPY, reason="cvxpy not installed (dev extra)")


def _layer(seed, n=6, m=9, residual=True):
  """W (m, n), G (n, m) with columns of very different norms, H = I (a residual layer)."""
  rng = np.random.default_rng(seed)
  W = rng.normal(size=(m, n)) / np.sqrt(n)
  G = rng.normal(size=(n, m)) * rng.uniform(0.05, 2.0, size=m) / np.sqrt(m)
  return W, G, (np.eye(n) if residual else None), rng.normal(size=m) * 0.3


def _lower(W, G, H, alpha, beta, b, num=4000, seed=0):
  """max ||J(x)||_2 over random x of h(x) = H x + G phi(W x + b), phi piecewise linear."""
  xs = np.random.default_rng(seed).normal(size=(num, W.shape[1])) * 2.0
  lam = np.where(xs @ W.T + b > 0, beta, alpha)  # (num, m)
  J = np.einsum("pm,km,mn->kpn", G, lam, W) + (0.0 if H is None else H)
  return np.linalg.norm(J, 2, axis=(1, 2)).max()


@pytest.mark.parametrize("t_choice", R.T_CHOICES)
def test_t_dominates_gram(t_choice):
  if t_choice == "sdp" and not HAVE_CVXPY:
    pytest.skip("cvxpy not installed")
  with jax.enable_x64(True):
    for seed in range(3):
      W, G, _, _ = _layer(seed)
      q = np.exp(np.random.default_rng(seed).normal(size=W.shape[0]))
      t = np.asarray(R.choose_t(W, G, t_choice=t_choice, q=q))
      assert np.all(t > 0)
      assert np.linalg.eigvalsh(np.diag(t) - G.T @ G).min() >= -1e-6


def test_bound_is_sound_and_spectral_is_plain_liplt():
  with jax.enable_x64(True):
    for seed, (alpha, beta) in enumerate([(0.0, 1.0), (0.1, 1.0), (0.0, 1.0)]):
      W, G, H, b = _layer(seed, residual=seed != 2)
      low = _lower(W, G, H, alpha, beta, b, seed=seed)
      q = np.exp(np.random.default_rng(seed).normal(size=W.shape[0]))
      for t_choice in R.T_CHOICES if HAVE_CVXPY else R.T_CHOICES[:3]:
        got = float(R.layer_bound(W, G, H, alpha, beta, t_choice=t_choice, q=q))
        assert got >= low * (1 - 1e-9), (seed, t_choice)
      spectral = float(R.layer_bound(W, G, H, alpha, beta, t_choice="spectral"))
      np.testing.assert_allclose(
        spectral, float(R.plain_layer_bound(W, G, H, alpha, beta)), rtol=1e-10
      )
      # ... and plain LipLT (crmjax.liplt, eq. 19) of the one-block network with R = I.
      n, p = W.shape[1], G.shape[0]
      block = network.Block(
        ops.Dense(jnp.asarray(W.T, jnp.float32)),
        ops.Dense(jnp.asarray(G.T, jnp.float32)),
        None if H is None else ops.Identity((n,)),
        alpha=alpha,
        beta=beta,
      )
      net = network.LipNet((block,), ops.Identity((p,)))
      lt, _ = jax.jit(lambda nt: liplt.liplt_bound(nt, mode="global", num_iters=ITERS))(net)
      np.testing.assert_allclose(float(lt), spectral, rtol=1e-5)


@needs_cvxpy
def test_aol_and_sll_tighter_than_spectral_here():
  with jax.enable_x64(True):
    W, G, H, _ = _layer(0)
    spectral = float(R.layer_bound(W, G, H, t_choice="spectral"))
    aol = float(R.layer_bound(W, G, H, t_choice="aol"))
    q = np.linalg.norm(G, axis=0)  # any q > 0 is valid
    sll = float(R.layer_bound(W, G, H, t_choice="sll", q=q))
    sdp = float(R.layer_bound(W, G, H, t_choice="sdp"))
    assert aol < 0.95 * spectral and sll < spectral
    assert sdp <= min(aol, sll, spectral) * (1 + 1e-6)
    # Feed-forward layer (G = I): every choice gives T = I, the plain bound.
    for c in ("aol", "sll"):
      np.testing.assert_allclose(
        float(R.layer_bound(W, None, None, t_choice=c)), float(R.plain_layer_bound(W)), rtol=1e-10
      )


def test_refined_liplt_is_sound_and_rescaling_keeps_the_function():
  shape = (8,)
  layers = (
    L.Dense(16),
    L.Act(),
    L.Dense(16),
    L.Act("leaky_relu", 0.1),
    L.Dense(8),
    L.Act(),
    L.Residual((L.Dense(12), L.Act(), L.Dense(8))),
    L.Dense(4),
  )
  init = jax.jit(L.Sequential(layers).init)
  p = init(jax.random.key(0), jnp.zeros((1, *shape)))["params"]
  x = np.random.default_rng(3).normal(size=(512, *shape)) * 2.0

  @jax.jit  # one compilation instead of many eager ones
  def run(p, x):
    net = network.from_layers(layers, p, shape)
    scaled = rescaling.rescale(net, R.refined_scales(net))
    state = liplt.init_state(net, jax.random.key(1))
    plain = liplt.liplt_bound(net, state, mode="global", num_iters=ITERS)[0]
    refined = R.refined_liplt_bound(net, state, mode="global", num_iters=ITERS)[0]
    return net(x), scaled(x), plain, refined, all(b.G is not None for b in scaled.blocks)

  fx, gx, plain, refined, has_g = run(p, x)
  assert has_g
  np.testing.assert_allclose(gx, fx, rtol=1e-4, atol=1e-5)  # same function (ReLU / leaky)
  # Exact Jacobians of the bias-free network (the bounds ignore biases) from explicit
  # float64 matrices: R prod_k (H_k + G_k diag(phi_k'(W_k x_k)) W_k).
  blocks, Rm = ref.blocks_of(layers, jax.tree.map(np.asarray, p), shape)
  low = 0.0
  for z in x:
    J = np.eye(shape[0])
    for W, G, H, a, b in blocks:
      u = W @ z
      lam = np.where(u >= 0, b, a)
      Gm = np.eye(len(u)) if G is None else G
      Hz, HJ = (0.0, 0.0) if H is None else (H @ z, H @ J)
      z, J = Hz + Gm @ (lam * u), HJ + Gm @ (lam[:, None] * (W @ J))
    low = max(low, np.linalg.norm(Rm @ J, 2))
  np.testing.assert_allclose(Rm @ z, fx[-1], rtol=1e-4, atol=1e-5)
  plain, refined = float(plain), float(refined)
  assert low <= refined * (1 + 1e-4) and low <= plain * (1 + 1e-4)
  assert refined < plain  # measured: the AOL rescaling helps this network


# ---------------------------------------------------------------------- optimised scales

OPT_NETS = {
  "dense": (
    (6,),
    (L.Dense(12), L.Act(), L.Dense(12), L.Act("leaky_relu", 0.1), L.Dense(10), L.Act(), L.Dense(5)),
  ),
  "residual": (
    (6,),
    (
      L.Dense(8),
      L.Act(),
      L.Residual((L.Dense(12), L.Act(), L.Dense(8))),
      L.Residual((L.Dense(12), L.Act(), L.Dense(8))),
      L.Dense(5),
    ),
  ),
  "conv": (
    (5, 5, 2),
    (L.Conv(3, 3, 1, 1), L.Act(), L.Conv(4, 3, 2, 1), L.Act(), L.Flatten(), L.Dense(5)),
  ),
}


def _opt_net(name, seed=0):
  """``(net, float64 blocks, R, input shape)`` with LeCun-normal numpy weights (the param
  shapes from ``jax.eval_shape``: no Flax compilation)."""
  shape, layers = OPT_NETS[name]
  shapes = jax.eval_shape(L.Sequential(layers).init, jax.random.key(0), jnp.zeros((1, *shape)))[
    "params"
  ]
  rng = np.random.default_rng(seed)
  p = jax.tree.map(
    lambda s: jnp.asarray(
      rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]) if len(s.shape) > 1 else 10.0),
      jnp.float32,
    ),
    shapes,
  )
  net = network.from_layers(layers, p, shape)
  blocks, Rm = ref.blocks_of(layers, jax.tree.map(np.asarray, p), shape)
  return net, blocks, Rm, shape


def _rescaled_blocks(blocks, scales):
  """float64 ``W <- D W``, ``G <- G D^{-1}`` (``scales`` flattened like the HWC matrices)."""
  out = []
  for (W, G, H, a, b), d in zip(blocks, scales):
    d = np.asarray(d, np.float64).ravel()
    Gm = np.eye(W.shape[0]) if G is None else G
    out.append((d[:, None] * W, Gm / d[None, :], H, a, b))
  return out


def _numpy_aol_scales(blocks, Rm):
  """``T^{1/2}``, ``T_ii = sum_j (|A|^T |A|)_ij`` of the operator A reading each ``phi_k``."""
  out = []
  for k, (_, G, _, _, _) in enumerate(blocks):
    A = G if G is not None else (blocks[k + 1][0] if k + 1 < len(blocks) else Rm)
    out.append(np.sqrt(np.maximum((np.abs(A).T @ np.abs(A)).sum(axis=1), 1e-30)))
  return out


def _mean_pairwise(b):
  b = np.asarray(b, np.float64)
  return b.sum() / (b.shape[0] * (b.shape[0] - 1))


def _pairwise_lower(blocks, Rm, shape, num=2000, seed=0):
  """max over random x of ``|(e_i - e_j)^T J(x)|_2``: exact float64 Jacobians of the
  bias-free network (the bounds ignore biases), a lower bound of every ``L_ij``."""
  xs = np.random.default_rng(seed).normal(size=(num, int(np.prod(shape))))
  z, J = xs, np.broadcast_to(np.eye(xs.shape[1]), (num, xs.shape[1], xs.shape[1]))
  for W, G, H, a, b in blocks:
    u = z @ W.T
    lam = np.where(u >= 0, b, a)
    Gm = np.eye(W.shape[0]) if G is None else G
    nz, nJ = (lam * u) @ Gm.T, Gm @ (lam[:, :, None] * (W @ J))
    z, J = (nz, nJ) if H is None else (nz + z @ H.T, nJ + H @ J)
  rows = Rm @ J  # (num, K, n)
  diff = rows[:, :, None, :] - rows[:, None, :, :]
  return np.linalg.norm(diff, axis=-1).max(axis=0)  # (K, K)


@pytest.mark.parametrize("name", sorted(OPT_NETS))
def test_optimized_scales_beat_plain_and_aol_liplt_and_stay_sound(name):
  net, blocks, Rm, shape = _opt_net(name)
  scales, info = R.optimize_scales(net, mode="pairwise", steps=200)
  assert info["norms"] == "exact" and len(info["history"]) == 200
  # Independent float64 references: eq. 19 with explicit matrices and exact norms of the
  # rescaled network, numpy AOL scales.
  aol = _numpy_aol_scales(blocks, Rm)
  ref_of = lambda s: ref.liplt_reference(_rescaled_blocks(blocks, s), Rm, mode="pairwise")[0]
  plain, aol_b = ref.liplt_reference(blocks, Rm, mode="pairwise")[0], ref_of(aol)
  opt = ref_of([np.asarray(s) for s in scales])
  assert all(np.all(np.asarray(s) > 0) for s in scales)
  np.testing.assert_allclose(_mean_pairwise(opt), info["bound"], rtol=1e-4)
  # (a) never worse than plain LipLT nor the AOL rescaling -- here strictly better.
  assert _mean_pairwise(opt) <= 0.99 * min(_mean_pairwise(plain), _mean_pairwise(aol_b)), (
    _mean_pairwise(opt),
    _mean_pairwise(plain),
    _mean_pairwise(aol_b),
  )
  # (b) still an upper bound of every pair's Lipschitz constant.
  low = _pairwise_lower(blocks, Rm, shape)
  assert np.all(low <= opt * (1 + 1e-6) + 1e-9), (low / np.where(opt > 0, opt, 1)).max()
  if name == "conv":  # the rescaled conv net (3-D phi shapes) is the same function
    x = np.random.default_rng(1).normal(size=(64, *shape)).astype(np.float32)
    np.testing.assert_allclose(rescaling.rescale(net, scales)(x), net(x), rtol=1e-4, atol=1e-5)


def test_rescaled_sound_bounds_are_exact_and_liplt_aol_matches_the_reference():
  """``sound_bound(method='liplt_aol')`` and ``sound_bound(scales=...)`` are guaranteed and
  equal eq. 19 of the float64 rescaled matrices up to the margin; with optimised scales the
  sound bound is below the sound plain LipLT bound; ``lipschitz_bound('liplt_aol')`` (the
  training bound) is eq. 19 of the AOL-rescaled network."""
  net, blocks, Rm, shape = _opt_net("residual")
  off = ~np.eye(Rm.shape[0], dtype=bool)
  scales, _ = R.optimize_scales(net, mode="pairwise", steps=200)
  aol = _numpy_aol_scales(blocks, Rm)
  sound = {}
  for kind, kwargs, want in (
    ("aol", {"method": "liplt_aol"}, aol),
    ("given", {"scales": scales}, scales),
  ):
    got, info = soundness.sound_bound(net, **kwargs)
    assert info["kind"] == "guaranteed upper bound" and info["probabilistic_norms"] == 0
    assert info["rescaling"] == kind
    exact = ref.liplt_reference(_rescaled_blocks(blocks, want), Rm, mode="pairwise")[0]
    ratio = got[off] / exact[off]  # sound, and exact up to the margin (1 + 1e-4)^(L + 1)
    assert np.all(ratio >= 1.0) and np.all(ratio <= (1 + 1e-4) ** (len(blocks) + 1) + 1e-5)
    sound[kind] = got
  plain, _ = soundness.sound_bound(net)
  assert _mean_pairwise(sound["given"]) < _mean_pairwise(plain)
  assert np.all(_pairwise_lower(blocks, Rm, shape)[off] <= sound["given"][off])

  est, _ = jax.jit(
    lambda n, s: liplt.lipschitz_bound(n, s, method="liplt_aol", mode="pairwise", num_iters=ITERS)
  )(net, liplt.init_state(net, jax.random.key(2)))
  aol_exact = ref.liplt_reference(_rescaled_blocks(blocks, aol), Rm, mode="pairwise")[0]
  np.testing.assert_allclose(np.asarray(est)[off], aol_exact[off], rtol=2e-4)

  with pytest.raises(ValueError, match="method='liplt'"):
    soundness.sound_bound(net, method="naive", scales=scales)
  with pytest.raises(ValueError, match="positive"):
    soundness.sound_bound(net, scales=[-s for s in scales])


def test_power_iteration_objective_with_sound_evaluation():
  """``norms='power'`` (for networks too large to materialise) with ``evaluate='sound'``:
  the candidates are compared by their guaranteed bounds, and the result is one of them."""
  net, blocks, Rm, _ = _opt_net("dense")
  scales, info = R.optimize_scales(net, mode="pairwise", steps=50, norms="power", evaluate="sound")
  assert info["norms"] == "power" and info["chosen"] == "optimized"
  cands = info["candidates"]
  assert info["bound"] == min(cands.values()) < min(cands["ones"], cands["aol"])
  # The sound value of the returned scales: exact up to the margin (1 + 1e-4)^(L + 1).
  exact = _mean_pairwise(
    ref.liplt_reference(_rescaled_blocks(blocks, scales), Rm, mode="pairwise")[0]
  )
  assert exact <= info["bound"] <= exact * ((1 + 1e-4) ** (len(blocks) + 1) + 1e-5)
