"""Certified radii and certified accuracy of a trained model (paper eq. 5).

``evaluate`` is the end-of-training report; ``crmjax.soundness`` supplies the guaranteed
(sound) pairwise bound that certificates must use.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from crmjax import liplt, losses, models, soundness


def batched_logits(model: models.Model, params, images: np.ndarray, *, batch_size: int
                   ) -> np.ndarray:
  """Logits ``(N, K)`` of uint8 (0..255) or float ([0, 1]) images ``(N, H, W, C)``, in batches."""
  apply = jax.jit(model.apply)
  out = []
  for i in range(0, len(images), batch_size):
    x = images[i:i + batch_size].astype(np.float32)
    if images.dtype == np.uint8:
      x = x / np.float32(255)  # as crmjax.data.epoch_batches
    out.append(np.asarray(apply(params, x)))
  return np.concatenate(out) if out else np.zeros((0, model.num_classes), np.float32)


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
  return np.asarray(losses.certified_radius(jnp.asarray(logits), jnp.asarray(labels),
                                            jnp.asarray(lip)))


def evaluate(model: models.Model, params, power: liplt.PowerState, images: np.ndarray,
             labels: np.ndarray, *, eps: float, batch_size: int = 1000, num_iters: int = 100,
             method: str = "liplt", sound: bool = True, sound_iters: int = 1000) -> dict:
  """Clean accuracy, certified accuracy at ``eps`` and the mean pairwise bound.

  Args:
    model, params: the classifier.
    power: the training power-iteration state (warm start of the estimate).
    images, labels: the test split (uint8 images in pixel space).
    eps: l2 radius in [0, 1] pixel space.
    num_iters: power iterations from the warm state for the estimate.
    method: ``'liplt'``, ``'naive'`` or ``'liplt_aol'`` (``liplt.ALL_METHODS``).
    sound: also compute the guaranteed bound (``crmjax.soundness``) and certify with it.
    sound_iters: power iterations of the sound bound's probabilistic norms.

  Returns:
    A JSON-ready dict. ``certified_accuracy`` uses the sound bound when ``sound`` is set
    (``bound_kind`` says which bound was used).
  """
  logits = batched_logits(model, params, images, batch_size=batch_size)
  clean = float((logits.argmax(1) == labels).mean()) if len(labels) else 0.0
  net = model.lipnet(params)
  fn = jax.jit(lambda n, s: liplt.lipschitz_bound(n, s, method=method, num_iters=num_iters))
  est, _ = fn(net, power)
  est = np.asarray(est)
  out = {"clean_accuracy": clean, "eps": eps, "method": method,
         "estimate_mean_pairwise_lipschitz": mean_pairwise(est),
         "estimate_certified_accuracy": certified_accuracy(radii_of(logits, labels, est), eps)}
  lip, kind = est, "power-iteration estimate (not guaranteed)"
  if sound:
    lip, info = soundness.sound_bound(net, method=method, mode="pairwise", warm=power,
                                      num_iters=sound_iters)
    kind = info["kind"]
    out["bound_details"] = info
  radii = radii_of(logits, labels, np.asarray(lip))
  out.update({"certified_accuracy": certified_accuracy(radii, eps),
              "mean_pairwise_lipschitz": mean_pairwise(lip), "bound_kind": kind,
              "mean_certified_radius": float(radii.mean()) if radii.size else 0.0})
  return out
