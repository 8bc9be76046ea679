"""CRM training: one jit-compiled data-parallel step and the resumable loop.

``train_and_evaluate(config, workdir)`` is the main job: it trains with the loss named by
``config.loss`` (``crm``, ``ce`` or ``gloro``), checkpoints with Orbax, resumes from the
latest checkpoint when rerun with the same workdir, and ends with a test evaluation.

With ``config.rescaling.every_steps = N > 0`` the loss's bound is LipLT (eq. 19) of the
rescaled network ``rescaling.rescale(net, D)``, with positive diagonal scales ``D`` (one per
neuron; any ``D > 0`` keeps the bound valid, paper Theorem 3.2's refinement) re-optimised
every N steps by ``refinement.refresh_scales`` and fixed in between (``make_refresh``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence

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
  liplt,
  losses,
  models,
  refinement,
  rescaling,
  soundness,
  summary,
  train_state,
)

log = logging.getLogger(__name__)


class TrainingDiverged(FloatingPointError):
  """The loss became NaN or inf; the last good checkpoint is left untouched."""


# ---------------------------------------------------------------------- schedules


def penalty_schedules(
  config: ml_collections.ConfigDict, steps_per_epoch: int
) -> tuple[optax.Schedule, optax.Schedule]:
  """``lambda(step)`` (0 before the warm-up ends, then constant or a linear ramp) and ``r0(step)``
  (``crm.r0_start`` through the warm-up, then linear to ``crm.r0`` over the ramp; ``crm.r0``
  throughout when ``crm.r0_start`` is None)."""
  start = config.crm.warmup_epochs * steps_per_epoch
  ramp = max(config.crm.ramp_epochs * steps_per_epoch, 1)
  r0_start = config.crm.r0_start
  r0_start = config.crm.r0 if r0_start is None else r0_start
  if config.crm.ramp_epochs:
    lam = optax.linear_schedule(0.0, config.crm.lam, ramp)
    r0 = optax.linear_schedule(r0_start, config.crm.r0, ramp)
  else:
    lam, r0 = optax.constant_schedule(config.crm.lam), optax.constant_schedule(config.crm.r0)
  lam = optax.join_schedules([optax.constant_schedule(0.0), lam], [start])
  r0 = optax.join_schedules([optax.constant_schedule(r0_start), r0], [start])
  return lam, r0


def pairwise_bound(
  model: models.Model,
  params,
  power: liplt.PowerState,
  *,
  method: str,
  mode: str,
  num_iters: int,
  scales: Sequence[jax.Array] | None = None,
) -> tuple[jax.Array, liplt.PowerState]:
  """The ``(K, K)`` pairwise Lipschitz matrix of the model's logits (any bound mode).

  ``scales``: positive diagonal rescalings ``D`` (one array per block, its ``phi_shape``):
  the bound is then that of ``rescaling.rescale(net, D)``, a valid bound of the model for
  every ``D > 0`` (Theorem 3.3 of the rescaled network); no gradient reaches ``D``.
  """
  net = model.lipnet(params)
  if scales is not None:
    net = rescaling.rescale(net, [jax.lax.stop_gradient(d) for d in scales])
  bound, power = liplt.lipschitz_bound(net, power, method=method, mode=mode, num_iters=num_iters)
  return liplt.as_pairwise(bound, mode=mode, num_classes=model.num_classes), power


# ------------------------------------------------------------ the refreshed rescaling


def initial_log_scales(model: models.Model, params) -> list[jax.Array]:
  """``log D = 0`` (``D = I``: the plain bound) per block: the rescaling before the first
  refresh (which starts from the better of it and AOL, ``refinement.refresh_scales``)."""
  return refinement.unit_log_scales(model.lipnet(params))


def make_refresh(model: models.Model, config: ml_collections.ConfigDict) -> Callable:
  """The pure refresh ``(params, power, log_d) -> (log_d, power, info)`` of the rescaling.

  ``refinement.refresh_scales`` of ``model.lipnet(params)`` with the ``config.rescaling``
  settings and the training ``bound_mode`` as objective: ``steps`` Adam steps on ``log D``
  warm-started from the current ``log_d`` and the training ``PowerState``; returns the new
  ``log D`` (same tree and dtypes: the train step does not recompile) and the power state
  converged for it, which the following train steps continue from.
  """
  r = config.rescaling
  settings = {k: r[k] for k in ("learning_rate", "steps", "warmup_iters", "final_iters")}

  def refresh_scales(params, power, log_d):
    net = model.lipnet(params)
    return refinement.refresh_scales(
      net, log_d, power, mode=config.bound_mode, num_iters=r.step_iters, **settings
    )

  return refresh_scales


def jit_refresh(refresh_fn: Callable, replicated: NamedSharding) -> Callable:
  return jax.jit(refresh_fn, in_shardings=replicated, out_shardings=replicated)


def refreshes_at(step: int, *, every: int, first: int) -> bool:
  """Whether ``D`` is refreshed before ``step``: every ``every`` steps from ``first``, the
  first step whose loss uses the bound (after the CRM warm-up)."""
  return every > 0 and step >= first and (step - first) % every == 0


# ------------------------------------------------------------------------ the step


def make_train_step(
  model: models.Model,
  tx: optax.GradientTransformation,
  config: ml_collections.ConfigDict,
  *,
  regularized: bool,
  steps_per_epoch: int,
) -> Callable:
  """The pure train step ``(state, images, labels) -> (state, metrics)``.

  ``regularized=False`` is plain cross-entropy (the CRM warm-up, and the ``ce`` loss);
  otherwise the configured CRM or GloRo loss with the configured bound, whose power
  iteration advances ``config.train_iters`` warm-started steps. Regularised with
  ``config.rescaling.every_steps > 0``, the step is ``(state, images, labels, log_d) ->
  (state, metrics)``: the bound is that of ``rescale(net, exp(log_d))``, ``log_d`` fixed
  (no gradient; ``make_refresh`` updates it).
  """
  lam_fn, r0_fn = penalty_schedules(config, steps_per_epoch)

  def loss_fn(params, power, images, labels, step, log_d=None):
    logits = model.apply(params, images)
    if not regularized:
      correct = jnp.mean(jnp.argmax(logits, axis=1) == labels)
      ce = losses.cross_entropy(logits, labels)
      return ce, ({"ce": ce, "accuracy": correct}, power)
    lip, power = pairwise_bound(
      model,
      params,
      power,
      method=config.bound,
      mode=config.bound_mode,
      num_iters=config.train_iters,
      scales=None if log_d is None else [jnp.exp(l) for l in log_d],
    )
    if config.loss == "gloro":
      loss, aux = losses.gloro_loss(logits, labels, lip, eps=config.eps)
    else:
      loss, aux = losses.crm_loss(
        logits,
        labels,
        lip,
        lam=lam_fn(step),
        temperature=config.crm.temperature,
        r0=r0_fn(step),
        penalty=losses.PENALTIES[config.crm.penalty],
        normalize=config.crm.normalize,
      )
    K = lip.shape[0]
    aux["lip"] = jnp.sum(lip) / (K * (K - 1))
    return loss, (aux, power)

  def update(state: train_state.TrainState, images, labels, log_d):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (aux, power)), grads = grad_fn(
      state.params, state.power, images, labels, state.step, log_d
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, power=power)
    return new, {"loss": loss, **aux}

  if regularized and config.rescaling.every_steps:

    def train_step(state: train_state.TrainState, images, labels, log_d):
      return update(state, images, labels, log_d)

  else:

    def train_step(state: train_state.TrainState, images, labels):
      return update(state, images, labels, None)

  return train_step


def jit_step(
  step_fn: Callable, replicated: NamedSharding, batch: NamedSharding, *, rescaled: bool = False
) -> Callable:
  """``step_fn`` jitted; ``rescaled``: it takes the replicated ``log_d`` as a 4th argument."""
  return jax.jit(
    step_fn,
    in_shardings=(replicated, batch, batch) + ((replicated,) if rescaled else ()),
    out_shardings=(replicated, replicated),
    donate_argnums=(0,),
  )


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
  final evaluation certifies with the sound bound). Compiled once.
  """
  if config.epoch_eval_subset:
    test_x, test_y = test_x[: config.epoch_eval_subset], test_y[: config.epoch_eval_subset]

  @jax.jit
  def epoch_bound(params, power):
    return pairwise_bound(
      model, params, power, method=config.bound, mode="pairwise", num_iters=config.eval_iters
    )[0]

  @jax.jit
  def epoch_logits(params, images):
    if images.dtype == jnp.uint8:  # pixel space [0, 1], as the input pipeline feeds it
      images = images.astype(jnp.float32) / 255.0
    return model.apply(params, images)

  def evaluate(state: train_state.TrainState) -> dict:
    size = config.eval_batch_size
    logits = np.concatenate(
      [
        np.asarray(epoch_logits(state.params, test_x[i : i + size]))
        for i in range(0, len(test_x), size)
      ]
    )
    lip = np.asarray(epoch_bound(state.params, state.power))
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from ``workdir`` if it holds checkpoints), then evaluates.

  Writes ``metrics.jsonl`` (one line per epoch and a final line), ``results.json`` and
  ``checkpoints/`` under ``workdir``.

  Returns:
    The final evaluation metrics.
  """
  if config.distributed:
    jax.distributed.initialize()
  config_schema.validate_config(config, num_devices=jax.device_count())
  workdir = checkpoint.check_writable(workdir)
  model = train_state.make_model(config)
  train_x, train_y = _load(config, "train")
  test_x, test_y = _load(config, "test")
  spe = input_pipeline.steps_per_epoch(len(train_x), config.batch_size, True)
  if spe == 0:
    raise ValueError(
      f"--config.batch_size={config.batch_size} exceeds the {len(train_x)} "
      "training examples: lower it"
    )
  total = spe * config.num_epochs
  warm_epochs = config.crm.warmup_epochs if config.loss == "crm" else 0
  tx = train_state.make_optimizer(config, total, steps_per_epoch=spe)
  replicated, batch_sharding = train_state.make_mesh()

  regular = config.loss != "ce"
  refresh_every = config.rescaling.every_steps
  steps = {
    reg: jit_step(
      make_train_step(model, tx, config, regularized=reg, steps_per_epoch=spe),
      replicated,
      batch_sharding,
      rescaled=reg and refresh_every > 0,
    )
    for reg in {False, regular}
  }
  # The refreshed rescaling (off: refresh_every = 0): log D, outside train_state.TrainState (its own
  # checkpoint item), refreshed every `refresh_every` steps from the first step using the bound.
  log_d, refresh, first_bound_step = None, None, warm_epochs * spe
  if refresh_every:
    refresh = jit_refresh(make_refresh(model, config), replicated)
  augment = input_pipeline.Augment(
    random_crop_padding=config.augment.crop_padding,
    horizontal_flip=config.augment.flip,
    rotation_degrees=config.augment.rotation_degrees,
    translation=config.augment.translation,
    fill=config.augment.fill,
  )
  lr_fn = train_state.learning_rate_schedule(config, total, steps_per_epoch=spe)
  lam_fn = penalty_schedules(config, spe)[0] if config.loss == "crm" else None

  def schedules(step: int) -> dict:
    values = {"learning_rate": float(lr_fn(step))}
    if lam_fn is not None:
      values["lambda"] = float(lam_fn(step)) if step // spe >= warm_epochs else 0.0
    return values

  with (
    checkpoint.Checkpointer(
      os.path.join(workdir, "checkpoints"), max_to_keep=config.max_checkpoints
    ) as ckpt,
    summary.MetricWriter(workdir, tensorboard=config.tensorboard) as writer,
  ):
    latest = ckpt.latest_step()
    if latest is None:
      state = jax.device_put(
        train_state.create_state(model, tx, config.seed, init=config.init), replicated
      )
    else:  # restored into the abstract state: no fresh initialisation to throw away
      state, meta = ckpt.restore(
        train_state.abstract_state(model, tx, config.seed, replicated),
        step=latest,
        expected_meta={"architecture": model.name, "dataset": config.dataset},
      )
      log.info(
        "resumed from step %d (epoch %d) in %s", int(state.step), meta["epoch"], ckpt.directory
      )
    if refresh_every:
      log_d = jax.device_put(initial_log_scales(model, state.params), replicated)
    if latest is not None and refresh_every:
      stored = ckpt.restore_extra("rescaling", log_d, step=latest)
      if stored is None:  # written with the rescaling off (or before it existed)
        log.info("checkpoint holds no rescaling D: D = I until the next refresh")
      else:
        log_d = stored

    epoch_eval = None
    step = int(state.step)
    stop_at = step + config.stop_after_steps if config.stop_after_steps else total
    try:
      while step < min(total, stop_at):
        epoch, start = divmod(step, spe)
        step_fn = steps[regular and epoch >= warm_epochs]
        batches = input_pipeline.epoch_batches(
          train_x,
          train_y,
          batch_size=config.batch_size,
          seed=config.seed,
          epoch=epoch,
          start_step=start,
          augment=augment,
        )
        t0, sums, count, window, wcount = time.time(), None, 0, None, 0
        bar = tqdm.tqdm(
          total=spe,
          initial=start,
          desc=f"epoch {epoch + 1}/{config.num_epochs}",
          file=sys.stdout,
          dynamic_ncols=True,
          mininterval=1.0,
          disable=not config.progress_bar,
        )
        rescaled = refresh_every > 0 and regular and epoch >= warm_epochs  # takes log_d
        for x, y in _global_batches(batches, batch_sharding):
          if refreshes_at(step, every=refresh_every, first=first_bound_step):
            log_d, power, info = refresh(state.params, state.power, log_d)
            state = state.replace(power=power)
            writer.scalars(step, _refresh_scalars(info))
          state, m = step_fn(state, x, y, *((log_d,) if rescaled else ()))
          sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
          window = m if window is None else jax.tree.map(jnp.add, window, m)
          count, wcount, step = count + 1, wcount + 1, step + 1
          bar.update(1)
          last_of_epoch = step % spe == 0
          if (
            count % config.log_every_steps == 0
            or last_of_epoch
            or step % config.checkpoint_every_steps == 0
          ):
            avg = {k: float(v) / wcount for k, v in jax.device_get(window).items()}
            _finite_or_raise(avg, step, ckpt)
            writer.scalars(
              step,
              {
                **{f"train/{k}": v for k, v in avg.items()},
                **{f"train/{k}": v for k, v in schedules(step - 1).items()},
              },
            )
            window, wcount = None, 0
            bar.set_postfix(
              {k: f"{avg[k]:.4g}" for k in ("loss", "accuracy", "radius") if k in avg}
            )
          if step % config.checkpoint_every_steps == 0 or last_of_epoch or step == stop_at:
            extra = {"rescaling": log_d} if refresh_every else None
            ckpt.save(step, state, _meta(config, model, step, spe), extra=extra)
          if step == stop_at:
            break
        bar.close()
        record = {
          "epoch": epoch + 1,
          "step": step,
          "epoch_time_s": time.time() - t0,
          **{f"train/{k}": float(v) / max(count, 1) for k, v in jax.device_get(sums or {}).items()},
        }
        every = config.eval_every_epochs
        if every and step % spe == 0 and (epoch + 1) % every == 0:
          if epoch_eval is None:
            epoch_eval = make_epoch_eval(model, config, test_x, test_y)
          record.update(epoch_eval(state))
        writer.record(record)
        writer.scalars(
          step,
          {
            f"epoch/{k.split('/', 1)[-1]}" if k.startswith("train/") else k: v
            for k, v in record.items()
            if k not in ("epoch", "step")
          },
        )
        writer.flush()
        log.info(
          " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
          )
        )
    finally:
      ckpt.wait()
    if step < total:
      log.info(
        "stopped at step %d of %d (--config.stop_after_steps); rerun the same command to continue",
        step,
        total,
      )
      return {"step": step, "stopped": True}

    result = certify.evaluate(
      model,
      state.params,
      state.power,
      test_x,
      test_y,
      eps=config.eps,
      batch_size=config.eval_batch_size,
      eval_iters=config.eval_iters,
      method=config.bound,
      sound=soundness.SoundSettings(iterations=config.sound_iters) if config.sound_eval else None,
      extra_eps=tuple(config.report_eps),
    )
    result.update({"step": step, "model": model.name, "dataset": config.dataset})
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
