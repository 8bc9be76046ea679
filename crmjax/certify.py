"""Certified radii and certified accuracy of a trained model (paper eq. 5).

``evaluate`` is the end-of-training report; ``crmjax.soundness`` supplies the guaranteed
(sound) pairwise bound that certificates must use.

Logits that enter a certificate are computed at the highest matmul precision
(``certified_apply``): JAX's default lets GPUs multiply in TF32 (a ~1e-3 relative logit
error), far outside the 1e-4 rounding margin of the sound bounds, which are computed at the
highest precision as well.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from crmjax import liplt, losses, models, rescaling, soundness


def certified_apply(model: models.Model) -> Callable:
  """``jax.jit(model.apply)`` traced under ``jax.default_matmul_precision('highest')``.

  Every dot and convolution of the compiled program carries ``HIGHEST`` precision (full
  float32 products on every backend), whatever the caller's default.
  """

  def apply(params, x):
    with jax.default_matmul_precision("highest"):
      return model.apply(params, x)

  return jax.jit(apply)


def eps_key(eps: float) -> str:
  """The JSON key of a radius in ``certified_accuracy_at``: 4 significant digits."""
  return f"{float(eps):.4g}"


def batched_logits(
  model: models.Model, params, images: np.ndarray, *, batch_size: int
) -> np.ndarray:
  """Logits ``(N, K)`` of uint8 (0..255) or float ([0, 1]) images ``(N, H, W, C)``, in batches.

  At the highest matmul precision (``certified_apply``): these logits make certificates.
  """
  apply = certified_apply(model)
  out = [np.asarray(apply(params, x)) for x in _unit_batches(images, batch_size)]
  return np.concatenate(out) if out else np.zeros((0, model.num_classes), np.float32)


def _unit_batches(images: np.ndarray, batch_size: int):
  """float32 batches in [0, 1] pixel space of uint8 (0..255) or float ([0, 1]) images."""
  for i in range(0, len(images), batch_size):
    x = images[i : i + batch_size].astype(np.float32)
    if images.dtype == np.uint8:
      x = x / np.float32(255)  # as crmjax.data.epoch_batches
    yield x


def mean_pairwise(lip: np.ndarray) -> float:
  """The average of ``L_ij`` over the ``K (K - 1) / 2`` unique pairs (paper Table 2)."""
  lip = np.asarray(lip)
  return float(lip[np.triu_indices(lip.shape[0], 1)].mean())


def certified_accuracy(radii: np.ndarray, eps: float | Sequence[float]) -> np.ndarray | float:
  """Share of points with certified radius ``> eps`` (0-radius points never count)."""
  radii = np.asarray(radii)
  eps_arr = np.atleast_1d(np.asarray(eps, np.float64))
  acc = (radii[None, :] > eps_arr[:, None]).mean(axis=1) if radii.size else np.zeros(len(eps_arr))
  return float(acc[0]) if np.ndim(eps) == 0 else acc


def radii_of(logits: np.ndarray, labels: np.ndarray, lip: np.ndarray) -> np.ndarray:
  """Certified radii ``(N,)`` (eq. 5) from logits, labels and a ``(K, K)`` bound."""
  return np.asarray(
    losses.certified_radius(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(lip))
  )


def margin_gradient_fn(model: models.Model) -> Callable:
  """``jax.jit`` of ``(params, x) -> (B, K, K)``: ``||grad_x (z_i - z_j)(x)||_2`` at each of
  the float images ``x`` ``(B, H, W, C)``, reverse-mode Jacobians at the highest matmul
  precision, the pair norms from their Gram matrix (zero diagonal)."""

  def pair_norms(params, x):
    with jax.default_matmul_precision("highest"):
      jac = jax.vmap(jax.jacrev(lambda v: model.apply(params, v[None])[0]))(x)
      jac = jac.reshape(x.shape[0], model.num_classes, -1)
      gram = jnp.einsum("bid,bjd->bij", jac, jac)
    diag = jnp.diagonal(gram, axis1=1, axis2=2)
    squares = diag[:, :, None] + diag[:, None, :] - 2 * gram  # ||g_i - g_j||^2
    return jnp.sqrt(jnp.maximum(squares, 0.0)) * (1 - jnp.eye(model.num_classes))

  return jax.jit(pair_norms)


def margin_gradient_norms(
  model: models.Model, params, images: np.ndarray, *, batch_size: int = 100
) -> np.ndarray:
  """The margin gradients ``||grad_x (z_i - z_j)(x)||_2`` at each point, per pair.

  Wherever the network is differentiable, ``||grad (z_i - z_j)(x)||`` is at most the true
  Lipschitz constant of ``z_i - z_j``, so at most any valid ``L_ij`` (paper eq. 5's bound).
  (At a kink, e.g. a ReLU input exactly 0, autodiff's one-sided choice need not be the
  gradient of any nearby piece.) Their maximum over the points (``.max(0)``) thus shows how
  much any tighter bound could still gain, and ``radii_of(logits, labels, result.max(0))``
  bounds from above the radius that any valid global pairwise bound of this network can
  certify. ``first_order_radii`` linearises each point instead.

  Args:
    model, params: the classifier.
    images: uint8 (0..255) or float ([0, 1]) images ``(N, H, W, C)``.
    batch_size: points per Jacobian. Memory grows with ``batch_size * K`` backward passes:
      100 suits MNIST and CIFAR-10 with 10 classes; use less with many classes.

  Returns:
    ``(N, K, K)`` float64, each ``(K, K)`` symmetric with a zero diagonal.
  """
  pair_norms = margin_gradient_fn(model)
  out = [np.zeros((0,) + (model.num_classes,) * 2)]
  for x in _unit_batches(images, batch_size):
    out.append(np.asarray(pair_norms(params, jnp.asarray(x)), np.float64))
  return np.concatenate(out)


def first_order_radii(logits: np.ndarray, labels: np.ndarray, grads: np.ndarray) -> np.ndarray:
  """Eq. 5 with each point's own margin gradients in place of ``L``.

  ``min_{i != y} (z_y - z_i) / ||grad (z_y - z_i)(x)||``, 0 where misclassified. NOT a
  certificate (the gradient at ``x``, not over the ball around it), but a ceiling for local
  Lipschitz certificates (``margin > eps * L_local``): a bound over the ball is at least the
  gradient at its centre (where differentiable), so none certifies a point at ``eps`` beyond
  this radius. Exact verifiers, which do not go through a Lipschitz constant, can.

  Args:
    logits: ``(N, K)``.
    labels: ``(N,)`` integer labels.
    grads: ``(N, K, K)`` from ``margin_gradient_norms``.

  Returns:
    ``(N,)`` radii, ``>= 0``.
  """
  one = lambda z, y, g: losses.certified_radius(z[None], y[None], g)[0]
  args = (jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(grads, jnp.float32))
  return np.asarray(jax.vmap(one)(*args))


def evaluate(
  model: models.Model,
  params,
  power: liplt.PowerState,
  images: np.ndarray,
  labels: np.ndarray,
  *,
  eps: float,
  extra_eps: Sequence[float] = (),
  batch_size: int = 1000,
  eval_iters: int = 100,
  method: str = "liplt",
  sound: soundness.SoundSettings | None = soundness.DEFAULT_SETTINGS,
  scales: rescaling.Scales | None = None,
) -> dict:
  """Clean accuracy, certified accuracy at ``eps`` (and ``extra_eps``), mean pairwise bound.

  Args:
    model, params: the classifier.
    power: the training power-iteration state (warm start of the estimate).
    images, labels: the test split (uint8 images in pixel space).
    eps: l2 radius in [0, 1] pixel space (``certified_accuracy``).
    extra_eps: more radii reported in ``certified_accuracy_at`` (e.g. 36/255 and 18/255).
    batch_size: test points per forward pass.
    eval_iters: power iterations from the warm state for the estimate.
    method: ``'liplt'``, ``'naive'`` or ``'liplt_aol'`` (``liplt.ALL_METHODS``).
    sound: how to compute the guaranteed bound (``crmjax.soundness``) that certifies;
      ``None``: certify with the estimate only.
    scales: ``method='liplt'`` only: a positive diagonal rescaling ``D`` per block, e.g. the
      one the training loss used (``--config.rescaling.every_steps``). Every bound (estimate
      and sound) is then the per-pair minimum of the bound of the network and that of
      ``rescaling.rescale(net, D)``, both valid (the Theorem 3.2 refinement); each sound
      bound gets half the failure probability, so their minimum keeps ``sound``'s (union
      bound). ``bound_details['rescaled']`` states both means and how many pairs the
      rescaled bound set.

  Returns:
    A JSON-ready dict. ``certified_accuracy`` uses the sound bound when ``sound`` is given
    (``bound_kind`` says which bound was used); ``certified_accuracy_at`` maps
    ``eps_key(e)`` to the certified accuracy at ``e`` for ``eps`` and every ``extra_eps``;
    with ``sound``, ``bound_details`` states the method, estimator, failure probability,
    key (pass it back to reproduce the bound), exact / probabilistic norm counts and
    ``seconds`` (wall time of the sound bound).
  """
  logits = batched_logits(model, params, images, batch_size=batch_size)
  clean = float((logits.argmax(1) == labels).mean()) if len(labels) else 0.0
  net = model.lipnet(params)

  if scales is not None and method != "liplt":
    raise ValueError(f"scales rescale the 'liplt' bound only, got method={method!r}")

  def estimate(n, s):
    with jax.default_matmul_precision("highest"):
      return liplt.lipschitz_bound(n, s, method=method, num_iters=eval_iters)[0]

  est = np.asarray(jax.jit(estimate)(net, power))
  if scales is not None:
    est = np.minimum(est, np.asarray(jax.jit(estimate)(rescaling.rescale(net, scales), power)))
  out = {
    "clean_accuracy": clean,
    "eps": eps,
    "method": method,
    "estimate_mean_pairwise_lipschitz": mean_pairwise(est),
    "estimate_certified_accuracy": certified_accuracy(radii_of(logits, labels, est), eps),
  }
  lip, kind = est, "power-iteration estimate (not guaranteed)"
  if sound is not None:
    t0 = time.perf_counter()
    lip, info = sound_pairwise(net, power, method=method, sound=sound, scales=scales)
    info["seconds"] = time.perf_counter() - t0
    kind = info["kind"]
    out["bound_details"] = info
  radii = radii_of(logits, labels, np.asarray(lip))
  radii_eps = [eps, *[e for e in extra_eps if eps_key(e) != eps_key(eps)]]
  out.update(
    {
      "certified_accuracy": certified_accuracy(radii, eps),
      "certified_accuracy_at": {eps_key(e): certified_accuracy(radii, e) for e in radii_eps},
      "mean_pairwise_lipschitz": mean_pairwise(lip),
      "bound_kind": kind,
      "mean_certified_radius": float(radii.mean()) if radii.size else 0.0,
    }
  )
  return out


def sound_pairwise(
  net,
  power: liplt.PowerState | None,
  *,
  sound: soundness.SoundSettings,
  method: str = "liplt",
  scales: rescaling.Scales | None = None,
  exact_cache: dict | None = None,
) -> tuple[np.ndarray, dict]:
  """The sound ``(K, K)`` bound that certifies (``evaluate``, ``crmjax.reports``): of
  ``net``, or with ``scales`` the per-pair minimum of the bounds of ``net`` and
  ``rescale(net, scales)`` (both valid, Theorem 3.2 refinement), each at half the failure
  probability (the minimum then fails with at most ``sound``'s: union bound).
  ``info['rescaled']`` states both means and how many pairs the rescaled bound set."""
  kw = dict(mode="pairwise", warm=power, exact_cache=exact_cache)
  if scales is None:
    return soundness.sound_bound(net, method=method, settings=sound, **kw)
  half = dataclasses.replace(sound, failure_probability=sound.failure_probability / 2)
  scaled, info_d = soundness.sound_bound(net, method=method, scales=scales, settings=half, **kw)
  plain, info = soundness.sound_bound(net, method=method, settings=half, **kw)
  plain, scaled = np.asarray(plain), np.asarray(scaled)
  info["failure_probability"] = info["failure_probability"] + info_d["failure_probability"]
  info["kind"] = soundness.bound_kind(info["failure_probability"])
  info["rescaled"] = {
    "mean_pairwise_plain": mean_pairwise(plain),
    "mean_pairwise_rescaled": mean_pairwise(scaled),
    "pairs_from_rescaled": int(np.triu(scaled < plain, 1).sum()),
    "key": info_d.get("key"),
  }
  return np.minimum(plain, scaled), info


def certified_radii(
  model: models.Model,
  params,
  images: np.ndarray,
  labels: np.ndarray,
  *,
  method: str = "liplt",
  batch_size: int = 1000,
  sound: soundness.SoundSettings = soundness.DEFAULT_SETTINGS,
) -> tuple[np.ndarray, np.ndarray, dict]:
  """Sound certified l2 radii (eq. 5) of any crmjax model, e.g. one converted from Flax
  (``crmjax.nnx_bridge.to_model``, ``crmjax.linen_bridge.to_model``) or PyTorch
  (``crmjax.importers.import_torch_sequential``).

  The logits (``batched_logits``, highest matmul precision) and the guaranteed pairwise bound
  (``soundness.sound_bound``) are both computed from ``model`` with ``params``, so a point
  with radius ``r`` keeps its predicted class under every perturbation of l2 norm ``< r`` of
  this network (with the bound's probability, ``info['kind']``). A misclassified point has
  radius 0.

  Args:
    model, params: the classifier.
    images: ``(N, *input_shape)``, uint8 (0..255, scaled to [0, 1]) or float.
    labels: ``(N,)`` integer classes.
    method: ``'liplt'``, ``'naive'`` or ``'liplt_aol'`` (``soundness.sound_bound``).
    batch_size: logits batch size.
    sound: the sound bound's settings (estimator, iterations, key, failure probability).

  Returns:
    ``(radii (N,), bound (K, K), info)``: ``info`` of the sound bound plus ``logits``.
  """
  logits = batched_logits(model, params, np.asarray(images), batch_size=batch_size)
  lip, info = soundness.sound_bound(
    model.lipnet(params), method=method, mode="pairwise", settings=sound
  )
  info["logits"] = logits
  return radii_of(logits, np.asarray(labels), lip), np.asarray(lip), info
