"""Theorem 3.2 (l2 refinement of the one-layer bound) and its multi-layer use."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crmjax import layers as L
from crmjax import liplt, network
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
      np.testing.assert_allclose(spectral, float(R.plain_layer_bound(W, G, H, alpha, beta)),
                                 rtol=1e-10)
      # ... and plain LipLT (crmjax.liplt, eq. 19) of the one-block network with R = I.
      n, p = W.shape[1], G.shape[0]
      block = network.Block(ops.Dense(jnp.asarray(W.T, jnp.float32)),
                            ops.Dense(jnp.asarray(G.T, jnp.float32)),
                            None if H is None else ops.Identity((n,)), alpha=alpha, beta=beta)
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
      np.testing.assert_allclose(float(R.layer_bound(W, None, None, t_choice=c)),
                                 float(R.plain_layer_bound(W)), rtol=1e-10)


def test_refined_liplt_is_sound_and_rescaling_keeps_the_function():
  shape = (8,)
  layers = (L.Dense(16), L.Act(), L.Dense(16), L.Act("leaky_relu", 0.1), L.Dense(8), L.Act(),
            L.Residual((L.Dense(12), L.Act(), L.Dense(8))), L.Dense(4))
  init = jax.jit(L.Sequential(layers).init)
  p = init(jax.random.key(0), jnp.zeros((1, *shape)))["params"]
  x = np.random.default_rng(3).normal(size=(512, *shape)) * 2.0

  @jax.jit  # one compilation instead of many eager ones
  def run(p, x):
    net = network.from_layers(layers, p, shape)
    scaled = R.rescale(net, R.refined_scales(net))
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
