"""Certified radii and the training losses: cross-entropy, CRM (paper eq. 8), GloRo.

All functions are pure and batched: ``logits`` ``(B, K)``, integer ``labels`` ``(B,)``, and a
pairwise Lipschitz matrix ``lip`` ``(K, K)`` (``L_ij`` bounds the margin ``z_i - z_j``; see
``crmjax.liplt``; ``crmjax.liplt.as_pairwise`` converts per-class or global bounds).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax


def _pair_ratios(logits, labels, lip):
  """``(z_y - z_i) / L_yi`` for every ``i`` (``(B, K)``), ``+inf`` at ``i = y``."""
  z_y = jnp.take_along_axis(logits, labels[:, None], axis=1)
  lip_y = lip[labels]
  is_y = jax.nn.one_hot(labels, logits.shape[1], dtype=bool)
  safe = jnp.where(is_y, 1.0, jnp.maximum(lip_y, 1e-12))
  return jnp.where(is_y, jnp.inf, (z_y - logits) / safe)


def certified_radius(logits: jax.Array, labels: jax.Array, lip: jax.Array) -> jax.Array:
  """The certified l2 radius of each point (paper eq. 5), 0 where misclassified.

  ``R = min_{i != y} (z_y - z_i) / L_yi``: no perturbation of norm below ``R`` can change
  the prediction when ``L`` is a true upper bound.

  Args:
    logits: ``(B, K)``.
    labels: ``(B,)`` integer labels.
    lip: ``(K, K)`` pairwise bounds.

  Returns:
    ``(B,)`` radii, ``>= 0``.
  """
  return jnp.maximum(jnp.min(_pair_ratios(logits, labels, lip), axis=1), 0.0)


def soft_radius(
  logits: jax.Array, labels: jax.Array, lip: jax.Array, *, temperature: float
) -> jax.Array:
  """The soft radius of paper eq. 6: ``-(1/t) log sum_{i != y} exp(-t (z_y - z_i) / L_yi)``.

  A smooth lower bound of ``min_i (z_y - z_i) / L_yi`` (it tends to it as ``t -> inf``).
  Shapes as ``certified_radius``; not clipped at 0.
  """
  ratios = _pair_ratios(logits, labels, lip)
  return -jax.nn.logsumexp(-temperature * ratios, axis=1) / temperature


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy of ``(B, K)`` logits and ``(B,)`` integer labels."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def exp_penalty(radius: jax.Array, *, temperature: float) -> jax.Array:
  """The paper's default ``g(r) = exp(-t r) / t``: large for small radii, smooth."""
  return jnp.exp(-temperature * radius) / temperature


def linear_penalty(radius: jax.Array, *, temperature: float) -> jax.Array:
  """``g(r) = -r``: the penalty is minus the soft radius, ``(1/t) log sum_i exp(-t R_i)``.

  This is the reference implementation's ``softMax`` robust loss. Unlike ``exp_penalty``,
  whose gradient ``exp(-t r)`` vanishes once ``r`` exceeds a few ``1/t`` (at ``t = 5`` it is
  below 1e-3 at ``r = 1.4``), its gradient stays 1 for every penalised point up to ``r0``:
  with ``r0 = 2.2`` it keeps pushing radii towards the certified target of 1.58.
  ``temperature`` is accepted for a uniform signature and unused.
  """
  del temperature
  return -radius


PENALTIES: dict[str, Callable[..., jax.Array]] = {"exp": exp_penalty, "linear": linear_penalty}


PENALTY_NORMALIZATIONS = ("correct", "batch")


def crm_loss(
  logits: jax.Array,
  labels: jax.Array,
  lip: jax.Array,
  *,
  lam: float | jax.Array,
  temperature: float,
  r0: float | jax.Array,
  penalty: Callable[..., jax.Array] | None = None,
  normalize: str = "correct",
  r_floor: float | jax.Array = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The CRM objective (paper eq. 8): cross-entropy plus a certified-radius penalty.

  ``loss = CE + lam * sum_b mask_b g(R_soft_b) / max(1, sum_b correct_b)``, where
  ``R_soft`` is eq. 6 with the pairwise bound, ``mask`` selects correctly classified points
  whose certified radius is below ``r0`` (points already certified beyond ``r0`` are left
  alone) and at least ``r_floor`` (0: all of them; above 0, points too close to the decision
  boundary to be certified soon are left to the cross-entropy, a crmjax option), and the
  mean runs over the correctly classified points (``normalize='correct'``) or over the whole
  batch (``normalize='batch'``: divide by ``B``, eq. 8's plain mean).

  Args:
    logits: ``(B, K)``.
    labels: ``(B,)``.
    lip: ``(K, K)`` pairwise Lipschitz bounds of the current params (differentiable).
    lam: weight of the penalty (0 during warm-up).
    temperature: ``t`` of the soft-min (eq. 6) and of the default ``g``.
    r0: radius threshold above which points are not penalised.
    penalty: ``g``; called as ``g(r, temperature=t)``. Default ``exp_penalty``.
    normalize: ``'correct'`` or ``'batch'`` (``PENALTY_NORMALIZATIONS``), see above.
    r_floor: radius below which correctly classified points are not penalised (0: none).

  Returns:
    ``(loss, aux)`` with aux ``ce``, ``penalty``, ``accuracy``, ``radius`` (mean certified
    radius, 0 for misclassified points) and ``penalised`` (share of the batch penalised).
  """
  if normalize not in PENALTY_NORMALIZATIONS:
    raise ValueError(f"normalize={normalize!r}: use one of {list(PENALTY_NORMALIZATIONS)}")
  penalty = exp_penalty if penalty is None else penalty
  ce = cross_entropy(logits, labels)
  correct = jnp.argmax(logits, axis=1) == labels
  radius = certified_radius(logits, labels, lip)
  mask = correct & (radius < r0) & (radius >= r_floor)
  g = penalty(soft_radius(logits, labels, lip, temperature=temperature), temperature=temperature)
  count = jnp.maximum(jnp.sum(correct), 1) if normalize == "correct" else labels.shape[0]
  reg = jnp.sum(jnp.where(mask, g, 0.0)) / count
  aux = {
    "ce": ce,
    "penalty": reg,
    "accuracy": jnp.mean(correct),
    "radius": jnp.mean(radius),
    "penalised": jnp.mean(mask),
  }
  return ce + lam * reg, aux


def gloro_loss(
  logits: jax.Array, labels: jax.Array, lip: jax.Array, *, eps: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """GloRo (Leino et al., 2021) with pairwise bounds: cross-entropy over ``K + 1`` logits.

  The extra "bottom" logit is ``max_{i != y} (z_i + eps L_yi)``: it wins exactly when the
  point is not certified at ``eps``.

  Returns:
    ``(loss, aux)`` with ``ce`` (plain), ``accuracy``, ``radius`` and ``vra`` (share
    certified at ``eps``).
  """
  is_y = jax.nn.one_hot(labels, logits.shape[1], dtype=bool)
  bottom = jnp.max(jnp.where(is_y, -jnp.inf, logits + eps * lip[labels]), axis=1)
  loss = cross_entropy(jnp.concatenate([logits, bottom[:, None]], axis=1), labels)
  radius = certified_radius(logits, labels, lip)
  aux = {
    "ce": cross_entropy(logits, labels),
    "accuracy": jnp.mean(jnp.argmax(logits, axis=1) == labels),
    "radius": jnp.mean(radius),
    "vra": jnp.mean(radius > eps),
  }
  return loss, aux
