"""The host input pipeline: batching, augmentation and prefetching to device.

Pure numpy on the host, deterministic in ``(seed, epoch, step)``:

* :func:`epoch_batches` yields the batches of one epoch in the order
  ``np.random.default_rng([seed, epoch]).permutation(N)``, resumable at any step;
* :class:`Augment` / :func:`augment_batch`: random crop (translation by padding), horizontal
  flip, and a random rotation plus translation (``torchvision.transforms.RandomAffine``'s
  parametrisation, nearest-neighbour sampling), drawn from
  ``default_rng([seed, epoch, step, const])``;
* :func:`prefetch_to_device` overlaps all of it with device compute (a background thread).

Augmentation runs on the host, not on the device, because (a) the step stays one
compiled program whatever the augmentation (shapes and dtypes never change, nothing new is
traced), (b) its randomness is a function of ``(seed, epoch, step)`` alone, so a resumed run
sees bitwise the same batches, on any device count, without threading keys through the
step, and (c) it overlaps with the device step in ``prefetch_to_device``'s thread: a
nearest-neighbour warp is one gather (a few ms for 512 CIFAR-10 images).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np

__all__ = [
  "Augment",
  "augment_batch",
  "epoch_batches",
  "prefetch_to_device",
  "steps_per_epoch",
]


# ---------------------------------------------------------------------------
# Batching and augmentation
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Augment:
  """Training-time augmentation, applied independently per example, in this order.

  Attributes:
    random_crop_padding: zero-pad each side by this many pixels, then take a
      random crop of the original size (= a random translation by up to this
      many pixels). 0 disables it.
    horizontal_flip: flip each image left-right with probability 1/2.
    rotation_degrees: rotate by an angle drawn uniformly from
      ``[-rotation_degrees, rotation_degrees]`` about the image centre (torchvision's
      ``RandomAffine(degrees=...)``). 0 disables it.
    translation: shift by a whole number of pixels, ``round(U(-translation * W,
      translation * W))`` across and likewise down (torchvision's ``RandomAffine(translate=
      (translation, translation))``), together with the rotation. 0 disables it.
    fill: the value, in [0, 1] pixel units, of pixels that the rotation / translation
      brings in from outside the image (torchvision fills 0 in whatever space it works in:
      0.5 here is a reference that normalises with mean 0.5 before augmenting).
  """

  random_crop_padding: int = 0
  horizontal_flip: bool = False
  rotation_degrees: float = 0.0
  translation: float = 0.0
  fill: float = 0.0

  def __post_init__(self):
    if self.random_crop_padding < 0:
      raise ValueError(f"random_crop_padding must be >= 0, got {self.random_crop_padding}")
    if not 0 <= self.rotation_degrees <= 180:
      raise ValueError(f"rotation_degrees must be in [0, 180], got {self.rotation_degrees}")
    if not 0 <= self.translation < 1:
      raise ValueError(
        f"translation must be in [0, 1) (a fraction of the image size), got {self.translation}"
      )
    if not 0 <= self.fill <= 1:
      raise ValueError(f"fill must be in [0, 1] (pixel units), got {self.fill}")

  @property
  def active(self) -> bool:
    """Whether any transformation is enabled."""
    return bool(self.random_crop_padding or self.horizontal_flip or self.affine)

  @property
  def affine(self) -> bool:
    """Whether the random rotation / translation is enabled."""
    return bool(self.rotation_degrees or self.translation)


def augment_batch(images: np.ndarray, *, augment: Augment, rng: np.random.Generator) -> np.ndarray:
  """Applies ``augment`` to a batch, independently per example.

  All enabled transformations are composed into one source-pixel map per example, then
  applied with a single gather (nearest-neighbour: no interpolation).

  Args:
    images: (B, H, W, C) array: floats in [0, 1] (as :func:`epoch_batches` passes them)
      or uint8 0..255 (``fill`` is then scaled by 255 and rounded).
    augment: what to apply.
    rng: the randomness source (consumed: the crop offsets and flips, then the angles and
      translations).

  Returns:
    A new (B, H, W, C) array of the same dtype; every value is an input value, 0 (crop
    padding) or ``fill`` (brought in by the rotation / translation), so the range is kept.
  """
  b, h, w, c = images.shape
  p = augment.random_crop_padding
  if not augment.active:
    return images.copy()
  # rows[k, i] and cols[k, j]: the source row of output row i and the source column of
  # output column j of example k after the crop and flip (separable), in the coordinates of
  # the (virtually) zero-padded image.
  rows = np.broadcast_to(np.arange(h) + p, (b, h))
  cols = np.broadcast_to(np.arange(w) + p, (b, w))
  if p or augment.horizontal_flip:
    dy = rng.integers(0, 2 * p + 1, size=b)
    dx = rng.integers(0, 2 * p + 1, size=b)
    rows = dy[:, None] + np.arange(h)  # (B, H)
    cols = dx[:, None] + np.arange(w)  # (B, W)
    if augment.horizontal_flip:
      flip = rng.random(b) < 0.5
      cols = np.where(flip[:, None], cols[:, ::-1], cols)
  k = np.arange(b)[:, None, None]
  filled = None
  if augment.affine:  # Compose: the warp reads the cropped / flipped image.
    src_y, src_x, filled = _affine_map(b, h, w, augment=augment, rng=rng)
    rows = np.take(rows, k * h + src_y)  # (B, H, W)
    cols = np.take(cols, k * w + src_x)
  else:
    rows, cols = rows[:, :, None], cols[:, None, :]
  rows, cols = rows - p, cols - p  # Back to image coordinates; outside = padding.
  flat = (k * h + np.clip(rows, 0, h - 1)) * w + np.clip(cols, 0, w - 1)
  flat = np.broadcast_to(flat, (b, h, w))
  out = np.take(images.reshape(b * h * w, c), flat.reshape(-1), axis=0).reshape(b, h, w, c)
  if p:
    out[np.broadcast_to((rows < 0) | (rows >= h) | (cols < 0) | (cols >= w), (b, h, w))] = 0
  if filled is not None:
    fill = augment.fill
    if np.issubdtype(images.dtype, np.integer):
      fill = np.rint(fill * 255)
    out[filled] = fill
  return out


def _affine_map(
  b: int, h: int, w: int, *, augment: Augment, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Source pixels of a random rotation about the centre, then an integer translation.

  A positive angle turns the picture counter-clockwise as displayed (rows downwards), a
  positive ``tx`` / ``ty`` moves it right / down, as in torchvision. Output pixel ``(i, j)``
  (centred coordinates ``u = j - (W-1)/2``, ``v = i - (H-1)/2``) takes the input pixel at
  the inverse map of ``(u, v)``, rounded to the nearest pixel (nearest-neighbour sampling,
  torchvision's default for ``RandomAffine``).

  Returns:
    ``(src_y, src_x, outside)``, each ``(B, H, W)``: source indices (clipped into the
    image) and where the source lies outside the image (to be filled).
  """
  angle = np.deg2rad(rng.uniform(-augment.rotation_degrees, augment.rotation_degrees, b))
  tx = np.rint(rng.uniform(-augment.translation * w, augment.translation * w, b))
  ty = np.rint(rng.uniform(-augment.translation * h, augment.translation * h, b))
  cy, cx = (h - 1) / 2, (w - 1) / 2
  v = (np.arange(h) - cy)[None, :, None] - ty[:, None, None]  # (B, H, 1)
  u = (np.arange(w) - cx)[None, None, :] - tx[:, None, None]  # (B, 1, W)
  cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
  src_x = np.rint(cos * u - sin * v + cx).astype(np.intp)
  src_y = np.rint(sin * u + cos * v + cy).astype(np.intp)
  outside = (src_x < 0) | (src_x >= w) | (src_y < 0) | (src_y >= h)
  return np.clip(src_y, 0, h - 1), np.clip(src_x, 0, w - 1), outside


def steps_per_epoch(num_examples: int, batch_size: int, drop_remainder: bool = True) -> int:
  """Number of batches :func:`epoch_batches` yields per epoch."""
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if drop_remainder:
    return num_examples // batch_size
  return -(-num_examples // batch_size)


# Distinguishes the augmentation random stream from the permutation one.
_AUGMENT_STREAM = 0xA06


def epoch_batches(
  images: np.ndarray,
  labels: np.ndarray,
  *,
  batch_size: int,
  seed: int,
  epoch: int,
  start_step: int = 0,
  shuffle: bool = True,
  drop_remainder: bool = True,
  augment: Augment | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields the batches of one epoch.

  The order is ``np.random.default_rng([seed, epoch]).permutation(N)``: it
  depends only on ``(seed, epoch)``, so training can resume at any epoch and,
  via ``start_step``, at any step within it. Augmentation of step ``s`` uses
  ``default_rng([seed, epoch, s, const])``, so it is resumable too.

  Args:
    images: uint8 (N, H, W, C), values 0..255.
    labels: (N,) integer labels.
    batch_size: examples per batch.
    seed: non-negative integer seed.
    epoch: non-negative epoch index.
    start_step: first step to yield (the earlier ones are skipped without
      being computed).
    shuffle: permute the examples (use False for evaluation).
    drop_remainder: drop the last partial batch; if False it is yielded,
      smaller (use False for evaluation).
    augment: optional augmentation (training only; an inactive one is the same as None).

  Yields:
    ``(x, y)``: float32 (B, H, W, C) in [0, 1] and int32 (B,).
  """
  n = len(images)
  if len(labels) != n:
    raise ValueError(f"{n} images but {len(labels)} labels")
  if seed < 0 or epoch < 0:
    raise ValueError(f"seed and epoch must be >= 0, got {seed}, {epoch}")
  steps = steps_per_epoch(n, batch_size, drop_remainder)
  if not 0 <= start_step <= steps:
    raise ValueError(f"start_step must be in [0, {steps}], got {start_step}")
  if shuffle:
    order = np.random.default_rng([seed, epoch]).permutation(n)
  else:
    order = np.arange(n)
  for step in range(start_step, steps):
    idx = order[step * batch_size : (step + 1) * batch_size]
    x = images[idx].astype(np.float32) / np.float32(255)
    if augment is not None and augment.active:
      rng = np.random.default_rng([seed, epoch, step, _AUGMENT_STREAM])
      x = augment_batch(x, augment=augment, rng=rng)
    yield x, np.asarray(labels[idx], np.int32)


# ---------------------------------------------------------------------------
# Prefetching
# ---------------------------------------------------------------------------


class _End:
  pass


@dataclasses.dataclass(frozen=True)
class _Raised:
  error: BaseException


def prefetch_to_device(
  iterator: Iterable[Any],
  *,
  size: int = 2,
  sharding: jax.sharding.Sharding | None = None,
) -> Iterator[Any]:
  """Moves batches to device in a background thread, ``size`` ahead.

  Each item (any pytree of arrays) is placed with
  ``jax.device_put(item, sharding)``; with ``sharding=None`` on the default
  device. An exception raised by ``iterator`` is re-raised by the consumer.
  Closing (or dropping) the returned generator stops the thread.

  Args:
    iterator: host batches.
    size: maximum number of batches buffered ahead (>= 1).
    sharding: where to place each batch, e.g. a ``NamedSharding`` that splits
      the batch axis across devices.

  Yields:
    The items of ``iterator`` as ``jax.Array`` pytrees, in order.
  """
  if size < 1:
    raise ValueError(f"size must be >= 1, got {size}")
  buffer: queue.Queue[Any] = queue.Queue(maxsize=size)
  stop = threading.Event()

  def put(item: Any) -> bool:
    while not stop.is_set():
      try:
        buffer.put(item, timeout=0.05)
        return True
      except queue.Full:
        pass
    return False

  def produce() -> None:
    try:
      for item in iterator:
        if not put(jax.device_put(item, sharding)):
          return
    except BaseException as e:  # pylint: disable=broad-except
      put(_Raised(e))
      return
    put(_End())

  thread = threading.Thread(target=produce, name="prefetch_to_device", daemon=True)
  thread.start()
  try:
    while True:
      item = buffer.get()
      if isinstance(item, _End):
        return
      if isinstance(item, _Raised):
        raise item.error
      yield item
  finally:
    stop.set()
    thread.join()
