"""Empirical l2 attacks and certificate soundness checks.

The attack here is l2 projected gradient descent (PGD; Madry et al., 2018,
"Towards Deep Learning Models Resistant to Adversarial Attacks",
https://arxiv.org/abs/1706.06083). It gives an *upper* bound on robust
accuracy, which complements the *lower* bound given by certificates: a point
that is certified at radius ``eps`` but broken by the attack at ``eps`` proves
the certificate is wrong (:func:`check_certificates`,
:func:`raise_on_violation`).

All functions are pure and batched. :func:`pgd_l2` is jit-compatible; the
hyperparameters ``num_steps``, ``num_restarts``, ``loss`` and ``schedule`` are
Python values that fix the traced program, while ``eps``, ``step_size``,
``clip_min`` and ``clip_max`` may be traced.

:func:`pgd_success` runs the margin-loss attack of a model over a test split in batches
(the check of the certification report, ``crmjax.reports``).

Shapes: ``B`` is the batch size, ``K`` the number of classes and ``...`` the
per-example input shape (e.g. ``(28, 28, 1)``).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from crmjax import models

__all__ = [
  "PGDResult",
  "margins",
  "pgd_l2",
  "pgd_accuracy",
  "certificate_violations",
  "check_certificates",
  "raise_on_violation",
  "pgd_attack",
  "pgd_success",
]

LogitsFn = Callable[[jax.Array], jax.Array]
ArrayLike = jax.Array | np.ndarray | float

_TINY = 1e-12


class PGDResult(NamedTuple):
  """Output of :func:`pgd_l2`.

  Attributes:
    x_adv: ``(B, ...)`` the most violating iterate found per example (lowest
      margin over all steps and restarts). Lies in the l2 ball of radius
      ``eps`` around ``x`` and in the box ``[clip_min, clip_max]``.
    margin: ``(B,)`` classification margin ``z_y - max_{i != y} z_i`` of the
      logits at ``x_adv``. Negative means the attack succeeded.
    success: ``(B,)`` bool, ``margin < 0``.
  """

  x_adv: jax.Array
  margin: jax.Array
  success: jax.Array


def margins(logits: jax.Array, y: jax.Array) -> jax.Array:
  """Classification margin ``z_y - max_{i != y} z_i``.

  Args:
    logits: ``(B, K)`` logits, ``K >= 2``.
    y: ``(B,)`` integer labels.

  Returns:
    ``(B,)`` margins; positive iff ``y`` is the unique argmax.
  """
  onehot = jax.nn.one_hot(y, logits.shape[-1], dtype=bool)
  z_y = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
  z_other = jnp.max(jnp.where(onehot, -jnp.inf, logits), axis=-1)
  return z_y - z_other


def _per_example(v: ArrayLike, batch: int, dtype) -> jax.Array:
  """Broadcast a scalar or ``(B,)`` value to ``(B,)``."""
  v = jnp.asarray(v, dtype=dtype)
  if v.ndim > 1:
    raise ValueError(f"expected a scalar or a (B,) array, got shape {v.shape}")
  return jnp.broadcast_to(v, (batch,))


def _expand(v: jax.Array, ndim: int) -> jax.Array:
  """``(B,)`` -> ``(B, 1, ..., 1)`` with ``ndim`` dims, for broadcasting."""
  return v.reshape(v.shape + (1,) * (ndim - 1))


def _l2_norm(v: jax.Array) -> jax.Array:
  """Per-example l2 norm, ``(B, ...)`` -> ``(B,)``."""
  return jnp.sqrt(jnp.sum(jnp.square(v.reshape(v.shape[0], -1)), axis=-1))


def _project(
  x_new: jax.Array,
  x: jax.Array,
  eps: jax.Array,
  clip_min: ArrayLike,
  clip_max: ArrayLike,
) -> jax.Array:
  """Project onto the l2 ball of radius ``eps`` around ``x``, then clip.

  Clipping after the ball projection keeps the point in the ball whenever
  ``x`` itself is in the box (clipping only moves coordinates towards ``x``),
  so the result lies in the intersection.
  """
  delta = x_new - x
  norm = _l2_norm(delta)
  factor = jnp.minimum(1.0, eps / jnp.maximum(norm, _TINY))
  delta = delta * _expand(factor, x.ndim).astype(x.dtype)
  return jnp.clip(x + delta, clip_min, clip_max)


def _uniform_in_ball(key: jax.Array, x: jax.Array, eps: jax.Array) -> jax.Array:
  """Perturbations ``(B, ...)`` uniform in the l2 ball of radius ``eps``."""
  dim = int(np.prod(x.shape[1:]))
  k_dir, k_rad = jax.random.split(key)
  direction = jax.random.normal(k_dir, x.shape, dtype=x.dtype)
  direction = direction / _expand(jnp.maximum(_l2_norm(direction), _TINY), x.ndim)
  u = jax.random.uniform(k_rad, (x.shape[0],), dtype=x.dtype)
  radius = eps * u ** (1.0 / dim)
  return direction * _expand(radius, x.ndim)


def _step_size_at(t: jax.Array, step_size: jax.Array, num_steps: int, schedule: str):
  if schedule == "cosine":
    return step_size * 0.5 * (1.0 + jnp.cos(jnp.pi * t / num_steps))
  if schedule == "constant":
    return step_size
  raise ValueError(f"unknown schedule {schedule!r}; expected 'cosine' or 'constant'")


def pgd_l2(
  logits_fn: LogitsFn,
  x: jax.Array,
  y: jax.Array,
  *,
  key: jax.Array,
  eps: ArrayLike,
  num_steps: int = 50,
  step_size: ArrayLike | None = None,
  num_restarts: int = 1,
  loss: str = "margin",
  schedule: str = "cosine",
  clip_min: ArrayLike = 0.0,
  clip_max: ArrayLike = 1.0,
) -> PGDResult:
  """Untargeted l2 PGD attack (Madry et al., 2018) with restarts.

  Each run does ``num_steps`` iterations of normalised-gradient ascent on the
  attack loss::

    x_{t+1} = clip(P_eps(x_t + a_t * g_t / ||g_t||_2)),

  where ``g_t`` is the per-example gradient of the loss at ``x_t``, ``P_eps``
  projects onto the l2 ball of radius ``eps`` around ``x`` and ``clip`` onto
  the box ``[clip_min, clip_max]`` (ball first, then box; since ``x`` is in
  the box, clipping cannot leave the ball). In restart 0 every run starts at
  ``x`` itself; in every further restart it starts uniformly at random in the
  ball (then clipped to the box). The step size follows ``schedule``:

  * ``"cosine"`` (default): ``a_t = step_size * (1 + cos(pi t / T)) / 2``
    for ``t = 0..T-1``: large exploratory steps first, small refining steps
    at the end. The total path length is about ``T * step_size / 2``.
  * ``"constant"``: ``a_t = step_size`` (Madry et al.).

  The margin ``z_y - max_{i!=y} z_i`` is evaluated at every iterate
  (including each start and each last iterate) and, per example, the iterate
  with the lowest margin over all steps, runs and restarts is returned.

  Losses (all maximised):

  * ``"margin"``: ``max_{i!=y} z_i - z_y`` (Carlini & Wagner, 2017). One run
    per restart.
  * ``"ce"``: softmax cross-entropy. One run per restart.
  * ``"multitarget"``: ``z_t - z_y`` for each target class ``t != y`` in a
    separate run, i.e. ``K - 1`` runs per restart (multi-targeted PGD; Gowal
    et al., 2019, https://arxiv.org/abs/1910.09338). ``K - 1`` times the
    cost, but it cannot get trapped steering towards the wrong class: on a
    linear model it finds the exact minimal l2 adversarial perturbation,
    which the untargeted losses in general do not.

  The gradient of the summed batch loss is used as the per-example gradient,
  which requires ``logits_fn`` to treat examples independently (e.g. no
  batch-norm in training mode).

  Args:
    logits_fn: maps ``(B, ...)`` inputs to ``(B, K)`` logits, ``K >= 2``.
    x: ``(B, ...)`` clean inputs, assumed to lie in ``[clip_min, clip_max]``.
    y: ``(B,)`` integer labels.
    key: PRNG key for the random starts (unused when ``num_restarts == 1``).
    eps: l2 radius, scalar or ``(B,)``.
    num_steps: iterations per run ``T`` (static).
    step_size: peak step size, scalar or ``(B,)``; defaults to
      ``2.5 * eps / num_steps``.
    num_restarts: number of restarts (static), ``>= 1``.
    loss: ``"margin"``, ``"ce"`` or ``"multitarget"`` (static).
    schedule: step-size schedule, ``"cosine"`` or ``"constant"`` (static).
    clip_min: lower bound of the input box (``-jnp.inf`` for none).
    clip_max: upper bound of the input box (``jnp.inf`` for none).

  Returns:
    A :class:`PGDResult` with ``x_adv`` ``(B, ...)``, ``margin`` ``(B,)`` and
    ``success`` ``(B,)``.
  """
  if num_steps < 0:
    raise ValueError(f"num_steps must be >= 0, got {num_steps}")
  if num_restarts < 1:
    raise ValueError(f"num_restarts must be >= 1, got {num_restarts}")
  if loss not in ("margin", "ce", "multitarget"):
    raise ValueError(f"unknown loss {loss!r}; expected 'margin', 'ce' or 'multitarget'")
  if schedule not in ("cosine", "constant"):
    raise ValueError(f"unknown schedule {schedule!r}; expected 'cosine' or 'constant'")

  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  y = jnp.asarray(y)
  batch, ndim = x.shape[0], x.ndim
  num_classes = jax.eval_shape(logits_fn, x).shape[-1]
  eps = _per_example(eps, batch, x.dtype)
  if step_size is None:
    step_size = 2.5 * eps / max(num_steps, 1)
  step_size = _per_example(step_size, batch, x.dtype)

  def objective(x_cur, target):
    logits = logits_fn(x_cur)
    m = margins(logits, y)
    if loss == "margin":
      per_example = -m
    elif loss == "ce":
      per_example = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    else:
      z_t = jnp.take_along_axis(logits, target[:, None], axis=-1)[:, 0]
      z_y = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
      per_example = z_t - z_y
    return jnp.sum(per_example), m

  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def keep_best(best, x_cur, m):
    best_x, best_m = best
    better = m < best_m
    best_x = jnp.where(_expand(better, ndim), x_cur, best_x)
    return best_x, jnp.where(better, m, best_m)

  def run(best, inputs):
    restart_idx, target_offset, k = inputs
    target = (y + target_offset) % num_classes

    def step(t, carry):
      x_cur, best = carry
      (_, m), g = grad_fn(x_cur, target)
      best = keep_best(best, x_cur, m)
      g_unit = g / _expand(jnp.maximum(_l2_norm(g), _TINY), ndim)
      a_t = _step_size_at(t, step_size, num_steps, schedule)
      x_next = x_cur + _expand(a_t, ndim).astype(x.dtype) * g_unit
      return _project(x_next, x, eps, clip_min, clip_max), best

    delta0 = jnp.where(restart_idx == 0, jnp.zeros_like(x), _uniform_in_ball(k, x, eps))
    x0 = _project(x + delta0, x, eps, clip_min, clip_max)
    x_last, best = jax.lax.fori_loop(0, num_steps, step, (x0, best))
    best = keep_best(best, x_last, margins(logits_fn(x_last), y))
    return best, None

  # One run per (restart, target offset); offsets are 1..K-1 for
  # multi-targeted PGD and a dummy 1 otherwise.
  offsets = np.arange(1, num_classes) if loss == "multitarget" else np.ones(1, np.int32)
  restart_idx = np.repeat(np.arange(num_restarts), offsets.size)
  target_offsets = np.tile(offsets, num_restarts).astype(np.int32)
  keys = jax.random.split(key, num_restarts)[restart_idx]
  init = (x, jnp.full((batch,), jnp.inf, dtype=x.dtype))
  (x_adv, margin), _ = jax.lax.scan(
    run, init, (jnp.asarray(restart_idx), jnp.asarray(target_offsets), keys)
  )
  return PGDResult(x_adv=x_adv, margin=margin, success=margin < 0)


def pgd_accuracy(
  logits_fn: LogitsFn,
  batches: Iterable[tuple[ArrayLike, ArrayLike]],
  *,
  key: jax.Array,
  eps: float,
  **pgd_kwargs,
) -> float:
  """Robust accuracy under :func:`pgd_l2` over a dataset.

  An example counts as robust if it is correctly classified at ``x`` (argmax
  of the logits equals ``y``) and PGD finds no adversarial example within
  ``eps``. This is an empirical upper bound on the true robust accuracy.

  The attack is jitted once per distinct batch shape; batch ``i`` uses
  ``jax.random.fold_in(key, i)``.

  Args:
    logits_fn: maps ``(B, ...)`` inputs to ``(B, K)`` logits.
    batches: iterable of ``(x, y)`` with ``x`` ``(B, ...)``, ``y`` ``(B,)``.
    key: PRNG key.
    eps: l2 radius (scalar).
    **pgd_kwargs: keyword hyperparameters forwarded to :func:`pgd_l2`.

  Returns:
    Fraction of robust examples in ``[0, 1]`` (``nan`` for an empty dataset).
  """

  @jax.jit
  def robust_count(x, y, k, e):
    res = pgd_l2(logits_fn, x, y, key=k, eps=e, **pgd_kwargs)
    clean_ok = jnp.argmax(logits_fn(x), axis=-1) == y
    return jnp.sum(clean_ok & ~res.success)

  robust, total = 0, 0
  for i, (x, y) in enumerate(batches):
    x, y = jnp.asarray(x), jnp.asarray(y)
    robust += int(robust_count(x, y, jax.random.fold_in(key, i), eps))
    total += int(y.shape[0])
  return robust / total if total else float("nan")


def certificate_violations(certified: ArrayLike, success: ArrayLike) -> jax.Array:
  """Mask of points certified at ``eps`` yet broken by an attack at ``eps``.

  Args:
    certified: ``(B,)`` bool, the certificate claims robustness at ``eps``.
    success: ``(B,)`` bool, an attack found an adversarial example at ``eps``.

  Returns:
    ``(B,)`` bool mask; any ``True`` entry is a soundness bug.
  """
  certified, success = jnp.asarray(certified, bool), jnp.asarray(success, bool)
  if certified.shape != success.shape:
    raise ValueError(f"shape mismatch: certified {certified.shape} vs success {success.shape}")
  return certified & success


def check_certificates(certified: ArrayLike, success: ArrayLike) -> int:
  """Number of points certified at ``eps`` yet broken by an attack at ``eps``.

  Not jit-compatible (returns a Python int); use
  :func:`certificate_violations` inside ``jit``.
  """
  return int(jnp.sum(certificate_violations(certified, success)))


def raise_on_violation(certified: ArrayLike, success: ArrayLike, *, context: str = "") -> None:
  """Raise ``RuntimeError`` if any certified point was broken by an attack.

  A certified point with a successful attack at the same radius means the
  certificate (or the attack's projection) is wrong.

  Args:
    certified: ``(B,)`` bool.
    success: ``(B,)`` bool.
    context: optional text appended to the message (e.g. the eps, model).

  Raises:
    RuntimeError: message starting with ``"SOUNDNESS BUG"`` listing the
      offending indices.
  """
  idx = np.flatnonzero(np.asarray(certificate_violations(certified, success)))
  if idx.size:
    msg = (
      f"SOUNDNESS BUG: {idx.size} certified point(s) broken by the attack, indices {idx.tolist()}"
    )
    if context:
      msg += f" ({context})"
    raise RuntimeError(msg)


def pgd_attack(model: models.Model, params, *, eps: float, num_steps: int, num_restarts: int):
  """Jitted ``(x, y, key) -> success`` of l2 PGD (margin loss), traced at the highest matmul
  precision (as the logits of the certificates it checks)."""
  logits_fn = functools.partial(model.apply, params)

  def attack_fn(x, y, k):
    with jax.default_matmul_precision("highest"):
      return pgd_l2(
        logits_fn,
        x,
        y,
        key=k,
        eps=eps,
        num_steps=num_steps,
        num_restarts=num_restarts,
        loss="margin",
      ).success

  return jax.jit(attack_fn)


def pgd_success(
  model: models.Model,
  params,
  images: np.ndarray,
  labels: np.ndarray,
  *,
  eps: float,
  num_steps: int,
  num_restarts: int,
  batch_size: int,
  seed: int,
  progress: bool = False,
) -> np.ndarray:
  """Whether l2 PGD (margin loss) breaks each point at ``eps``.

  The logits of the attack are computed at the highest matmul precision (as the logits of
  the certificates it checks).

  Args:
    images: uint8 ``(N, H, W, C)``; attacked in [0, 1] pixel space.
    labels: ``(N,)``.
    progress: a tqdm bar over the batches (stderr).

  Returns:
    ``(N,)`` bool; misclassified points count as broken.
  """
  attack = pgd_attack(model, params, eps=eps, num_steps=num_steps, num_restarts=num_restarts)
  key, out = jax.random.key(seed), []
  for i in tqdm.trange(
    0,
    len(images),
    batch_size,
    desc="PGD",
    unit=" batches",
    disable=not progress,
    file=sys.stderr,
    leave=False,
  ):
    x = images[i : i + batch_size].astype(np.float32) / np.float32(255)
    y, n = labels[i : i + batch_size], len(labels[i : i + batch_size])
    pad = batch_size - n if len(images) > batch_size else 0  # one compiled shape
    x, y = np.pad(x, [(0, pad)] + [(0, 0)] * 3), np.pad(y, (0, pad))
    out.append(np.asarray(attack(x, y, jax.random.fold_in(key, i)))[:n])
  return np.concatenate(out) if out else np.zeros(0, bool)
