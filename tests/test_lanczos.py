"""The probabilistic norms of crmjax.soundness: Lanczos, its failure bound, its random start.

* ``lanczos_rel_err`` / ``power_rel_err`` against values computed by hand from the
  theorems (Kuczynski & Wozniakowski 1992), not from the library's constants;
* the Lanczos estimate is the largest Ritz value of the Krylov space (checked against an
  explicit float64 Rayleigh-Ritz on ``[b, Ab, .., A^{k-1} b]``), never above the norm,
  and converged against numpy's SVD; the empirical failure rate on a hard spectrum stays
  below the theorem's bound;
* after 60 and 120 steps on a 200 x 200 Gram matrix, the basis is still orthonormal and the
  Ritz values are those of the exact Krylov space (the theorem's preconditions, which
  Lanczos without full reorthogonalisation silently loses);
* the default random start comes from OS entropy, is recorded, and passing it back
  reproduces the certificate bit for bit.
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from crmjax import layers as L
from crmjax import network, soundness

# ------------------------------------------------------------- failure probabilities


def test_lanczos_rel_err_known_values():
  # 1.648 sqrt(n) exp(-sqrt(eps) (2k - 1)) = delta, solved by hand:
  # n = 10^4, k = 300, delta = 1e-7: sqrt(eps) = ln(1.648e9) / 599 = 21.22283 / 599
  assert soundness.lanczos_rel_err(n=10**4, num_iters=300, delta=1e-7) == pytest.approx(
    (21.222828 / 599) ** 2, rel=1e-6
  )
  assert soundness.lanczos_rel_err(n=10**4, num_iters=300, delta=1e-7) == pytest.approx(
    1.25530e-3, rel=1e-4
  )
  # n = 3136, k = 1000, delta = 1e-6 / 6: ln(1.648 * 56 / (1e-6 / 6)) = ln(5.53728e8)
  assert soundness.lanczos_rel_err(n=3136, num_iters=1000, delta=1e-6 / 6) == pytest.approx(
    (20.132184 / 1999) ** 2, rel=1e-6
  )
  # the round trip, with the theorem's constant written out here
  for n in [10, 1000, 10**6]:
    for delta in [1e-9, 1e-6, 1e-3]:
      prev = 1.0
      for k in [20, 50, 100, 300, 1000, 10000]:
        e = soundness.lanczos_rel_err(n=n, num_iters=k, delta=delta)
        assert 0.0 < e < prev  # more steps: tighter
        prev = e
        np.testing.assert_allclose(
          1.648 * math.sqrt(n) * math.exp(-math.sqrt(e) * (2 * k - 1)), delta, rtol=1e-9
        )
  # larger failure allowed: tighter; larger order: looser
  es = [soundness.lanczos_rel_err(n=1000, num_iters=200, delta=d) for d in [1e-9, 1e-6, 1e-3]]
  assert es[0] > es[1] > es[2]
  es = [soundness.lanczos_rel_err(n=m, num_iters=200, delta=1e-6) for m in [10, 1000, 10**6]]
  assert es[0] < es[1] < es[2]
  # no guarantee: fewer than 2 steps, or rel_err >= 1 (9 steps at n = 10^4: sqrt(eps) =
  # ln(1.648e8) / 17 = 1.11)
  assert soundness.lanczos_rel_err(n=100, num_iters=1, delta=1e-6) == 1.0
  assert soundness.lanczos_rel_err(n=10**4, num_iters=9, delta=1e-6) == 1.0


def test_power_rel_err_known_values():
  # 0.824 sqrt(n) (1 - eps)^((k - 1) / 2) = delta: n = 10^4, k = 1001, delta = 1e-6:
  # (1 - eps)^500 = 1e-6 / 82.4  ->  eps = 1 - exp(ln(1.2135922e-8) / 500)
  assert soundness.power_rel_err(n=10**4, num_iters=1001, delta=1e-6) == pytest.approx(
    1 - math.exp(-18.227096 / 500), rel=1e-6
  )
  assert soundness.power_rel_err(n=10**4, num_iters=1001, delta=1e-6) == pytest.approx(
    0.0357979, rel=1e-4
  )
  for n in [10, 1000, 10**6]:
    for k in [10, 100, 1000]:
      e = soundness.power_rel_err(n=n, num_iters=k, delta=1e-6)
      np.testing.assert_allclose(0.824 * math.sqrt(n) * (1 - e) ** ((k - 1) / 2), 1e-6, rtol=1e-6)
  assert soundness.power_rel_err(n=100, num_iters=1, delta=1e-6) == 1.0
  assert soundness.power_rel_err(n=100, num_iters=0, delta=1e-6) == 1.0
  # delta >= 0.824 sqrt(n): every eps would do; 1.0 is returned (conservative)
  assert soundness.power_rel_err(n=1, num_iters=100, delta=0.9) == 1.0
  # Lanczos reaches a given rel_err in far fewer steps than the power method
  assert (
    soundness.lanczos_rel_err(n=10**4, num_iters=300, delta=1e-7)
    < soundness.power_rel_err(n=10**4, num_iters=3000, delta=1e-7) / 10
  )


# ------------------------------------------------------------------- the algorithm


def _run(A, k, seed):
  """The library's host-side Lanczos on a dense float64 symmetric matrix."""
  # pylint: disable-next=protected-access
  run = soundness._Lanczos(A.shape[0], k, np.random.default_rng(seed))
  for j in range(run.k):
    run.step(j, A @ run.q[j])
  return run


def test_lanczos_is_the_largest_ritz_value_of_the_krylov_space():
  rng = np.random.default_rng(0)
  M = rng.normal(size=(60, 40))
  A = M.T @ M
  for k in [2, 4, 7]:
    run = _run(A, k, seed=k)
    theta, y = run.ritz()
    b = run.q[0]
    krylov = np.stack([np.linalg.matrix_power(A, i) @ b for i in range(k)], axis=1)
    q, _ = np.linalg.qr(krylov)
    want = np.linalg.eigvalsh(q.T @ A @ q)[-1]
    assert theta == pytest.approx(want, rel=1e-10)
    assert y @ A @ y == pytest.approx(theta, rel=1e-10)  # its Ritz vector
    assert np.allclose(run.q[:k] @ run.q[:k].T, np.eye(k), atol=1e-12)  # orthonormal basis
    assert theta <= np.linalg.eigvalsh(A)[-1] * (1 + 1e-12)


def test_lanczos_breakdown_and_rank_deficiency():
  """A rank-2 operator: the Krylov space is invariant after 3 steps; no NaN, exact norm."""
  rng = np.random.default_rng(1)
  M = rng.normal(size=(2, 30))
  A = M.T @ M
  run = _run(A, 10, seed=0)
  theta, _ = run.ritz()
  assert np.all(np.isfinite(run.q)) and np.allclose(run.q @ run.q.T, np.eye(10), atol=1e-10)
  assert theta == pytest.approx(np.linalg.norm(M, 2) ** 2, rel=1e-10)
  zero = _run(np.zeros((5, 5)), 5, seed=0)
  assert zero.ritz()[0] == 0.0 and np.all(np.isfinite(zero.q))


def _tridiagonal(run) -> np.ndarray:
  k = run.k
  off = np.asarray(run.beta[: k - 1])
  return np.diag(run.alpha) + np.diag(off, 1) + np.diag(off, -1)


@pytest.mark.parametrize("k", [60, 120])
def test_long_run_keeps_the_basis_orthonormal_and_the_ritz_values_exact(k):
  """The theorem's preconditions after many steps, where they can fail.

  The failure bound is about the Ritz values of the exact Krylov space. On a 200 x 200 Gram
  matrix (top eigenvalue converging after ~30 steps), Lanczos without reorthogonalisation
  loses orthogonality (max |Q Q^T - I| of 0.27 at 60 steps, 0.47 at 120) and grows ghost
  copies of the converged top Ritz value, while that value itself still matches: only the
  basis and the rest of the spectrum of ``T_k`` show it. Checked here: an orthonormal basis
  (also through ``orthogonality()`` and ``lanczos_norms``), ``T_k = Q A Q^T`` (the
  Rayleigh-Ritz matrix of the space), the three-term relation, and Cauchy interlacing of
  the Ritz values with the spectrum of ``A`` (which ghosts violate).
  """
  rng = np.random.default_rng(5)
  M = rng.normal(size=(200, 200))
  A = M.T @ M
  lam = np.linalg.eigvalsh(A)  # ascending
  run = _run(A, k, seed=k)
  q, t = run.q[:k], _tridiagonal(run)
  gram_err = np.abs(q @ q.T - np.eye(k)).max()
  assert gram_err < 1e-12, f"basis not orthonormal after {k} steps: {gram_err:.3g}"
  assert run.orthogonality() == pytest.approx(gram_err, abs=1e-15)
  # the start: a unit vector of the random stream (uniform direction on the sphere)
  g = np.random.default_rng(k).standard_normal(200)
  np.testing.assert_allclose(q[0], g / np.linalg.norm(g), rtol=1e-14)
  # T_k is the projection of A on the basis; A Q^T = Q^T T + beta_k q_k e_k^T (residual
  # orthogonal to the basis)
  np.testing.assert_allclose(q @ A @ q.T, t, atol=1e-10 * lam[-1])
  resid = A @ q.T - q.T @ t
  assert np.abs(resid[:, :-1]).max() < 1e-10 * lam[-1]
  assert np.abs(q @ resid[:, -1]).max() < 1e-10 * lam[-1]
  # Cauchy interlacing: the i-th largest Ritz value is at most the i-th largest eigenvalue
  # of A (a ghost copy of lambda_1 would sit above lambda_2), and above the i-th smallest
  ritz = np.linalg.eigvalsh(t)[::-1]
  assert np.all(ritz <= lam[::-1][:k] * (1 + 1e-10))
  assert np.all(ritz[::-1] >= lam[:k] - 1e-10 * lam[-1])
  assert ritz[0] == pytest.approx(lam[-1], rel=1e-10)  # converged (what ghosts leave intact)
  assert run.ritz()[0] == pytest.approx(ritz[0], rel=1e-12)
  # the same through the library's operator interface
  spec = (lambda u: u @ jnp.asarray(M.T, jnp.float32), (200,), (200,))
  (res,) = soundness.lanczos_norms([spec], key=7, num_iters=k)
  assert res["steps"] == k and res["orthogonality"] < 1e-12


def test_empirical_failure_rate_below_the_theorem():
  """A spectrum uniform in [0, 1] (hard for Krylov methods): over 400 random starts, the
  share of runs with relative error > eps is at most the theorem's bound."""
  n, k, eps = 200, 6, 0.05
  A = np.diag(np.linspace(0.0, 1.0, n))
  errs = np.array([1 - _run(A, k, seed=s).ritz()[0] for s in range(400)])
  bound = 1.648 * math.sqrt(n) * math.exp(-math.sqrt(eps) * (2 * k - 1))
  assert np.mean(errs > eps) <= min(bound, 1.0)
  assert np.all(errs >= -1e-12) and 0.005 < np.median(errs) < 0.2  # a real test: not converged


def test_lanczos_norms_against_svd():
  rng = np.random.default_rng(2)
  mats = [rng.normal(size=s).astype(np.float32) for s in [(30, 50), (50, 30), (300, 700)]]
  specs = [(lambda u, a=a: u @ jnp.asarray(a).T, (a.shape[1],), (a.shape[0],)) for a in mats]
  want = [np.linalg.norm(a.astype(np.float64), 2) for a in mats]
  res = soundness.lanczos_norms(specs, key=3, num_iters=60)
  assert [r["n"] for r in res] == [30, 30, 300]  # the smaller side
  assert [r["steps"] for r in res] == [30, 30, 60]
  for r, w in zip(res, want):
    assert r["sigma"] <= w * (1 + 1e-6)  # a lower estimate (up to float32 products)
    assert r["sigma"] >= w * (1 - 1e-6)  # converged
    assert r["rayleigh"] == pytest.approx(r["ritz"], rel=1e-5)
  # operators run alone when their Krylov bases do not fit together: same starts, same result
  alone = soundness.lanczos_norms(specs, key=3, num_iters=60, memory=1)
  np.testing.assert_allclose([r["sigma"] for r in alone], [r["sigma"] for r in res], rtol=1e-6)
  with pytest.raises(ValueError, match="num_iters"):
    soundness.lanczos_norms(specs, key=3, num_iters=0)


# ------------------------------------------------------------ random start, key


def _net():
  layers = (L.Dense(40), L.Act("leaky_relu", 0.3), L.Dense(30), L.Act(), L.Dense(3))
  rng = np.random.default_rng(0)
  params = {
    "layer_0": {"kernel": rng.normal(size=(20, 40)) / 4.5},
    "layer_2": {"kernel": rng.normal(size=(40, 30)) / 6.3},
    "layer_4": {"kernel": rng.normal(size=(30, 3)) / 5.5},
  }
  params = {k: {"kernel": jnp.asarray(v["kernel"], jnp.float32)} for k, v in params.items()}
  return network.from_layers(layers, params, (20,))


def test_key_from_os_entropy_recorded_and_reproducible():
  net = _net()
  kw = dict(exact_max_dim=4, num_iters=25)  # every interior norm probabilistic
  b1, i1 = soundness.sound_bound(net, **kw)
  b2, i2 = soundness.sound_bound(net, **kw)
  assert i1["probabilistic_norms"] == 3 and i1["estimator"] == "lanczos"
  assert isinstance(i1["key"], int) and i1["key"] != i2["key"]  # fresh entropy each call
  again, i3 = soundness.sound_bound(net, key=i1["key"], **kw)
  np.testing.assert_array_equal(again, b1)  # bit for bit
  assert i3["key"] == i1["key"] and i3["norms"] == i1["norms"]
  # a jax key is turned into its int seed, which reproduces it
  import jax  # pylint: disable=import-outside-toplevel

  b4, i4 = soundness.sound_bound(net, key=jax.random.key(5), **kw)
  b5, _ = soundness.sound_bound(net, key=i4["key"], **kw)
  np.testing.assert_array_equal(b4, b5)
  assert soundness.seed_of(jax.random.key(5)) == soundness.seed_of(jax.random.PRNGKey(5)) == 5
  with pytest.raises(ValueError, match="non-negative"):
    soundness.sound_bound(net, key=-1, **kw)
