"""crmjax.losses against hand-written float64 numpy references.

Tiny inputs (B = 6 points, K = 4 classes) with a random symmetric positive pairwise bound
(zero diagonal). The batch contains a misclassified point (radius 0) and a point certified
beyond ``r0`` (not penalised by CRM), so every branch of the CRM mask is exercised.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crmjax import losses

B, K = 6, 4
T = 5.0  # temperature
R0 = 0.8  # CRM radius threshold
EPS = 0.3  # GloRo radius


def _lip(rng, k=K, *, symmetric=True):
  """Positive off-diagonal bounds, zero diagonal; ``symmetric=False``: ``L_ij != L_ji``.

  Bounds of the margin ``z_i - z_j`` are symmetric when exact, but a certificate may use
  any valid upper bounds (per-direction refinements, bounds from other tools), so the
  losses take a general matrix and must read the row of the label.
  """
  a = rng.uniform(0.5, 2.0, (k, k))
  lip = 0.5 * (a + a.T) if symmetric else a
  np.fill_diagonal(lip, 0.0)
  return lip


def _batch(seed=0, *, symmetric=True):
  """Logits, labels and lip with known cases at fixed positions.

  Point 0 is misclassified, point 1 is certified far beyond ``R0``, point 2 is correct with
  a tiny radius; the others are random but correctly classified.
  """
  rng = np.random.default_rng(seed)
  lip = _lip(rng, symmetric=symmetric)
  labels = rng.integers(0, K, B)
  logits = rng.normal(size=(B, K))
  for b in range(B):  # make every point correctly classified first
    logits[b, labels[b]] = logits[b].max() + rng.uniform(0.2, 1.0)
  other = (labels[0] + 1) % K
  logits[0, other] = logits[0, labels[0]] + 0.7  # misclassified
  logits[1] = 0.0
  logits[1, labels[1]] = 10.0  # radius >= 10 / max L > R0
  logits[2, (labels[2] + 2) % K] = logits[2, labels[2]] - 0.01  # tiny radius
  return logits, labels, lip


# ------------------------------------------------------------------- numpy references


def _ratios_np(logits, labels, lip):
  """(B, K - 1) ratios (z_y - z_i) / L_yi over i != y, float64."""
  out = []
  for z, y in zip(np.asarray(logits, np.float64), labels):
    out.append([(z[y] - z[i]) / lip[y, i] for i in range(len(z)) if i != y])
  return np.array(out)


def radius_np(logits, labels, lip):
  return np.maximum(_ratios_np(logits, labels, lip).min(1), 0.0)


def soft_radius_np(logits, labels, lip, t):
  r = _ratios_np(logits, labels, lip)
  m = r.min(1, keepdims=True)  # stable log-sum-exp
  return m[:, 0] - np.log(np.exp(-t * (r - m)).sum(1)) / t


def ce_np(logits, labels):
  z = np.asarray(logits, np.float64)
  z = z - z.max(1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(1, keepdims=True))
  return -logp[np.arange(len(labels)), labels].mean()


def crm_np(logits, labels, lip, *, lam, t, r0, g=None, r_floor=0.0):
  g = (lambda r: np.exp(-t * r) / t) if g is None else g
  correct = np.asarray(logits).argmax(1) == labels
  rad = radius_np(logits, labels, lip)
  mask = correct & (rad < r0) & (rad >= r_floor)
  pen = np.where(mask, g(soft_radius_np(logits, labels, lip, t)), 0.0).sum()
  pen /= max(1, correct.sum())
  return ce_np(logits, labels) + lam * pen, pen, mask, correct, rad


def gloro_np(logits, labels, lip, eps):
  z = np.asarray(logits, np.float64)
  bottom = np.array(
    [max(z[b, i] + eps * lip[y, i] for i in range(K) if i != y) for b, y in enumerate(labels)]
  )
  aug = np.concatenate([z, bottom[:, None]], 1)
  return ce_np(aug, labels), aug


def _j(*a):
  return tuple(
    jnp.asarray(x, jnp.float32) if np.asarray(x).dtype.kind == "f" else jnp.asarray(x) for x in a
  )


# ------------------------------------------------------------------------------ tests


def test_batch_has_the_intended_cases():
  logits, labels, lip = _batch()
  rad = radius_np(logits, labels, lip)
  correct = logits.argmax(1) == labels
  assert not correct[0] and rad[0] == 0.0
  assert correct[1] and rad[1] > R0
  assert correct[2] and 0 < rad[2] < 0.05
  assert correct[1:].all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_certified_radius_matches_numpy(seed):
  logits, labels, lip = _batch(seed)
  got = losses.certified_radius(*_j(logits, labels, lip))
  np.testing.assert_allclose(got, radius_np(logits, labels, lip), rtol=1e-5, atol=1e-6)
  assert got[0] == 0.0  # misclassified
  assert np.all(np.asarray(got) >= 0)


def test_certified_radius_is_zero_on_ties_and_uses_row_of_label():
  # An asymmetric bound (L_01 = 1 but L_10 = 3, ...): the radius of a point with label y
  # reads row y, R = min_{i != y} (z_y - z_i) / L_yi. Reading column y instead (lip.T)
  # gives the values in the comment after "col:".
  lip = np.array([[0.0, 1.0, 4.0], [3.0, 0.0, 2.0], [0.5, 6.0, 0.0]])
  logits = np.array(
    [
      [1.0, 1.0, 0.0],  # tie with class 1: radius 0
      [2.0, 0.0, 0.0],  # label 0: min(2 / 1, 2 / 4) = 0.5  (col: 2 / 3)
      [0.0, 3.0, 1.0],  # label 1: min(3 / 3, 2 / 2) = 1    (col: 2 / 6)
      [0.0, 1.0, 4.0],
    ]
  )  # label 2: min(4 / 0.5, 3 / 6) = 0.5 (col: 4 / 4)
  labels = np.array([0, 0, 1, 2])
  want = [0.0, 0.5, 1.0, 0.5]
  np.testing.assert_allclose(radius_np(logits, labels, lip), want, rtol=1e-12)
  got = losses.certified_radius(*_j(logits, labels, lip))
  np.testing.assert_allclose(
    got, want, rtol=1e-6, err_msg="certified_radius must read row y of lip (L_yi)"
  )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_losses_read_row_of_label_of_an_asymmetric_bound(seed):
  logits, labels, lip = _batch(seed, symmetric=False)
  assert np.abs(lip - lip.T).max() > 0.1
  args = _j(logits, labels, lip)
  np.testing.assert_allclose(
    losses.certified_radius(*args), radius_np(logits, labels, lip), rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
    losses.soft_radius(*args, temperature=T),
    soft_radius_np(logits, labels, lip, T),
    rtol=1e-5,
    atol=1e-5,
  )
  loss, aux = losses.crm_loss(*args, lam=2.0, temperature=T, r0=R0)
  want, pen, *_ = crm_np(logits, labels, lip, lam=2.0, t=T, r0=R0)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(aux["penalty"], pen, rtol=1e-5)
  np.testing.assert_allclose(
    losses.gloro_loss(*args, eps=EPS)[0], gloro_np(logits, labels, lip, EPS)[0], rtol=1e-5
  )


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("t", [0.5, 5.0, 50.0])
def test_soft_radius_matches_numpy(seed, t):
  logits, labels, lip = _batch(seed)
  got = losses.soft_radius(*_j(logits, labels, lip), temperature=t)
  np.testing.assert_allclose(got, soft_radius_np(logits, labels, lip, t), rtol=1e-5, atol=1e-5)


def test_soft_radius_is_a_lower_bound_that_tends_to_the_hard_min():
  logits, labels, lip = _batch(4)
  hard = _ratios_np(logits, labels, lip).min(1)  # unclipped (soft_radius is not clipped)
  gaps = []
  for t in [0.1, 1.0, 10.0, 100.0, 1000.0]:
    soft = np.asarray(losses.soft_radius(*_j(logits, labels, lip), temperature=t), np.float64)
    assert np.all(soft <= hard + 1e-5), t
    # log-sum-exp of K - 1 terms: hard - log(K - 1) / t <= soft
    assert np.all(soft >= hard - np.log(K - 1) / t - 1e-5), t
    gaps.append(np.max(hard - soft))
  assert all(a >= b - 1e-6 for a, b in zip(gaps, gaps[1:])), gaps
  assert gaps[-1] < 2e-3


def test_cross_entropy_matches_numpy():
  logits, labels, _ = _batch(5)
  got = losses.cross_entropy(*_j(logits, labels))
  np.testing.assert_allclose(got, ce_np(logits, labels), rtol=1e-6)


def test_exp_penalty():
  r = np.array([-1.0, 0.0, 0.3, 2.0])
  np.testing.assert_allclose(
    losses.exp_penalty(jnp.asarray(r), temperature=T), np.exp(-T * r) / T, rtol=1e-6
  )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_linear_penalty_is_the_log_sum_exp_of_the_pairwise_ratios(seed):
  # g(R_soft) = -R_soft = (1/t) log sum_{i != y} exp(-t (z_y - z_i) / L_yi): the reference
  # code's "softMax" robust loss, written here directly from the ratios in float64.
  logits, labels, lip = _batch(seed)
  ratios = _ratios_np(logits, labels, lip)
  want = np.array([np.log(np.sum(np.exp(-T * r[np.isfinite(r)]))) / T for r in ratios])
  got = losses.linear_penalty(
    losses.soft_radius(*_j(logits, labels, lip), temperature=T), temperature=T
  )
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  loss, aux = losses.crm_loss(
    *_j(logits, labels, lip), lam=2.0, temperature=T, r0=R0, penalty=losses.linear_penalty
  )
  ref, pen, *_ = crm_np(logits, labels, lip, lam=2.0, t=T, r0=R0, g=lambda r: -r)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  np.testing.assert_allclose(aux["penalty"], pen, rtol=1e-5)


def test_linear_penalty_gradient_does_not_vanish_at_large_radii():
  # The reason the experiment configs use it: at r = 1.58 (the MNIST target) exp_penalty's
  # slope is exp(-t r) = 3.7e-4 at t = 5, the linear penalty's stays -1.
  r = jnp.asarray(1.58)
  d_exp = jax.grad(lambda x: losses.exp_penalty(x, temperature=T))(r)
  d_lin = jax.grad(lambda x: losses.linear_penalty(x, temperature=T))(r)
  np.testing.assert_allclose(d_exp, -np.exp(-T * 1.58), rtol=1e-5)
  assert float(d_lin) == -1.0
  assert set(losses.PENALTIES) == {"exp", "linear"}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lam", [0.0, 0.5, 3.0])
def test_crm_loss_matches_numpy(seed, lam):
  logits, labels, lip = _batch(seed)
  loss, aux = losses.crm_loss(*_j(logits, labels, lip), lam=lam, temperature=T, r0=R0)
  want, pen, mask, correct, rad = crm_np(logits, labels, lip, lam=lam, t=T, r0=R0)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(aux["penalty"], pen, rtol=1e-5)
  np.testing.assert_allclose(aux["ce"], ce_np(logits, labels), rtol=1e-6)
  np.testing.assert_allclose(aux["accuracy"], correct.mean(), rtol=1e-6)
  np.testing.assert_allclose(aux["radius"], rad.mean(), rtol=1e-5)
  np.testing.assert_allclose(aux["penalised"], mask.mean(), rtol=1e-6)
  # the intended mask: misclassified (0) and above-r0 (1) points are not penalised
  assert not mask[0] and not mask[1] and mask[2:].all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_crm_floor_leaves_points_below_it_to_the_cross_entropy(seed):
  logits, labels, lip = _batch(seed)
  args = _j(logits, labels, lip)
  rad = np.asarray(losses.certified_radius(*args))  # float32, as the loss compares them
  penalised = (logits.argmax(1) == labels) & (rad < R0)
  low, high = np.sort(rad[penalised])[:2]
  floor = float(np.float32((low + high) / 2))  # between the two smallest penalised radii
  got, aux = losses.crm_loss(*args, lam=2.0, temperature=T, r0=R0, r_floor=floor)
  want, pen, mask, *_ = crm_np(logits, labels, lip, lam=2.0, t=T, r0=R0, r_floor=floor)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(aux["penalty"], pen, rtol=1e-5)
  assert float(aux["penalised"]) * B == penalised.sum() - 1  # only the smallest one dropped
  # A point exactly at the floor is still penalised (radius >= floor).
  _, at = losses.crm_loss(*args, lam=2.0, temperature=T, r0=R0, r_floor=float(high))
  assert float(at["penalised"]) * B == penalised.sum() - 1


def test_crm_mask_mean_and_lam_scaling():
  logits, labels, lip = _batch(0)
  args = _j(logits, labels, lip)
  l0, aux0 = losses.crm_loss(*args, lam=0.0, temperature=T, r0=R0)
  l2, aux2 = losses.crm_loss(*args, lam=2.0, temperature=T, r0=R0)
  np.testing.assert_allclose(l0, aux0["ce"], rtol=1e-7)
  np.testing.assert_allclose(l2 - l0, 2.0 * aux2["penalty"], rtol=1e-5)
  # penalty is sum over the masked points / number of correct points (5 of 6), not / B
  soft = soft_radius_np(logits, labels, lip, T)
  want = (np.exp(-T * soft[2:]) / T).sum() / 5.0
  np.testing.assert_allclose(aux2["penalty"], want, rtol=1e-5)
  # The misclassified and the far-certified points contribute nothing: perturbing their
  # logits (without crossing a mask boundary) leaves the penalty unchanged.
  z = logits.copy()
  z[1, labels[1]] += 5.0
  z[0, labels[0]] -= 0.3
  _, aux3 = losses.crm_loss(*_j(z, labels, lip), lam=2.0, temperature=T, r0=R0)
  np.testing.assert_allclose(aux3["penalty"], aux2["penalty"], rtol=1e-6)
  # r0 = 0: nothing penalised; r0 huge: every correct point penalised
  _, a = losses.crm_loss(*args, lam=1.0, temperature=T, r0=0.0)
  assert float(a["penalty"]) == 0.0 and float(a["penalised"]) == 0.0
  _, a = losses.crm_loss(*args, lam=1.0, temperature=T, r0=1e9)
  np.testing.assert_allclose(a["penalised"], 5 / 6, rtol=1e-6)


def test_crm_loss_all_misclassified_has_zero_penalty():
  # No correct point: nothing is penalised and the mean over correct points divides by
  # max(1, 0) = 1, so the loss is exactly the cross-entropy (0 / 0 would be NaN).
  logits, _, lip = _batch(0)
  wrong = (logits.argmax(1) + 1) % K  # never the argmax: every point misclassified
  assert not np.any(logits.argmax(1) == wrong)
  args = _j(logits, wrong, lip)
  for penalty in (losses.exp_penalty, losses.linear_penalty):
    loss, aux = jax.jit(
      lambda z, y, l: losses.crm_loss(z, y, l, lam=1.0, temperature=T, r0=R0, penalty=penalty)
    )(*args)
    assert float(aux["accuracy"]) == 0.0 and float(aux["penalised"]) == 0.0
    assert np.isfinite(float(loss)) and np.isfinite(float(aux["penalty"])), (loss, aux)
    assert float(aux["penalty"]) == 0.0, aux["penalty"]
    np.testing.assert_allclose(loss, aux["ce"], rtol=1e-7)
    np.testing.assert_allclose(loss, ce_np(logits, wrong), rtol=1e-6)
    grads = jax.grad(
      lambda z, l: losses.crm_loss(z, args[1], l, lam=1.0, temperature=T, r0=R0, penalty=penalty)[
        0
      ],
      argnums=(0, 1),
    )(args[0], args[2])
    assert all(np.all(np.isfinite(g)) for g in grads)
    np.testing.assert_array_equal(grads[1], 0.0)  # the bound plays no part


def test_crm_loss_custom_penalty():
  logits, labels, lip = _batch(1)
  seen = {}

  def g(r, *, temperature):
    seen["t"] = temperature
    return jnp.square(R0 - r)

  loss, aux = losses.crm_loss(*_j(logits, labels, lip), lam=1.5, temperature=T, r0=R0, penalty=g)
  assert seen["t"] == T
  want, pen, *_ = crm_np(logits, labels, lip, lam=1.5, t=T, r0=R0, g=lambda r: np.square(R0 - r))
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(aux["penalty"], pen, rtol=1e-5)


def test_crm_loss_jits_with_traced_lam_and_r0():
  logits, labels, lip = _batch(2)
  f = jax.jit(lambda z, y, l, lam, r0: losses.crm_loss(z, y, l, lam=lam, temperature=T, r0=r0)[0])
  got = f(*_j(logits, labels, lip), jnp.float32(0.7), jnp.float32(R0))
  np.testing.assert_allclose(got, crm_np(logits, labels, lip, lam=0.7, t=T, r0=R0)[0], rtol=1e-5)


def _crm_scalar(z, lip, labels, lam=1.3):
  return losses.crm_loss(z, labels, lip, lam=lam, temperature=T, r0=R0)[0]


def test_crm_gradients_finite_including_ties():
  logits, labels, lip = _batch(0)
  cases = [logits]
  z = logits.copy()
  z[3, (labels[3] + 1) % K] = z[3, labels[3]]  # label tied with another class
  cases.append(z)
  z = logits.copy()
  a, b = [i for i in range(K) if i != labels[4]][:2]
  z[4, a] = z[4, b]  # two non-label logits tie
  cases.append(z)
  z = np.zeros_like(logits)  # every logit tied
  cases.append(z)
  grad = jax.jit(jax.grad(_crm_scalar, argnums=(0, 1)))
  for z in cases:
    gz, gl = grad(jnp.asarray(z, jnp.float32), jnp.asarray(lip, jnp.float32), jnp.asarray(labels))
    assert np.all(np.isfinite(gz)) and np.all(np.isfinite(gl))
    np.testing.assert_array_equal(np.diag(gl), 0.0)  # the diagonal is never used
    # a larger bound means smaller radii, hence a larger penalty: dloss/dL >= 0
    assert np.all(np.asarray(gl) >= -1e-7)


def test_crm_gradients_match_finite_differences_float64():
  logits, labels, lip = _batch(1)
  assert np.all(np.abs(radius_np(logits, labels, lip) - R0) > 1e-2)  # away from mask edges
  with jax.enable_x64(True):
    z0 = jnp.asarray(logits, jnp.float64)
    l0 = jnp.asarray(lip, jnp.float64)
    y = jnp.asarray(labels)
    f = jax.jit(lambda z, l: _crm_scalar(z, l, y))
    assert f(z0, l0).dtype == jnp.float64
    gz, gl = jax.grad(f, argnums=(0, 1))(z0, l0)
    h = 1e-6
    for x0, g, which in ((z0, gz, 0), (l0, gl, 1)):
      fd = np.zeros(x0.shape)
      for idx in np.ndindex(*x0.shape):
        e = jnp.zeros(x0.shape, jnp.float64).at[idx].set(h)
        args_p = (z0 + e, l0) if which == 0 else (z0, l0 + e)
        args_m = (z0 - e, l0) if which == 0 else (z0, l0 - e)
        fd[idx] = (float(f(*args_p)) - float(f(*args_m))) / (2 * h)
      np.testing.assert_allclose(np.asarray(g), fd, rtol=1e-6, atol=1e-9)
    assert np.any(np.asarray(gl) != 0)  # the penalty really reaches the bound


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gloro_loss_matches_numpy(seed):
  logits, labels, lip = _batch(seed)
  loss, aux = losses.gloro_loss(*_j(logits, labels, lip), eps=EPS)
  want, _ = gloro_np(logits, labels, lip, EPS)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  rad = radius_np(logits, labels, lip)
  np.testing.assert_allclose(aux["ce"], ce_np(logits, labels), rtol=1e-6)
  np.testing.assert_allclose(aux["accuracy"], (logits.argmax(1) == labels).mean(), rtol=1e-6)
  np.testing.assert_allclose(aux["radius"], rad.mean(), rtol=1e-5)
  np.testing.assert_allclose(aux["vra"], (rad > EPS).mean(), rtol=1e-6)
  # gloro with eps = 0 is plain cross-entropy over K + 1 logits where the bottom is max_i z_i
  l0, _ = losses.gloro_loss(*_j(logits, labels, lip), eps=0.0)
  np.testing.assert_allclose(l0, gloro_np(logits, labels, lip, 0.0)[0], rtol=1e-5)


def test_gloro_bottom_wins_exactly_when_not_certified():
  rng = np.random.default_rng(7)
  n = 200
  lip = _lip(rng)
  logits = rng.normal(size=(n, K)) * 2.0
  labels = rng.integers(0, K, n)
  rad = radius_np(logits, labels, lip)
  gloro = jax.jit(losses.gloro_loss)
  for eps in [0.05, 0.3, 1.0]:
    keep = np.abs(rad - eps) > 1e-6  # no ties at the boundary
    _, aug = gloro_np(logits, labels, lip, eps)
    pred = aug.argmax(1)
    # the bottom dominates every other class, so the augmented prediction is y or bottom
    assert np.all((pred == labels) | (pred == K))
    np.testing.assert_array_equal((pred == K)[keep], ~(rad > eps)[keep])
    assert 0 < np.mean(pred == K) < 1, eps  # both cases occur
    loss, aux = gloro(*_j(logits, labels, lip), eps=eps)
    np.testing.assert_allclose(aux["vra"], np.mean(pred == labels), atol=1.5 / n)
    # the GloRo loss is never below plain CE (the extra logit only adds mass)
    assert float(loss) >= float(aux["ce"]) - 1e-6


def test_gloro_gradient_is_finite():
  logits, labels, lip = _batch(0)
  f = lambda z, l: losses.gloro_loss(z, jnp.asarray(labels), l, eps=EPS)[0]
  gz, gl = jax.jit(jax.grad(f, argnums=(0, 1)))(*_j(logits, lip))
  assert np.all(np.isfinite(gz)) and np.all(np.isfinite(gl))
  np.testing.assert_array_equal(np.diag(gl), 0.0)
