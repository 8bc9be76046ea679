"""Tests for crmjax.attacks (l2 PGD and certificate soundness checks)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from crmjax.attacks import (
  PGDResult,
  certificate_violations,
  check_certificates,
  margins,
  pgd_accuracy,
  pgd_l2,
  raise_on_violation,
)

NO_BOX = dict(clip_min=-jnp.inf, clip_max=jnp.inf)


def _linear_problem(seed, num_classes, dim=6, batch=32):
  """Random linear classifier with labels = predictions (all margins > 0)."""
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(num_classes, dim)).astype(np.float32)
  b = rng.normal(size=num_classes).astype(np.float32)
  x = rng.normal(size=(batch, dim)).astype(np.float32)
  z = x @ w.T + b
  y = z.argmax(-1)
  return w, b, x, y


def _closed_form(w, b, x, y, eps=None):
  """Exact minimal l2 distance to the decision boundary of a linear model
  and, if eps is given, the exact optimal (minimal) margin over the eps-ball."""
  z = (x @ w.T + b).astype(np.float64)
  z_y = np.take_along_axis(z, y[:, None], axis=1)  # (B, 1)
  w_diff = np.linalg.norm(w[y][:, None, :] - w[None, :, :], axis=-1)  # (B, K)
  other = np.arange(w.shape[0])[None, :] != y[:, None]
  gap = z_y - z
  dist = np.where(other, gap / np.where(other, w_diff, 1.0), np.inf).min(axis=1)
  if eps is None:
    return dist
  eps = np.broadcast_to(np.asarray(eps, np.float64), (x.shape[0],))
  opt = np.where(other, gap - eps[:, None] * w_diff, np.inf).min(axis=1)
  return dist, opt


def _linear_attack(w, b, **kwargs):
  w, b = jnp.asarray(w), jnp.asarray(b)
  return jax.jit(
    lambda x, y, key, eps: pgd_l2(lambda u: u @ w.T + b, x, y, key=key, eps=eps, **kwargs)
  )


def test_margins():
  logits = jnp.array([[3.0, 1.0, 2.0], [0.0, 5.0, 5.0]])
  np.testing.assert_allclose(margins(logits, jnp.array([0, 2])), [1.0, 0.0])


@pytest.mark.parametrize("loss", ["margin", "ce", "multitarget"])
def test_linear_binary_closed_form(loss):
  w, b, x, y = _linear_problem(0, num_classes=2)
  dist = _closed_form(w, b, x, y)
  attack = _linear_attack(w, b, num_steps=30, loss=loss, **NO_BOX)
  key = jax.random.key(0)

  # Just above the exact minimal distance: every point is broken.
  res = attack(x, y, key, 1.01 * dist)
  assert bool(res.success.all())
  # Just below: no attack can succeed.
  res = attack(x, y, key, 0.99 * dist)
  assert bool((res.margin > 0).all())
  # The margin found matches the closed-form optimum over the ball.
  for eps in [0.5 * dist, 1.01 * dist, 0.3]:
    _, opt = _closed_form(w, b, x, y, eps)
    res = attack(x, y, key, eps)
    np.testing.assert_allclose(res.margin, opt, atol=1e-3)


@pytest.mark.parametrize("seed", [0, 1])
def test_linear_multiclass_closed_form_multitarget(seed):
  w, b, x, y = _linear_problem(seed, num_classes=5, dim=8)
  dist = _closed_form(w, b, x, y)
  attack = _linear_attack(w, b, num_steps=30, loss="multitarget", **NO_BOX)
  key = jax.random.key(seed)

  assert bool(attack(x, y, key, 1.01 * dist).success.all())
  assert bool((attack(x, y, key, 0.99 * dist).margin > 0).all())
  for eps in [0.5 * dist, 1.01 * dist]:
    _, opt = _closed_form(w, b, x, y, eps)
    np.testing.assert_allclose(attack(x, y, key, eps).margin, opt, atol=1e-3)


@pytest.mark.parametrize("loss", ["margin", "ce"])
def test_linear_multiclass_untargeted_is_sound(loss):
  # Untargeted losses can steer towards the wrong class on multi-class
  # problems, so only check what must hold for any valid attack: nothing is
  # broken below the minimal distance, and the margin never beats the
  # optimum over the ball (which would mean leaving the ball).
  w, b, x, y = _linear_problem(2, num_classes=5, dim=8)
  dist = _closed_form(w, b, x, y)
  attack = _linear_attack(w, b, num_steps=30, num_restarts=3, loss=loss, **NO_BOX)
  key = jax.random.key(0)
  assert bool((attack(x, y, key, 0.99 * dist).margin > 0).all())
  eps = 1.5 * dist
  _, opt = _closed_form(w, b, x, y, eps)
  res = attack(x, y, key, eps)
  assert bool((np.asarray(res.margin) >= opt - 1e-4).all())
  # Most points are still broken at 1.5x the minimal distance.
  assert float(res.success.mean()) > 0.5


def test_linear_inside_box_matches_closed_form():
  # Points far from the faces of the default [0, 1] box: the box is inactive.
  w, b, x, y = _linear_problem(3, num_classes=2)
  x = 0.5 + 0.05 * np.tanh(x)
  y = np.asarray((x @ w.T + b).argmax(-1))
  dist = _closed_form(w, b, x, y)
  eps = np.minimum(1.01 * dist, 0.3).astype(np.float32)
  _, opt = _closed_form(w, b, x, y, eps)
  res = _linear_attack(w, b, num_steps=30)(x, y, jax.random.key(0), eps)
  np.testing.assert_allclose(res.margin, opt, atol=1e-3)
  assert bool(((res.x_adv >= 0) & (res.x_adv <= 1)).all())


def _mlp(seed, in_shape=(4, 4, 1), hidden=16, num_classes=3):
  rng = np.random.default_rng(seed)
  d = int(np.prod(in_shape))
  w1 = jnp.asarray(rng.normal(size=(d, hidden)) / np.sqrt(d), jnp.float32)
  w2 = jnp.asarray(rng.normal(size=(hidden, num_classes)), jnp.float32)

  def logits_fn(x):
    return jnp.tanh(x.reshape(x.shape[0], -1) @ w1 * 4.0) @ w2

  return logits_fn


def _images(seed, batch=8, shape=(4, 4, 1)):
  rng = np.random.default_rng(seed)
  x = rng.uniform(size=(batch, *shape)).astype(np.float32)
  x[0] = 0.0  # corners of the box, where clipping is active
  x[1] = 1.0
  y = rng.integers(0, 3, size=batch)
  return jnp.asarray(x), jnp.asarray(y)


@pytest.mark.parametrize(
  "loss,schedule", [("margin", "cosine"), ("ce", "constant"), ("multitarget", "cosine")]
)
def test_projection_ball_and_box(loss, schedule):
  logits_fn = _mlp(0)
  x, y = _images(0)
  eps = jnp.array([0.0, 0.5, 1.0, 2.0, 3.0, 0.1, 10.0, 1e-3])
  attack = jax.jit(
    functools.partial(pgd_l2, logits_fn, num_steps=10, num_restarts=3, loss=loss, schedule=schedule)
  )
  res = attack(x, y, key=jax.random.key(1), eps=eps)
  assert isinstance(res, PGDResult)
  chex.assert_shape(res.x_adv, x.shape)
  chex.assert_shape([res.margin, res.success], (x.shape[0],))
  norms = jnp.sqrt(jnp.sum((res.x_adv - x).reshape(x.shape[0], -1) ** 2, axis=-1))
  # float32 rounding of x + delta (|x| <= 1) moves each coordinate of x_adv - x by up to
  # 2^-24: an absolute slack of sqrt(d) 2^-24 besides the relative one (eps = 1e-3 needs it).
  slack = np.sqrt(x[0].size) * 2.0**-24
  assert bool((norms <= eps * (1 + 1e-5) + slack).all()), (norms, eps)
  assert bool(((res.x_adv >= 0.0) & (res.x_adv <= 1.0)).all())
  np.testing.assert_array_equal(res.x_adv[0], x[0])  # eps = 0
  # Reported margin is the margin at x_adv, and success is margin < 0.
  np.testing.assert_allclose(res.margin, margins(logits_fn(res.x_adv), y), atol=1e-5)
  np.testing.assert_array_equal(res.success, res.margin < 0)
  # The attack never does worse than the clean point.
  assert bool((res.margin <= margins(logits_fn(x), y) + 1e-6).all())


def test_deterministic_given_key():
  logits_fn = _mlp(1)
  x, y = _images(1)
  attack = jax.jit(functools.partial(pgd_l2, logits_fn, num_steps=5, num_restarts=3))
  r1 = attack(x, y, key=jax.random.key(7), eps=0.8)
  r2 = attack(x, y, key=jax.random.key(7), eps=0.8)
  np.testing.assert_array_equal(r1.x_adv, r2.x_adv)
  np.testing.assert_array_equal(r1.margin, r2.margin)
  # The key matters: with no gradient steps x_adv is the best start, and the random starts
  # (restarts 1 and 2) of another key are other points.
  starts = jax.jit(functools.partial(pgd_l2, logits_fn, num_steps=0, num_restarts=3))
  s1 = starts(x, y, key=jax.random.key(7), eps=0.8)
  s2 = starts(x, y, key=jax.random.key(8), eps=0.8)
  np.testing.assert_array_equal(s1.x_adv, starts(x, y, key=jax.random.key(7), eps=0.8).x_adv)
  assert bool(jnp.any(s1.x_adv != x)), "a random start should beat x for some point"
  assert bool(jnp.any(s1.x_adv != s2.x_adv)), "another key must give other random starts"


def _bowl(c):
  """Logits ``(c - ||u||^2, 0)`` for label 0: margin ``c - ||u||^2``, zero gradient at 0.

  At ``x = 0`` the attack gradient vanishes, so PGD started at ``x`` never moves (its unit
  step is 0 / max(0, tiny) = 0); only a random start at radius > sqrt(c) breaks the point.
  """

  def logits_fn(u):
    sq = jnp.sum(jnp.square(u.reshape(u.shape[0], -1)), axis=-1)
    return jnp.stack([c - sq, jnp.zeros_like(sq)], axis=-1)

  return logits_fn


def test_random_restarts_start_uniformly_in_the_ball():
  """num_steps=0, 2 restarts: x_adv is the random start of restart 1 (its margin
  c - ||delta||^2 beats restart 0's c), so its offsets are the start points themselves:
  inside the ball and uniform in it, i.e. ||delta|| / eps ~ U^(1/d), directions isotropic."""
  n, d, eps = 4000, 3, 0.7
  x = jnp.zeros((n, d), jnp.float32)
  y = jnp.zeros((n,), jnp.int32)
  res = jax.jit(functools.partial(pgd_l2, _bowl(1.0), num_steps=0, num_restarts=2, **NO_BOX))(
    x, y, key=jax.random.key(0), eps=eps
  )
  delta = np.asarray(res.x_adv, np.float64)
  r = np.linalg.norm(delta, axis=1)
  assert r.min() > 0, "every random start must differ from x (restart 1 starts at random)"
  assert r.max() <= eps * (1 + 1e-6)
  # Uniform in the d-ball: P(||delta|| <= eps s) = s^d, so (r / eps)^d ~ U(0, 1).
  ks = stats.kstest((r / eps) ** d, "uniform")
  assert ks.pvalue > 1e-3, ks
  # Isotropic: mean unit direction ~ 0 (each coordinate has std 1 / sqrt(d n)).
  mean_dir = (delta / r[:, None]).mean(0)
  assert np.all(np.abs(mean_dir) < 5 / np.sqrt(d * n)), mean_dir
  # Distinct starts per example (not one shared offset).
  assert len(np.unique(np.round(delta, 6), axis=0)) == n


def test_only_random_restarts_escape_a_flat_point():
  """At a stationary point of the attack loss PGD from x is stuck: the adversarial examples
  at radius > sqrt(c) are found only from the random starts of restarts >= 1."""
  n, d, c = 16, 8, 0.25
  eps = 2 * np.sqrt(c)  # a start breaks the point when its radius > eps / 2: P = 1 - 2^-d
  x = jnp.zeros((n, d), jnp.float32)
  y = jnp.zeros((n,), jnp.int32)
  attack = jax.jit(
    lambda key, restarts: pgd_l2(
      _bowl(c), x, y, key=key, eps=eps, num_steps=10, num_restarts=restarts, **NO_BOX
    ),
    static_argnums=1,
  )
  stuck = attack(jax.random.key(0), 1)
  np.testing.assert_array_equal(stuck.x_adv, x)
  np.testing.assert_allclose(stuck.margin, c)
  for seed in range(3):
    res = attack(jax.random.key(seed), 3)
    assert bool(res.success.all()), (seed, res.margin)
    # From a random start the ascent runs out to the sphere: margin c - eps^2 = -3c.
    np.testing.assert_allclose(res.margin, c - eps**2, rtol=1e-4)
    np.testing.assert_array_equal(res.x_adv, attack(jax.random.key(seed), 3).x_adv)


def test_per_example_eps_matches_scalar():
  logits_fn = _mlp(2)
  x, y = _images(2)
  attack = functools.partial(pgd_l2, logits_fn, num_steps=5, num_restarts=2)
  key = jax.random.key(3)
  scalar = attack(x, y, key=key, eps=0.7)
  vector = attack(x, y, key=key, eps=jnp.full((x.shape[0],), 0.7))
  np.testing.assert_allclose(scalar.x_adv, vector.x_adv, atol=1e-6)
  np.testing.assert_allclose(scalar.margin, vector.margin, atol=1e-6)
  with pytest.raises(ValueError):
    attack(x, y, key=key, eps=jnp.ones((x.shape[0], 1)))


def test_jit_no_recompile_and_matches_eager():
  logits_fn = _mlp(3)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def attack(x, y, key, eps):
    return pgd_l2(logits_fn, x, y, key=key, eps=eps, num_steps=5, num_restarts=2)

  x, y = _images(3)
  x2, y2 = _images(4)
  r1 = attack(x, y, jax.random.key(0), 0.5)
  attack(x2, y2, jax.random.key(1), 0.9)  # same shapes, new values: no retrace
  with pytest.raises(AssertionError):
    attack(x[:4], y[:4], jax.random.key(0), 0.5)  # new shape -> retrace

  @jax.jit
  @chex.assert_max_traces(n=1)
  def attack_per_example(x, y, key, eps):
    return pgd_l2(logits_fn, x, y, key=key, eps=eps, num_steps=5, num_restarts=2)

  attack_per_example(x, y, jax.random.key(0), jnp.full((x.shape[0],), 0.3, jnp.float32))
  attack_per_example(x2, y2, jax.random.key(1), jnp.linspace(0.0, 1.0, x.shape[0]))
  eager = pgd_l2(logits_fn, x, y, key=jax.random.key(0), eps=0.5, num_steps=5, num_restarts=2)
  np.testing.assert_allclose(r1.margin, eager.margin, atol=1e-5)


def test_invalid_arguments():
  logits_fn = _mlp(0)
  x, y = _images(0)
  key = jax.random.key(0)
  for kwargs in [dict(loss="hinge"), dict(schedule="linear"), dict(num_restarts=0)]:
    with pytest.raises(ValueError):
      pgd_l2(logits_fn, x, y, key=key, eps=0.5, **kwargs)


def test_pgd_accuracy_linear_exact():
  rng = np.random.default_rng(5)
  w, b, x, _ = _linear_problem(5, num_classes=4, dim=5, batch=40)
  y = rng.integers(0, 4, size=40)  # true labels: some points misclassified
  eps = 0.7
  pred = (x @ w.T + b).argmax(-1)
  dist = _closed_form(w, b, x, pred)
  # No point so close to the threshold that the 1% tolerance matters.
  assert not np.any((np.abs(dist / eps - 1) < 0.02) & (pred == y))
  expected = np.mean((pred == y) & (dist > eps))
  assert 0 < expected < np.mean(pred == y)  # the test is not vacuous
  w_, b_ = jnp.asarray(w), jnp.asarray(b)
  batches = [(x[:25], y[:25]), (x[25:], y[25:])]  # uneven batches
  acc = pgd_accuracy(
    lambda u: u @ w_.T + b_,
    iter(batches),
    key=jax.random.key(0),
    eps=eps,
    num_steps=30,
    loss="multitarget",
    **NO_BOX,
  )
  assert acc == pytest.approx(expected)


def test_check_certificates_and_raise():
  certified = jnp.array([True, True, False, True, False])
  success = jnp.array([False, True, True, True, False])
  np.testing.assert_array_equal(
    certificate_violations(certified, success), [False, True, False, True, False]
  )
  assert check_certificates(certified, success) == 2
  with pytest.raises(RuntimeError, match=r"SOUNDNESS BUG.*\[1, 3\]"):
    raise_on_violation(certified, success)
  with pytest.raises(RuntimeError, match="eps=0.5"):
    raise_on_violation(certified, success, context="eps=0.5")
  assert check_certificates(certified, jnp.zeros(5, bool)) == 0
  raise_on_violation(certified, jnp.zeros(5, bool))  # no violation: no raise
  with pytest.raises(ValueError):
    check_certificates(certified, success[:3])


def test_attack_catches_unsound_certificate():
  # Exact certificate of a linear model is sound; one that overstates the
  # radius by 2x is caught by the attack.
  w, b, x, y = _linear_problem(6, num_classes=4, dim=5)
  dist = _closed_form(w, b, x, y)
  eps = float(np.median(dist))
  res = _linear_attack(w, b, num_steps=30, loss="multitarget", **NO_BOX)(
    x, y, jax.random.key(0), eps
  )
  raise_on_violation(dist > eps, res.success)
  with pytest.raises(RuntimeError, match="SOUNDNESS BUG"):
    raise_on_violation(2 * dist > eps, res.success)
