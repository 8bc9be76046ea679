"""Every evaluation reads the test split exactly as loaded, with training augmentation on.

A short MLP run on MNIST with random crops and flips, evaluated every epoch, then certified
by ``reports.certify_run`` (what ``python -m experiments.certify`` runs). Spies record what
each evaluation path receives:

* per epoch: the images the per-epoch evaluation's jitted model sees (a model whose
  ``apply`` reports its input through ``jax.debug.callback``) and the labels it scores;
* final: the images and labels of ``certify.evaluate`` and of the logits it computes;
* certify: the images of the report's logits;
* the augmentation: every batch it is given, which must all be training images.

Each is compared with ``data.load_split``'s test split, cut to the run's subset, bitwise.
"""

import dataclasses

import jax
import numpy as np

from crmjax import certify, data, input_pipeline, models, reports, train
from experiments.configs import certify as certify_config
from experiments.configs import mnist

TEST_SUBSET = 64


def _config():
  c = mnist.get_config("smoke")
  c.model = "MLP"
  c.train_subset, c.test_subset, c.batch_size, c.num_epochs = 128, TEST_SUBSET, 32, 2
  c.crm.warmup_epochs, c.train_iters, c.eval_iters, c.sound_iters = 1, 2, 5, 20
  c.checkpoint_every_steps, c.log_every_steps, c.progress_bar = 100, 2, False
  c.eval_every_epochs, c.epoch_eval_subset, c.eval_batch_size = 1, 0, 24  # 3 batches
  c.augment.crop_padding, c.augment.flip = 2, True
  return c


class _Recorder:
  """Lists of what the spies saw, by path."""

  def __init__(self):
    self.epoch_images, self.epoch_labels = [], []
    self.logits_images, self.final_args, self.augmented = [], [], []


def _spy(monkeypatch, rec: _Recorder) -> None:
  real_epoch_eval, real_logits = train.make_epoch_eval, certify.batched_logits
  real_evaluate, real_augment = certify.evaluate, input_pipeline.augment_batch

  def record_batch(x):
    rec.epoch_images[-1].append(np.array(x))

  class RecordingModel(models.Model):
    def apply(self, params, x):
      jax.debug.callback(record_batch, x)
      return super().apply(params, x)

  def make_epoch_eval(model, config, test_x, test_y):
    spy = RecordingModel(**{f.name: getattr(model, f.name) for f in dataclasses.fields(model)})
    inner = real_epoch_eval(spy, config, test_x, test_y)
    rec.epoch_labels.append(np.array(test_y))

    def evaluate(state, log_d=None):
      rec.epoch_images.append([])
      out = inner(state, log_d)
      jax.effects_barrier()
      return out

    return evaluate

  def batched_logits(model, params, images, **kw):
    rec.logits_images.append(np.array(images))
    return real_logits(model, params, images, **kw)

  def evaluate(model, params, power, images, labels, **kw):
    rec.final_args.append((np.array(images), np.array(labels)))
    return real_evaluate(model, params, power, images, labels, **kw)

  def augment_batch(images, **kw):
    rec.augmented.append(np.array(images))
    return real_augment(images, **kw)

  monkeypatch.setattr(train, "make_epoch_eval", make_epoch_eval)
  monkeypatch.setattr(certify, "batched_logits", batched_logits)
  monkeypatch.setattr(certify, "evaluate", evaluate)
  monkeypatch.setattr(input_pipeline, "augment_batch", augment_batch)


def _pixels(batches) -> np.ndarray:
  """Recorded [0, 1] float images back to uint8 (exact: k / 255 in float32 rounds back to k)."""
  x = np.concatenate(batches)
  assert x.dtype == np.float32
  pix = np.rint(x * 255.0)
  np.testing.assert_allclose(x, pix / 255.0, atol=1e-7)  # nothing but k / 255 values
  return pix.astype(np.uint8)


def test_every_evaluation_sees_the_raw_test_split_with_augmentation_on(tmp_path, monkeypatch):
  c = _config()
  raw_x, raw_y = data.load_split(c.dataset, "test", data_dir=c.data_dir or None)
  raw_x, raw_y = raw_x[:TEST_SUBSET], raw_y[:TEST_SUBSET]
  train_x, _ = data.load_split(c.dataset, "train", data_dir=c.data_dir or None)
  rec = _Recorder()
  _spy(monkeypatch, rec)
  workdir = str(tmp_path / "run")
  result = train.train_and_evaluate(c, workdir)
  assert result["step"] == 8

  # per epoch: both epochs, every test image once, in order, unaugmented
  assert len(rec.epoch_images) == 2 and len(rec.epoch_labels) == 1  # made once, run twice
  np.testing.assert_array_equal(rec.epoch_labels[0], raw_y)
  for seen in rec.epoch_images:
    assert [len(b) for b in seen] == [24, 24, 16]
    np.testing.assert_array_equal(_pixels(seen), raw_x)

  # final: certify.evaluate and the logits it certifies
  ((images, labels),) = rec.final_args
  assert images.dtype == np.uint8
  np.testing.assert_array_equal(images, raw_x)
  np.testing.assert_array_equal(labels, raw_y)
  (final_logits,) = rec.logits_images
  np.testing.assert_array_equal(final_logits, raw_x)

  # experiments.certify's report on the same run
  cc = certify_config.get_config("smoke")
  cc.test_subset, cc.pgd_subset, cc.pgd_batch_size, cc.pgd_steps = TEST_SUBSET, 16, 16, 2
  cc.eval_iters, cc.num_radii, cc.exact_max_dim, cc.key = 5, 10, 1024, 0
  cc.compare_power, cc.refine, cc.progress = False, False, False
  rec.logits_images.clear()
  reports.certify_run(cc, workdir)
  assert rec.logits_images, "the report computed no logits through certify.batched_logits"
  for images in rec.logits_images:
    np.testing.assert_array_equal(images, raw_x)

  # the augmentation ran, on training images only (none of the test split)
  n = len(rec.augmented)
  assert n == 8, f"augment_batch ran {n} times, not once per training step (8)"
  train_rows = {r.tobytes() for r in train_x[: c.train_subset]}
  test_rows = {r.tobytes() for r in raw_x}
  for batch in rec.augmented:
    rows = {r.tobytes() for r in _pixels([batch])}  # [0, 1] floats, as the pipeline feeds it
    assert rows <= train_rows and not rows & test_rows, "augment_batch got non-training images"
