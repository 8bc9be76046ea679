"""Tests for crmjax.input_pipeline: batching, augmentation, prefetching."""

import threading

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crmjax import input_pipeline

CIFAR_AUGMENT = input_pipeline.Augment(
  horizontal_flip=True, rotation_degrees=10.0, translation=0.1, fill=0.5
)


# --------------------------------------------------------------------------
# Batching and augmentation
# --------------------------------------------------------------------------


def _toy(n=23, shape=(6, 5, 2)):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
  # Encode the example index in pixel [0, 0, 0] and the label.
  images[:, 0, 0, 0] = np.arange(n)
  labels = np.arange(n, dtype=np.int64) % 7
  return images, labels


def _ids(batches):
  return [np.round(x[:, 0, 0, 0] * 255).astype(int) for x, _ in batches]


def test_steps_per_epoch():
  assert input_pipeline.steps_per_epoch(23, 5) == 4
  assert input_pipeline.steps_per_epoch(23, 5, drop_remainder=False) == 5
  assert input_pipeline.steps_per_epoch(20, 5, False) == 4
  with pytest.raises(ValueError):
    input_pipeline.steps_per_epoch(10, 0)


def test_epoch_batches_types_and_determinism():
  images, labels = _toy()
  kw = dict(batch_size=5, seed=3, epoch=2)
  a = list(input_pipeline.epoch_batches(images, labels, **kw))
  b = list(input_pipeline.epoch_batches(images, labels, **kw))
  assert len(a) == 4
  for (xa, ya), (xb, yb) in zip(a, b):
    assert xa.dtype == np.float32 and xa.shape == (5, 6, 5, 2)
    assert ya.dtype == np.int32 and ya.shape == (5,)
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
    assert 0.0 <= xa.min() and xa.max() <= 1.0
  # Values and labels stay paired with their example.
  for x, y in a:
    ids = np.round(x[:, 0, 0, 0] * 255).astype(int)
    np.testing.assert_array_equal(y, labels[ids])
    np.testing.assert_allclose(x, images[ids] / 255.0, rtol=1e-6)


def test_epochs_and_seeds_differ():
  images, labels = _toy()
  kw = dict(batch_size=5)
  e0 = _ids(input_pipeline.epoch_batches(images, labels, seed=0, epoch=0, **kw))
  e1 = _ids(input_pipeline.epoch_batches(images, labels, seed=0, epoch=1, **kw))
  s1 = _ids(input_pipeline.epoch_batches(images, labels, seed=1, epoch=0, **kw))
  assert not np.array_equal(np.concatenate(e0), np.concatenate(e1))
  assert not np.array_equal(np.concatenate(e0), np.concatenate(s1))
  # Epoch order only depends on (seed, epoch).
  expected = np.random.default_rng([0, 1]).permutation(23)[:20]
  np.testing.assert_array_equal(np.concatenate(e1), expected)


def test_start_step_resume_equals_slice():
  images, labels = _toy()
  augment = input_pipeline.Augment(random_crop_padding=2, horizontal_flip=True)
  kw = dict(batch_size=4, seed=7, epoch=5, augment=augment)
  full = list(input_pipeline.epoch_batches(images, labels, **kw))
  resumed = list(input_pipeline.epoch_batches(images, labels, start_step=3, **kw))
  assert len(resumed) == len(full) - 3
  for (xf, yf), (xr, yr) in zip(full[3:], resumed):
    np.testing.assert_array_equal(xf, xr)
    np.testing.assert_array_equal(yf, yr)
  assert list(input_pipeline.epoch_batches(images, labels, start_step=5, **kw)) == []
  with pytest.raises(ValueError):
    next(input_pipeline.epoch_batches(images, labels, start_step=6, **kw))


@pytest.mark.parametrize("shuffle", [True, False])
def test_every_example_once_per_epoch(shuffle):
  images, labels = _toy()
  batches = list(
    input_pipeline.epoch_batches(
      images,
      labels,
      batch_size=5,
      seed=0,
      epoch=0,
      shuffle=shuffle,
      drop_remainder=False,
    )
  )
  assert [len(y) for _, y in batches] == [5, 5, 5, 5, 3]
  ids = np.concatenate(_ids(batches))
  np.testing.assert_array_equal(np.sort(ids), np.arange(23))
  if not shuffle:
    np.testing.assert_array_equal(ids, np.arange(23))


def test_augment_flip_only():
  images, labels = _toy(n=40)
  kw = dict(batch_size=40, seed=0, epoch=0, shuffle=False)
  ((x, _),) = input_pipeline.epoch_batches(
    images, labels, augment=input_pipeline.Augment(horizontal_flip=True), **kw
  )
  ref = images / np.float32(255)
  same = np.all(x == ref, axis=(1, 2, 3))
  flipped = np.all(x == ref[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(same | flipped)
  assert same.any() and flipped.any()


def test_augment_crop_is_a_shifted_window_and_deterministic():
  images, labels = _toy(n=16)
  p = 2
  augment = input_pipeline.Augment(random_crop_padding=p, horizontal_flip=True)
  kw = dict(batch_size=8, seed=1, epoch=3, augment=augment)
  a = list(input_pipeline.epoch_batches(images, labels, **kw))
  b = list(input_pipeline.epoch_batches(images, labels, **kw))
  for (xa, _), (xb, _) in zip(a, b):
    np.testing.assert_array_equal(xa, xb)
    assert xa.dtype == np.float32 and 0.0 <= xa.min() and xa.max() <= 1.0
  order = np.random.default_rng([1, 3]).permutation(16)
  x = np.concatenate([x for x, _ in a])
  padded = np.pad(images[order], ((0, 0), (p, p), (p, p), (0, 0))) / 255.0
  h, w = images.shape[1:3]
  for i in range(len(x)):
    windows = [
      win
      for dy in range(2 * p + 1)
      for dx in range(2 * p + 1)
      for win in (padded[i, dy : dy + h, dx : dx + w], padded[i, dy : dy + h, dx : dx + w][:, ::-1])
    ]
    assert any(np.allclose(x[i], win) for win in windows)
  # Some example was actually shifted (i.e. has a padded zero border).
  assert not np.allclose(x, images[order] / 255.0)
  with pytest.raises(ValueError):
    input_pipeline.Augment(random_crop_padding=-1)


# --------------------------------------------------------------------------
# Prefetching
# --------------------------------------------------------------------------


def test_prefetch_to_device_same_values():
  images, labels = _toy()
  kw = dict(batch_size=4, seed=0, epoch=0)
  plain = list(input_pipeline.epoch_batches(images, labels, **kw))
  fetched = list(
    input_pipeline.prefetch_to_device(input_pipeline.epoch_batches(images, labels, **kw), size=2)
  )
  assert len(fetched) == len(plain)
  for (x, y), (fx, fy) in zip(plain, fetched):
    assert isinstance(fx, jax.Array) and isinstance(fy, jax.Array)
    np.testing.assert_array_equal(np.asarray(fx), x)
    np.testing.assert_array_equal(np.asarray(fy), y)


def test_prefetch_to_device_with_sharding():
  devices = np.array(jax.devices())
  mesh = jax.sharding.Mesh(devices, ("batch",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
  n = len(devices)
  batches = [(np.full((n, 3), i, np.float32), np.arange(n)) for i in range(3)]
  out = list(input_pipeline.prefetch_to_device(iter(batches), sharding=sharding))
  for (x, y), (fx, fy) in zip(batches, out):
    assert fx.sharding == sharding
    np.testing.assert_array_equal(np.asarray(fx), x)
    np.testing.assert_array_equal(np.asarray(fy), y)


def test_prefetch_to_device_reraises_source_exception():
  def source():
    yield np.zeros(2)
    yield np.ones(2)
    raise RuntimeError("boom in source")

  it = input_pipeline.prefetch_to_device(source(), size=1)
  np.testing.assert_array_equal(np.asarray(next(it)), np.zeros(2))
  np.testing.assert_array_equal(np.asarray(next(it)), np.ones(2))
  with pytest.raises(RuntimeError, match="boom in source"):
    next(it)


def test_prefetch_to_device_stops_cleanly_on_close():
  def endless():
    i = 0
    while True:
      yield np.full(2, i)
      i += 1

  it = input_pipeline.prefetch_to_device(endless(), size=2)
  assert int(np.asarray(next(it))[0]) == 0
  assert int(np.asarray(next(it))[0]) == 1
  it.close()
  assert not any(t.name == "prefetch_to_device" and t.is_alive() for t in threading.enumerate())
  with pytest.raises(ValueError):
    next(input_pipeline.prefetch_to_device(iter([]), size=0))


# --------------------------------------------------------------------------
# Random rotation and translation
# --------------------------------------------------------------------------


class _FixedAffine:
  """Stands in for the rng: every example gets this angle (degrees) and translation."""

  def __init__(self, degrees, tx, ty):
    self._draws = [degrees, tx, ty]

  def uniform(self, low, high, size):
    value = self._draws.pop(0)
    assert low <= value <= high
    return np.full(size, value, np.float64)


def _affine(images, degrees=0.0, tx=0.0, ty=0.0, fill=0.0):
  augment = input_pipeline.Augment(rotation_degrees=180.0, translation=0.99, fill=fill)
  return input_pipeline.augment_batch(images, augment=augment, rng=_FixedAffine(degrees, tx, ty))


def test_quarter_and_half_turns_are_exact_and_counter_clockwise():
  images = np.random.default_rng(0).random((3, 7, 7, 2)).astype(np.float32)
  np.testing.assert_array_equal(_affine(images, 90.0), np.rot90(images, 1, axes=(1, 2)))
  np.testing.assert_array_equal(_affine(images, -90.0), np.rot90(images, -1, axes=(1, 2)))
  np.testing.assert_array_equal(_affine(images, 180.0), images[:, ::-1, ::-1])
  np.testing.assert_array_equal(_affine(images, 0.0), images)


def test_translation_shifts_whole_pixels_and_fills_the_gap():
  images = np.random.default_rng(1).random((2, 6, 5, 3)).astype(np.float32)
  out = _affine(images, tx=2.0, ty=-1.0, fill=0.25)  # 2 right, 1 up.
  np.testing.assert_array_equal(out[:, :-1, 2:], images[:, 1:, :-2])
  assert np.all(out[:, :, :2] == 0.25) and np.all(out[:, -1] == 0.25)


@pytest.mark.parametrize("degrees", [10.0, -25.0, 63.0])
def test_a_bright_pixel_moves_along_the_rotation(degrees):
  # Independent of the implementation's formula: a single pixel at offset (dx, dy) from
  # the centre must land at that offset turned counter-clockwise (on screen, rows down).
  h = w = 33
  for dx, dy in [(10, 0), (0, -9), (7, 5)]:
    image = np.zeros((1, h, w, 1), np.float32)
    image[0, 16 + dy, 16 + dx, 0] = 1.0
    out = _affine(image, degrees)[0, ..., 0]
    t = np.deg2rad(degrees)
    ex, ey = dx * np.cos(t) + dy * np.sin(t), -dx * np.sin(t) + dy * np.cos(t)
    ys, xs = np.nonzero(out)
    assert len(ys) >= 1
    assert np.all(np.hypot(xs - 16 - ex, ys - 16 - ey) < 1.5), (degrees, dx, dy, xs, ys)


def test_augmented_batches_keep_shape_range_and_values_and_are_deterministic():
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
  images[:, 0, 0, 0] = np.arange(40)  # Never moved far: identifies the example.
  labels = np.arange(40) % 10
  kw = dict(batch_size=16, seed=5, epoch=3, augment=CIFAR_AUGMENT)
  a = list(input_pipeline.epoch_batches(images, labels, **kw))
  b = list(input_pipeline.epoch_batches(images, labels, **kw))
  order = np.random.default_rng([5, 3]).permutation(40)
  changed = 0
  for step, ((xa, ya), (xb, yb)) in enumerate(zip(a, b)):
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
    assert xa.shape == (16, 32, 32, 3) and xa.dtype == np.float32
    assert 0.0 <= xa.min() and xa.max() <= 1.0
    for i, k in enumerate(order[step * 16 : (step + 1) * 16]):
      original = images[k] / np.float32(255)
      assert ya[i] == labels[k]
      # Nearest-neighbour: every value is one of the image's own values or the fill.
      assert np.isin(xa[i], np.append(original.ravel(), np.float32(0.5))).all()
      changed += not np.array_equal(xa[i], original)
  assert changed >= 30  # Almost every example was moved, turned or flipped.
  resumed = list(input_pipeline.epoch_batches(images, labels, start_step=1, **kw))
  for (xf, _), (xr, _) in zip(a[1:], resumed):
    np.testing.assert_array_equal(xf, xr)
  other = list(input_pipeline.epoch_batches(images, labels, **{**kw, "epoch": 4}))
  assert not np.array_equal(a[0][0], other[0][0])


def test_angles_and_shifts_cover_the_configured_ranges():
  images = np.zeros((500, 61, 61, 1), np.float32)
  images[:, 30, 55] = 1.0  # One pixel, 25 to the right of the centre (30, 30).
  augment = input_pipeline.Augment(rotation_degrees=30.0, translation=0.0)
  out = input_pipeline.augment_batch(images, augment=augment, rng=np.random.default_rng(0))
  _, ys, xs = np.nonzero(out[..., 0])
  angles = np.rad2deg(np.arctan2(-(ys - 30), xs - 30))
  assert angles.min() < -27 and angles.max() > 27 and np.all(np.abs(angles) < 33)
  augment = input_pipeline.Augment(translation=0.05)
  out = input_pipeline.augment_batch(images, augment=augment, rng=np.random.default_rng(1))
  _, ys, xs = np.nonzero(out[..., 0])
  assert set(np.unique(xs - 55)) == {-3, -2, -1, 0, 1, 2, 3}  # round(U(-3.05, 3.05)).
  assert set(np.unique(ys - 30)) == {-3, -2, -1, 0, 1, 2, 3}


def test_uint8_images_get_the_fill_in_their_units():
  images = np.full((4, 8, 8, 3), 200, np.uint8)
  out = _affine(images, tx=3.0, fill=0.5)
  assert out.dtype == np.uint8
  assert np.all(out[:, :, :3] == 128) and np.all(out[:, :, 3:] == 200)


def test_no_recompilation_over_augmented_epochs():
  images = np.random.default_rng(3).integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)
  labels = np.arange(48) % 10

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(x, y):
    return jnp.sum(x) + jnp.sum(y)

  for epoch in range(3):
    for x, y in input_pipeline.prefetch_to_device(
      input_pipeline.epoch_batches(
        images, labels, batch_size=16, seed=0, epoch=epoch, augment=CIFAR_AUGMENT
      )
    ):
      step(x, y)


def test_augment_refuses_bad_settings():
  for kw, match in [
    ({"random_crop_padding": -1}, "random_crop_padding"),
    ({"rotation_degrees": -5.0}, "rotation_degrees"),
    ({"rotation_degrees": 200.0}, "rotation_degrees"),
    ({"translation": 1.0}, "translation"),
    ({"fill": 1.5}, "fill"),
  ]:
    with pytest.raises(ValueError, match=match):
      input_pipeline.Augment(**kw)
  assert not input_pipeline.Augment().active
  assert CIFAR_AUGMENT.active and CIFAR_AUGMENT.affine
