"""CRM training: the resumable loop around the jit-compiled data-parallel train step.

``train_and_evaluate(config, workdir)`` is the main job: it trains with the loss named by
``config.loss`` (``crm``, ``ce`` or ``gloro``), checkpoints with Orbax, resumes from the
latest checkpoint when rerun with the same workdir, and ends with a test evaluation.

With ``config.rescaling.every_steps = N > 0`` the loop refreshes the rescaling ``D`` of the
loss's bound every N steps (``train_step.make_refresh``) and checkpoints its ``log D`` next to
the state. With ``config.bound_every_steps = N > 1`` it computes the bound on one step in N and
runs the ``stale`` step in between, checkpointing the reused bound. Both are the loop's
``carry``: a dict of the checkpoint's extra items.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from jax.sharding import NamedSharding

from crmjax import (
  certify,
  checkpoint,
  config_schema,
  data,
  input_pipeline,
  models,
  soundness,
  summary,
  train_state,
  train_step,
)

log = logging.getLogger(__name__)


class TrainingDiverged(FloatingPointError):
  """The loss became NaN or inf; the last good checkpoint is left untouched."""


# ------------------------------------------------------------------------ the loop


def _global_batches(it, sharding):
  """Host batches -> global arrays: prefetched to device (one process) or assembled."""
  if jax.process_count() == 1:
    return input_pipeline.prefetch_to_device(it, size=2, sharding=sharding)
  n, i = jax.process_count(), jax.process_index()

  def assemble():
    for x, y in it:
      b = len(x) // n
      yield tuple(
        jax.make_array_from_process_local_data(sharding, a[i * b : (i + 1) * b]) for a in (x, y)
      )

  return assemble()


def _load(config, split):
  """A split (validated by ``data.load_split``: dtype, shape, label range), cut to the subset."""
  images, labels = data.load_split(
    config.dataset,
    split,
    data_dir=config.data_dir or None,
    download=config.download,
    download_url=config.download_url or None,
  )
  limit = config.train_subset if split == "train" else config.test_subset
  if limit:
    images, labels = images[:limit], labels[:limit]
  return images, labels


def _meta(config, model, step, spe):
  return {
    "architecture": model.name,
    "dataset": config.dataset,
    "step": int(step),
    "epoch": int(step) // spe,
    "step_in_epoch": int(step) % spe,
    "config": json.loads(config.to_json_best_effort()),
  }


def make_epoch_eval(
  model: models.Model, config: ml_collections.ConfigDict, test_x, test_y
) -> Callable[[train_state.TrainState], dict]:
  """A cheap test evaluation for the per-epoch curves (``eval_every_epochs``).

  Clean accuracy and the certified accuracy at ``eps`` with the power-iteration ESTIMATE of
  the pairwise bound (``eval_iters`` warm-started iterations; not a certificate: the
  final evaluation certifies with the sound bound). Compiled once. With the training
  rescaling's ``log_d`` (``evaluate(state, log_d)``) the bound is the per-pair minimum of
  the plain bound and that of the rescaled network, as in the final evaluation.
  """
  if config.epoch_eval_subset:
    test_x, test_y = test_x[: config.epoch_eval_subset], test_y[: config.epoch_eval_subset]

  @jax.jit
  def epoch_bound(params, power, log_d):
    def bound(scales):
      return train_step.pairwise_bound(
        model,
        params,
        power,
        method=config.bound,
        mode="pairwise",
        num_iters=config.eval_iters,
        scales=scales,
      )[0]

    lip = bound(None)
    return lip if log_d is None else jnp.minimum(lip, bound([jnp.exp(l) for l in log_d]))

  @jax.jit
  def epoch_logits(params, images):
    if images.dtype == jnp.uint8:  # pixel space [0, 1], as the input pipeline feeds it
      images = images.astype(jnp.float32) / 255.0
    return model.apply(params, images)

  def evaluate(state: train_state.TrainState, log_d=None) -> dict:
    size, params = config.eval_batch_size, train_state.eval_params(state)
    logits = np.concatenate(
      [np.asarray(epoch_logits(params, test_x[i : i + size])) for i in range(0, len(test_x), size)]
    )
    lip = np.asarray(epoch_bound(params, state.power, log_d))
    radii = certify.radii_of(logits, test_y, lip)
    return {
      "test/clean_accuracy": float((logits.argmax(1) == test_y).mean()),
      "test/certified_accuracy_estimate": certify.certified_accuracy(radii, config.eps),
      "test/mean_pairwise_lipschitz_estimate": certify.mean_pairwise(lip),
    }

  return evaluate


def _refresh_scalars(info: dict) -> dict:
  """TensorBoard scalars of one rescaling refresh: the chosen objective and its candidates
  (previous, AOL, ``D = I``: the plain bound, optimised)."""
  values = np.asarray(jax.device_get(info["candidates"]), np.float64)
  names = ("previous", "aol", "plain", "optimized")
  return {
    "rescaling/objective": float(jax.device_get(info["objective"])),
    "rescaling/chosen": float(jax.device_get(info["chosen"])),
    **{f"rescaling/{n}": float(v) for n, v in zip(names, values)},
  }


def _finite_or_raise(metrics: dict, step: int, ckpt: checkpoint.Checkpointer):
  bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
  if bad:
    last = ckpt.latest_step()
    where = (
      f"the last good checkpoint is step {last} in {ckpt.directory} (left untouched)"
      if last is not None
      else "no checkpoint was written yet"
    )
    raise TrainingDiverged(
      f"training diverged by step {step}: {bad}; {where}. Lower --config.learning_rate or "
      "--config.crm.lam, then rerun the same command to resume from that checkpoint."
    )


@dataclasses.dataclass(frozen=True)
class _Job:
  """What the loop reads, built once from the config (``_make_job``).

  Attributes:
    config: the training config.
    model: the classifier.
    train, test: ``(images, labels)`` of each split, cut to the configured subset.
    steps_per_epoch, total: steps per epoch and of the whole run.
    warm_epochs: cross-entropy epochs before the regularised loss (CRM's warm-up).
    tx: the optimizer.
    replicated, batch_sharding: the data-parallel shardings.
    steps: the jitted train step, by whether it is regularised.
    stale_step: the jitted step that reuses the bound (``None``: the bound every step).
    refresh: the jitted rescaling refresh (``None``: the rescaling is off).
    augment: the host-side augmentation.
    schedule_values: ``step -> {name: rate}`` of the logged schedules.
  """

  config: ml_collections.ConfigDict
  model: models.Model
  train: tuple[np.ndarray, np.ndarray]
  test: tuple[np.ndarray, np.ndarray]
  steps_per_epoch: int
  total: int
  warm_epochs: int
  tx: optax.GradientTransformation
  replicated: NamedSharding
  batch_sharding: NamedSharding
  steps: dict[bool, Callable]
  stale_step: Callable | None
  refresh: Callable | None
  augment: input_pipeline.Augment
  schedule_values: Callable[[int], dict[str, float]]

  @property
  def regular(self) -> bool:
    """Whether the loss uses the bound after the warm-up (``crm`` and ``gloro``)."""
    return self.config.loss != "ce"


def _make_job(config: ml_collections.ConfigDict) -> _Job:
  """Loads the data and builds the model, optimizer, shardings and compiled functions."""
  model = train_state.make_model(config)
  train_x, train_y = _load(config, "train")
  spe = input_pipeline.steps_per_epoch(len(train_x), config.batch_size, True)
  if spe == 0:
    raise ValueError(
      f"--config.batch_size={config.batch_size} exceeds the {len(train_x)} "
      "training examples: lower it"
    )
  total = spe * config.num_epochs
  tx = train_state.make_optimizer(config, total, steps_per_epoch=spe)
  replicated, batch_sharding = train_state.make_mesh()
  regular, refresh_every = config.loss != "ce", config.rescaling.every_steps
  warm_epochs = config.crm.warmup_epochs if config.loss == "crm" else 0
  steps = {
    reg: train_step.jit_step(
      train_step.make_train_step(model, tx, config, regularized=reg, steps_per_epoch=spe),
      replicated,
      batch_sharding,
      extra=reg and refresh_every > 0,
    )
    for reg in {False, regular}
  }
  stale_step = None
  if regular and config.bound_every_steps > 1:
    stale_step = train_step.jit_step(
      train_step.make_train_step(
        model, tx, config, regularized=True, steps_per_epoch=spe, stale=True
      ),
      replicated,
      batch_sharding,
      extra=True,
    )
  refresh = (
    train_step.jit_refresh(train_step.make_refresh(model, config), replicated)
    if refresh_every
    else None
  )
  a = config.augment
  return _Job(
    config=config,
    model=model,
    train=(train_x, train_y),
    test=_load(config, "test"),
    steps_per_epoch=spe,
    total=total,
    warm_epochs=warm_epochs,
    schedule_values=_schedule_values(config, total, spe, warm_epochs),
    tx=tx,
    replicated=replicated,
    batch_sharding=batch_sharding,
    steps=steps,
    stale_step=stale_step,
    refresh=refresh,
    augment=input_pipeline.Augment(
      random_crop_padding=a.crop_padding,
      horizontal_flip=a.flip,
      rotation_degrees=a.rotation_degrees,
      translation=a.translation,
      fill=a.fill,
    ),
  )


def _restore_or_create(job: _Job, ckpt: checkpoint.Checkpointer):
  """``(state, carry)``: from the latest checkpoint, else fresh (``carry``: the refreshed
  rescaling's ``log D`` and the reused bound, where they are on and stored)."""
  config, model = job.config, job.model
  latest = ckpt.latest_step()
  if latest is None:
    state = train_state.create_state(model, job.tx, config.seed, init=config.init)
    state = jax.device_put(state, job.replicated)
  else:  # restored into the abstract state: no fresh initialisation to throw away
    state, meta = ckpt.restore(
      train_state.abstract_state(model, job.tx, config.seed, job.replicated),
      step=latest,
      expected_meta={"architecture": model.name, "dataset": config.dataset},
    )
    log.info(
      "resumed from step %d (epoch %d) in %s", int(state.step), meta["epoch"], ckpt.directory
    )
  carry = {}
  if job.stale_step is not None and latest is not None:  # else: computed at the next step
    K = model.num_classes
    target = {"value": jax.device_put(jnp.zeros((K, K), jnp.float32), job.replicated)}
    stored = ckpt.restore_extra("pairwise_bound", target, step=latest)
    if stored is not None:
      carry["pairwise_bound"] = stored
  if job.refresh is None:
    return state, carry
  # log D lives outside TrainState (its own checkpoint item).
  log_d = jax.device_put(train_step.initial_log_scales(model, state.params), job.replicated)
  if latest is not None:
    stored = ckpt.restore_extra("rescaling", log_d, step=latest)
    if stored is None:  # written with the rescaling off (or before it existed)
      log.info("checkpoint holds no rescaling D: D = I until the next refresh")
    else:
      log_d = stored
  return state, carry | {"rescaling": log_d}


class _RunningMean:
  """The mean of per-step metrics: summed on device (no host sync per step) and counted."""

  def __init__(self):
    self.sums, self.count = None, 0

  def add(self, metrics: dict) -> None:
    self.sums = metrics if self.sums is None else jax.tree.map(jnp.add, self.sums, metrics)
    self.count += 1

  def mean(self) -> dict[str, float]:
    sums = jax.device_get(self.sums or {})
    return {k: float(v) / max(self.count, 1) for k, v in sums.items()}


def _schedule_values(
  config: ml_collections.ConfigDict, total: int, spe: int, warm_epochs: int
) -> Callable[[int], dict[str, float]]:
  """``step -> {'learning_rate': ..., 'lambda': ...}``: the rates a step trained with (lambda
  for the CRM loss only), for the logs."""
  lr_fn = train_state.learning_rate_schedule(config, total, steps_per_epoch=spe)
  lam_fn = train_step.penalty_schedules(config, spe)[0] if config.loss == "crm" else None

  def values(step: int) -> dict[str, float]:
    out = {"learning_rate": float(lr_fn(step))}
    if lam_fn is not None:
      out["lambda"] = float(lam_fn(step)) if step // spe >= warm_epochs else 0.0
    return out

  return values


def _log_window(job, window: _RunningMean, step: int, ckpt, writer, bar) -> None:
  """Logs the metrics averaged since the last log (raising if one is not finite)."""
  avg = window.mean()
  _finite_or_raise(avg, step, ckpt)
  schedules = job.schedule_values(step - 1)
  writer.scalars(step, {f"train/{k}": v for k, v in (avg | schedules).items()})
  bar.set_postfix({k: f"{avg[k]:.4g}" for k in ("loss", "accuracy", "radius") if k in avg})


def _bound_step(job: _Job, step_fn, state, x, y, carry: dict, *, reuse: bool, rescaled: bool):
  """One regularised step: the ``stale`` one on the reused bound when ``reuse`` and one is
  held, else ``step_fn``, whose computed bound (``bound_every_steps > 1``) joins ``carry``."""
  if reuse and "pairwise_bound" in carry:
    return job.stale_step(state, x, y, carry["pairwise_bound"]["value"])
  state, m = step_fn(state, x, y, *((carry["rescaling"],) if rescaled else ()))
  if "pairwise_bound" in m:  # a dict: Orbax's StandardSave takes no bare array
    carry["pairwise_bound"] = {"value": m.pop("pairwise_bound")}
  return state, m


def train_epoch(job: _Job, state, carry: dict, step: int, *, ckpt, writer, stop_at: int):
  """Trains from ``step`` to the end of its epoch (or ``stop_at``), checkpointing as
  configured; returns ``(state, carry, step, record)`` (``record``: the epoch's means;
  ``carry``: the checkpoint's extra items, updated in place)."""
  config, spe = job.config, job.steps_per_epoch
  steps, regular, warm_epochs = job.steps, job.regular, job.warm_epochs
  epoch, start = divmod(step, spe)
  bounded = regular and epoch >= warm_epochs  # the loss uses the bound
  step_fn = steps[bounded]
  rescaled = job.refresh is not None and bounded  # takes log_d
  first_bound_step = warm_epochs * spe
  refresh_every = config.rescaling.every_steps
  bound_every = config.bound_every_steps if job.stale_step is not None and bounded else 1
  batches = input_pipeline.epoch_batches(
    *job.train,
    batch_size=config.batch_size,
    seed=config.seed,
    epoch=epoch,
    start_step=start,
    augment=job.augment,
  )
  t0, epoch_mean, window = time.time(), _RunningMean(), _RunningMean()
  bar = tqdm.tqdm(
    total=spe,
    initial=start,
    desc=f"epoch {epoch + 1}/{config.num_epochs}",
    file=sys.stdout,
    dynamic_ncols=True,
    mininterval=1.0,
    disable=not config.progress_bar,
  )
  for x, y in _global_batches(batches, job.batch_sharding):
    if train_step.refreshes_at(step, every=refresh_every, first=first_bound_step):
      carry["rescaling"], power, info = job.refresh(state.params, state.power, carry["rescaling"])
      state = state.replace(power=power)
      writer.scalars(step, _refresh_scalars(info))
    if bounded:
      due = train_step.refreshes_at(step, every=bound_every, first=first_bound_step)
      state, m = _bound_step(job, step_fn, state, x, y, carry, reuse=not due, rescaled=rescaled)
    else:
      state, m = step_fn(state, x, y)
    epoch_mean.add(m)
    window.add(m)
    step += 1
    bar.update(1)
    last_of_epoch, checkpoint_due = step % spe == 0, step % config.checkpoint_every_steps == 0
    if epoch_mean.count % config.log_every_steps == 0 or last_of_epoch or checkpoint_due:
      _log_window(job, window, step, ckpt, writer, bar)
      window = _RunningMean()
    if checkpoint_due or last_of_epoch or step == stop_at:
      ckpt.save(step, state, _meta(config, job.model, step, spe), extra=carry or None)
    if step == stop_at:
      break
  bar.close()
  record = {"epoch": epoch + 1, "step": step, "epoch_time_s": time.time() - t0}
  record |= {f"train/{k}": v for k, v in epoch_mean.mean().items()}
  return state, carry, step, record


def log_epoch(writer: summary.MetricWriter, record: dict) -> None:
  """Writes an epoch's record to ``metrics.jsonl``, TensorBoard (``epoch/...``) and the log."""
  writer.record(record)
  writer.scalars(
    record["step"],
    {
      f"epoch/{k.split('/', 1)[-1]}" if k.startswith("train/") else k: v
      for k, v in record.items()
      if k not in ("epoch", "step")
    },
  )
  writer.flush()
  log.info(
    " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
  )


def final_evaluation(job: _Job, state, step: int, workdir: str, writer, log_d=None) -> dict:
  """The end-of-training test evaluation (``certify.evaluate``), written to ``results.json``,
  ``metrics.jsonl`` and TensorBoard (``final/...``). ``log_d``: the training rescaling's
  ``log D`` (``--config.rescaling.every_steps``), whose bound then certifies where it is
  smaller than the plain bound."""
  config = job.config
  sound = soundness.SoundSettings(iterations=config.sound_iters) if config.sound_eval else None
  result = certify.evaluate(
    job.model,
    train_state.eval_params(state),
    state.power,
    *job.test,
    eps=config.eps,
    batch_size=config.eval_batch_size,
    eval_iters=config.eval_iters,
    method=config.bound,
    sound=sound,
    extra_eps=tuple(config.report_eps),
    scales=None if log_d is None else [np.exp(np.asarray(l)) for l in log_d],
  )
  result.update({"step": step, "model": job.model.name, "dataset": config.dataset})
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(result, f, indent=2)
  writer.record({"final": result})
  writer.scalars(
    step,
    {
      f"final/{k}": v
      for k, v in result.items()
      if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
    },
  )
  return result


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from ``workdir`` if it holds checkpoints), then evaluates.

  Writes ``metrics.jsonl`` (one line per epoch and a final line), ``results.json`` and
  ``checkpoints/`` under ``workdir``.

  Returns:
    The final evaluation metrics.
  """
  if config.distributed:
    jax.distributed.initialize(
      config.coordinator_address or None,
      config.num_processes or None,
      None if config.process_id < 0 else config.process_id,
    )
  config_schema.validate_config(config, num_devices=jax.device_count())
  workdir = checkpoint.check_writable(workdir)
  job = _make_job(config)
  with (
    checkpoint.Checkpointer(
      os.path.join(workdir, "checkpoints"), max_to_keep=config.max_checkpoints
    ) as ckpt,
    summary.MetricWriter(workdir, tensorboard=config.tensorboard) as writer,
  ):
    state, carry = _restore_or_create(job, ckpt)
    step = int(state.step)
    stop_at = step + config.stop_after_steps if config.stop_after_steps else job.total
    epoch_eval, every = None, config.eval_every_epochs
    try:
      for epoch in range(step // job.steps_per_epoch, config.num_epochs):
        state, carry, step, record = train_epoch(
          job, state, carry, step, ckpt=ckpt, writer=writer, stop_at=stop_at
        )
        if every and step % job.steps_per_epoch == 0 and (epoch + 1) % every == 0:
          if epoch_eval is None:
            epoch_eval = make_epoch_eval(job.model, config, *job.test)
          record.update(epoch_eval(state, carry.get("rescaling")))
        log_epoch(writer, record)
        if step == stop_at:
          break
    finally:
      ckpt.wait()
    if step < job.total:
      log.info(
        "stopped at step %d of %d (--config.stop_after_steps); rerun the same command to continue",
        step,
        job.total,
      )
      return {"step": step, "stopped": True}
    return final_evaluation(job, state, step, workdir, writer, carry.get("rescaling"))
