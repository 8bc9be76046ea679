"""CRM training: train state, one jit-compiled data-parallel step, the resumable loop.

``train_and_evaluate(config, workdir)`` is the main job: it trains with the loss named by
``config.loss`` (``crm``, ``ce`` or ``gloro``), checkpoints with Orbax, resumes from the
latest checkpoint when rerun with the same workdir, and ends with a test evaluation.

With ``config.rescaling.every_steps = N > 0`` the loss's bound is LipLT (eq. 19) of the
rescaled network ``rescaling.rescale(net, D)``, with positive diagonal scales ``D`` (one per
neuron; any ``D > 0`` keeps the bound valid, paper Theorem 3.2's refinement) re-optimised
every N steps by ``refinement.refresh_scales`` and fixed in between (``make_refresh``).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from crmjax import (
  certify,
  checkpoint,
  data,
  input_pipeline,
  liplt,
  losses,
  models,
  refinement,
  rescaling,
  summary,
)

LOSSES = ("crm", "ce", "gloro")

log = logging.getLogger(__name__)


@struct.dataclass
class TrainState:
  """Everything a training step reads and writes (and a checkpoint holds).

  Attributes:
    step: global step count (the data position is derived from it).
    params: the model's params.
    opt_state: the optax state (it carries the learning-rate schedule count).
    power: ``crmjax.liplt.PowerState``, the warm-started power-iteration vectors.
    key: raw ``uint32`` PRNG key data. No step reads it today; it stays so that every
      checkpoint written so far keeps restoring (a changed state tree would not).
  """

  step: jax.Array
  params: Any
  opt_state: Any
  power: liplt.PowerState
  key: jax.Array


class TrainingDiverged(FloatingPointError):
  """The loss became NaN or inf; the last good checkpoint is left untouched."""


# ---------------------------------------------------------------------- construction


def invalid_setting(field: str, value: Any, fix: str) -> NoReturn:
  """Raises the ``ValueError`` of every config check: ``--config.<field>=<value> is invalid:
  <fix>`` (the experiments' command line prints it and exits with status 2)."""
  raise ValueError(f"--config.{field}={value!r} is invalid: {fix}")


def require_integers(config: ml_collections.ConfigDict, minimums: dict[str, int]) -> None:
  """``invalid_setting`` for the first field of ``minimums`` (absent fields pass) that is not
  an integer (bools refused) at least its minimum. A dotted field (``'rescaling.steps'``)
  names a field of a group."""
  for field, low in minimums.items():
    *groups, name = field.split(".")
    section = config
    for group in groups:
      section = section.get(group, {})
    v = section.get(name, low)
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= low):
      invalid_setting(field, v, f"use an integer >= {low}")


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int) -> None:
  """Raises ``ValueError`` naming the field and the fix for any invalid setting."""
  bad = invalid_setting

  if config.dataset not in data.KNOWN_DATASETS:
    bad("dataset", config.dataset, f"use one of {list(data.KNOWN_DATASETS)}")
  if config.model not in models.ARCHITECTURES:
    bad("model", config.model, f"use one of {sorted(models.ARCHITECTURES)}")
  if config.loss not in LOSSES:
    bad("loss", config.loss, f"use one of {list(LOSSES)}")
  if config.bound not in liplt.ALL_METHODS:
    bad("bound", config.bound, f"use one of {list(liplt.ALL_METHODS)}")
  if config.bound_mode not in liplt.MODES:
    bad("bound_mode", config.bound_mode, f"use one of {list(liplt.MODES)}")
  if not (isinstance(config.batch_size, int) and config.batch_size >= 1):
    bad("batch_size", config.batch_size, "use a positive integer")
  if config.batch_size % num_devices:
    bad(
      "batch_size",
      config.batch_size,
      f"it must be divisible by the {num_devices} devices; use a multiple of {num_devices}",
    )
  require_integers(config, {"train_iters": 1, "eval_iters": 1, "sound_iters": 1})
  if not config.eps >= 0:
    bad("eps", config.eps, "the certified radius eps must be >= 0")
  if not config.crm.temperature > 0:
    bad("crm.temperature", config.crm.temperature, "the soft-min temperature t must be > 0")
  if not config.crm.lam >= 0:
    bad("crm.lam", config.crm.lam, "lambda must be >= 0")
  if not config.learning_rate > 0:
    bad("learning_rate", config.learning_rate, "use a positive learning rate")
  if not (isinstance(config.num_epochs, int) and config.num_epochs >= 1):
    bad("num_epochs", config.num_epochs, "use an integer >= 1")
  if config.crm.get("penalty", "exp") not in losses.PENALTIES:
    bad("crm.penalty", config.crm.penalty, f"use one of {list(losses.PENALTIES)}")
  if not (
    isinstance(config.get("lr_decay_start_epoch", 0), int)
    and config.get("lr_decay_start_epoch", 0) >= 0
  ):
    bad(
      "lr_decay_start_epoch",
      config.lr_decay_start_epoch,
      "use an integer epoch >= 0 (past num_epochs: a constant rate)",
    )
  if config.crm.warmup_epochs < 0:
    bad("crm.warmup_epochs", config.crm.warmup_epochs, "use an integer >= 0")
  if config.loss == "crm" and config.crm.warmup_epochs >= config.num_epochs:
    bad(
      "crm.warmup_epochs",
      config.crm.warmup_epochs,
      f"the cross-entropy warm-up would take all --config.num_epochs={config.num_epochs} and "
      "the CRM penalty never switch on: use fewer warm-up epochs (0: CRM from the first "
      "step) or --config.loss=ce",
    )
  if config.crm.get("ramp_epochs", 0) < 0:
    bad("crm.ramp_epochs", config.crm.ramp_epochs, "use an integer >= 0 (0: no ramp)")
  for field in ("r0", "r0_start"):
    if config.crm.get(field) is not None and not config.crm[field] > 0:
      bad(f"crm.{field}", config.crm[field], "the target radius must be > 0")
  if config.crm.get("r0_start") is not None and not config.crm.get("ramp_epochs", 0):
    bad(
      "crm.r0_start",
      config.crm.r0_start,
      "it is where r0's ramp starts, and there is no ramp: set --config.crm.ramp_epochs > 0 "
      "too, or leave crm.r0_start unset (r0 from the start)",
    )
  if config.get("init", "flax") not in models.INIT_SCHEMES:
    bad("init", config.init, f"use one of {list(models.INIT_SCHEMES)}")
  schedule = config.get("lr_schedule", "exponential")
  if schedule not in LR_SCHEDULES:
    bad("lr_schedule", schedule, f"use one of {list(LR_SCHEDULES)}")
  require_integers(config, {"lr_warmup_epochs": 0})
  warmup_epochs = config.get("lr_warmup_epochs", 0)
  # A setting the chosen schedule never reads is refused rather than silently ignored.
  if schedule != "exponential" and config.get("lr_decay_start_epoch", 0):
    bad(
      "lr_decay_start_epoch",
      config.lr_decay_start_epoch,
      f"--config.lr_schedule={schedule} does not read it (its decay starts when the "
      "--config.lr_warmup_epochs warm-up ends): set --config.lr_decay_start_epoch=0, or use "
      "--config.lr_schedule=exponential",
    )
  if schedule == "exponential" and warmup_epochs:
    bad(
      "lr_warmup_epochs",
      warmup_epochs,
      "--config.lr_schedule=exponential has no warm-up: set --config.lr_warmup_epochs=0, or use "
      "--config.lr_schedule=cosine or one_cycle",
    )
  if schedule != "exponential" and 2 * warmup_epochs > config.num_epochs:
    log.warning(
      "--config.lr_warmup_epochs=%d is more than half of --config.num_epochs=%d: the %s "
      "schedule's warm-up is capped at half the run",
      warmup_epochs,
      config.num_epochs,
      schedule,
    )
  if not config.get("final_learning_rate", 1.0) > 0:
    bad("final_learning_rate", config.final_learning_rate, "use a positive rate")
  if config.get("final_learning_rate", 0.0) > config.learning_rate:
    bad(
      "final_learning_rate",
      config.final_learning_rate,
      f"the schedules decay to it: use a rate <= --config.learning_rate={config.learning_rate}",
    )
  if not config.get("weight_decay", 0.0) >= 0:
    bad("weight_decay", config.weight_decay, "use a decay >= 0 (0: plain Adam)")
  if not config.get("grad_clip_norm", 0.0) >= 0:
    bad("grad_clip_norm", config.grad_clip_norm, "use a norm >= 0 (0: no clipping)")
  if config.crm.get("normalize", "correct") not in losses.PENALTY_NORMALIZATIONS:
    bad("crm.normalize", config.crm.normalize, f"use one of {list(losses.PENALTY_NORMALIZATIONS)}")
  if not (
    isinstance(config.get("eval_every_epochs", 0), int) and config.get("eval_every_epochs", 0) >= 0
  ):
    bad("eval_every_epochs", config.eval_every_epochs, "use an integer >= 0 (0: never)")
  require_integers(
    config,
    {
      "log_every_steps": 1,
      "checkpoint_every_steps": 1,
      "eval_batch_size": 1,
      "max_checkpoints": 1,
      "train_subset": 0,
      "test_subset": 0,
      "epoch_eval_subset": 0,
      "stop_after_steps": 0,
    },
  )
  _validate_normalize(config, bad)
  _validate_rescaling(config, bad)


def _validate_normalize(config, bad) -> None:
  norm = config.get("normalize") or ()
  if not norm:
    return
  channels = data.dataset_info(config.dataset).image_shape[-1]
  ok = (
    len(norm) == 2
    and all(isinstance(v, (tuple, list)) and len(v) in (1, channels) for v in norm)
    and all(isinstance(x, (int, float)) for v in norm for x in v)
    and all(sd > 0 for sd in norm[1])
  )
  if not ok:
    bad(
      "normalize",
      norm,
      f"use ((mean, ...), (std, ...)) with one value or one per channel ({channels} for "
      f"{config.dataset}) each and every std > 0, e.g. '((0.1307,), (0.3081,))', or () for none",
    )


def rescaling_every(config: ml_collections.ConfigDict) -> int:
  """``config.rescaling.every_steps`` (0 -- off -- for configs without the group)."""
  return config.get("rescaling", {}).get("every_steps", 0)


def _validate_rescaling(config, bad) -> None:
  every = rescaling_every(config)
  if not (isinstance(every, int) and not isinstance(every, bool) and every >= 0):
    bad("rescaling.every_steps", every, "use an integer >= 0 (0: off, the plain bound)")
  if not every:
    return
  r = config.rescaling
  if config.bound != "liplt":
    bad(
      "bound",
      config.bound,
      "--config.rescaling.every_steps > 0 optimises the rescaling of the LipLT bound: use "
      "--config.bound=liplt (liplt_aol is its fixed AOL rescaling), or "
      "--config.rescaling.every_steps=0",
    )
  if config.loss == "ce":
    bad(
      "rescaling.every_steps",
      every,
      "--config.loss=ce uses no bound: use --config.loss=crm or gloro, or every_steps=0",
    )
  require_integers(
    config,
    {
      "rescaling.steps": 0,
      "rescaling.step_iters": 1,
      "rescaling.warmup_iters": 0,
      "rescaling.final_iters": 1,
    },
  )
  if not (isinstance(r.get("learning_rate"), (int, float)) and r.learning_rate > 0):
    bad("rescaling.learning_rate", r.get("learning_rate"), "use a positive Adam step on log D")


def make_model(config: ml_collections.ConfigDict) -> models.Model:
  info = data.dataset_info(config.dataset)
  normalize = tuple(map(tuple, config.normalize)) if config.get("normalize") else None
  return models.get_model(
    config.model, input_shape=info.image_shape, num_classes=info.num_classes, normalize=normalize
  )


LR_SCHEDULES = ("exponential", "cosine", "one_cycle")


def learning_rate_schedule(
  config: ml_collections.ConfigDict, total_steps: int, *, steps_per_epoch: int = 1
) -> optax.Schedule:
  """The learning rate per step, by ``config.lr_schedule``.

  * ``'exponential'`` (default): ``learning_rate`` until ``lr_decay_start_epoch``, then an
    exponential decay to ``final_learning_rate`` at ``total_steps`` (the paper's decay when
    the start is 0; the reference implementation's ``learningRateDecayEpoch`` otherwise).
  * ``'cosine'``: a linear warm-up from 0 over ``lr_warmup_epochs``, then a cosine decay to
    ``final_learning_rate`` (``optax.warmup_cosine_decay_schedule``).
  * ``'one_cycle'``: ``optax.cosine_onecycle_schedule`` peaking at ``learning_rate`` after
    ``lr_warmup_epochs`` (from ``learning_rate / 25``), ending at ``final_learning_rate``.

  The warm-up of the last two is capped at half of ``total_steps`` (``validate_config`` warns):
  with ``pct_start = 1`` optax's one-cycle schedule drops its peak and only decays, so e.g.
  ``mnist.py`` with ``--config.num_epochs=1`` rises for half the epoch, then decays.
  """
  kind = config.get("lr_schedule", "exponential")
  lr, final = config.learning_rate, config.final_learning_rate
  warmup = min(int(config.get("lr_warmup_epochs", 0)) * steps_per_epoch, total_steps // 2)
  if kind == "cosine":
    return optax.warmup_cosine_decay_schedule(
      0.0, lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1), end_value=final
    )
  if kind == "one_cycle":
    return optax.cosine_onecycle_schedule(
      max(total_steps, 2),
      lr,
      pct_start=max(warmup, 1) / max(total_steps, 2),
      div_factor=25.0,
      final_div_factor=lr / 25.0 / final,
    )
  start = min(int(config.get("lr_decay_start_epoch", 0)) * steps_per_epoch, total_steps)
  decay = optax.exponential_decay(
    lr, transition_steps=max(total_steps - start, 1), decay_rate=final / lr
  )
  return optax.join_schedules([optax.constant_schedule(lr), decay], [start])


def make_optimizer(
  config: ml_collections.ConfigDict, total_steps: int, *, steps_per_epoch: int = 1
) -> optax.GradientTransformation:
  """Adam (AdamW when ``weight_decay > 0``) with ``learning_rate_schedule``, after an
  optional global-norm gradient clip (``grad_clip_norm > 0``).

  With neither option the transformation is plain ``optax.adam`` (checkpoints of earlier
  runs keep restoring).
  """
  lr = learning_rate_schedule(config, total_steps, steps_per_epoch=steps_per_epoch)
  wd, clip = config.get("weight_decay", 0.0), config.get("grad_clip_norm", 0.0)
  tx = optax.adamw(lr, weight_decay=wd) if wd else optax.adam(lr)
  return optax.chain(optax.clip_by_global_norm(clip), tx) if clip else tx


def penalty_schedules(
  config: ml_collections.ConfigDict, steps_per_epoch: int
) -> tuple[optax.Schedule, optax.Schedule]:
  """``lambda(step)`` (0 before the warm-up ends, then constant or a linear ramp) and ``r0(step)``
  (``crm.r0_start`` through the warm-up, then linear to ``crm.r0`` over the ramp; ``crm.r0``
  throughout when ``crm.r0_start`` is None)."""
  start = config.crm.warmup_epochs * steps_per_epoch
  ramp = max(config.crm.ramp_epochs * steps_per_epoch, 1)
  r0_start = config.crm.get("r0_start")
  r0_start = config.crm.r0 if r0_start is None else r0_start
  if config.crm.ramp_epochs:
    lam = optax.linear_schedule(0.0, config.crm.lam, ramp)
    r0 = optax.linear_schedule(r0_start, config.crm.r0, ramp)
  else:
    lam, r0 = optax.constant_schedule(config.crm.lam), optax.constant_schedule(config.crm.r0)
  lam = optax.join_schedules([optax.constant_schedule(0.0), lam], [start])
  r0 = optax.join_schedules([optax.constant_schedule(r0_start), r0], [start])
  return lam, r0


def create_state(
  model: models.Model, tx: optax.GradientTransformation, seed: int, *, init: str = "flax"
) -> TrainState:
  """A fresh train state; ``init`` is ``models.INIT_SCHEMES`` (``'flax'`` or ``'torch'``).

  The params are drawn in one compiled program (the same values as ``model.init`` op by op,
  in half the XLA:CPU compile time). ``jax.eval_shape`` of this is a restore target.
  """
  k_params, k_power, k_state = jax.random.split(jax.random.key(seed), 3)
  params = jax.jit(functools.partial(model.init, scheme=init))(k_params)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    power=liplt.init_state(model.lipnet(params), k_power),
    key=jax.random.key_data(k_state),
  )


def abstract_state(
  model: models.Model,
  tx: optax.GradientTransformation,
  seed: int,
  sharding: jax.sharding.Sharding | None = None,
) -> TrainState:
  """``create_state``'s structure, shapes and dtypes as ``jax.ShapeDtypeStruct`` leaves, each
  with ``sharding``: a checkpoint restore target made without initialising or compiling
  anything (``jax.eval_shape``). The init scheme does not change shapes."""
  shapes = jax.eval_shape(functools.partial(create_state, model, tx, seed))
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


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
        penalty=losses.PENALTIES[config.crm.get("penalty", "exp")],
        normalize=config.crm.get("normalize", "correct"),
      )
    K = lip.shape[0]
    aux["lip"] = jnp.sum(lip) / (K * (K - 1))
    return loss, (aux, power)

  def update(state: TrainState, images, labels, log_d):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (aux, power)), grads = grad_fn(
      state.params, state.power, images, labels, state.step, log_d
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, power=power)
    return new, {"loss": loss, **aux}

  if regularized and rescaling_every(config):

    def train_step(state: TrainState, images, labels, log_d):
      return update(state, images, labels, log_d)

  else:

    def train_step(state: TrainState, images, labels):
      return update(state, images, labels, None)

  return train_step


def make_mesh(devices=None) -> tuple[NamedSharding, NamedSharding]:
  """(replicated, batch-sharded) shardings over ``devices`` (default: all; data parallel)."""
  devices = jax.devices() if devices is None else list(devices)
  mesh = jax.make_mesh(
    (len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
  )
  return NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))


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
    download_url=config.get("download_url") or None,
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
) -> Callable[[TrainState], dict]:
  """A cheap test evaluation for the per-epoch curves (``eval_every_epochs``).

  Clean accuracy and the certified accuracy at ``eps`` with the power-iteration ESTIMATE of
  the pairwise bound (``eval_iters`` warm-started iterations; not a certificate: the
  final evaluation certifies with the sound bound). Compiled once.
  """
  if config.get("epoch_eval_subset", 0):
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

  def evaluate(state: TrainState) -> dict:
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
  if config.get("distributed"):
    jax.distributed.initialize(
      config.get("coordinator_address") or None,
      config.get("num_processes") or None,
      None if config.get("process_id", -1) < 0 else config.process_id,
    )
  validate_config(config, num_devices=jax.device_count())
  workdir = checkpoint.check_writable(workdir)
  model = make_model(config)
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
  tx = make_optimizer(config, total, steps_per_epoch=spe)
  replicated, batch_sharding = make_mesh()

  regular = config.loss != "ce"
  refresh_every = rescaling_every(config)
  steps = {
    reg: jit_step(
      make_train_step(model, tx, config, regularized=reg, steps_per_epoch=spe),
      replicated,
      batch_sharding,
      rescaled=reg and refresh_every > 0,
    )
    for reg in {False, regular}
  }
  # The refreshed rescaling (off: refresh_every = 0): log D, outside TrainState (its own
  # checkpoint item), refreshed every `refresh_every` steps from the first step using the bound.
  log_d, refresh, first_bound_step = None, None, warm_epochs * spe
  if refresh_every:
    refresh = jit_refresh(make_refresh(model, config), replicated)
  augment = input_pipeline.Augment(
    random_crop_padding=config.augment.crop_padding,
    horizontal_flip=config.augment.flip,
    rotation_degrees=config.augment.get("rotation_degrees", 0.0),
    translation=config.augment.get("translation", 0.0),
    fill=config.augment.get("fill", 0.0),
  )
  lr_fn = learning_rate_schedule(config, total, steps_per_epoch=spe)
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
    summary.MetricWriter(workdir, tensorboard=config.get("tensorboard", True)) as writer,
  ):
    latest = ckpt.latest_step()
    if latest is None:
      state = jax.device_put(
        create_state(model, tx, config.seed, init=config.get("init", "flax")), replicated
      )
    else:  # restored into the abstract state: no fresh initialisation to throw away
      state, meta = ckpt.restore(
        abstract_state(model, tx, config.seed, replicated),
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
        every = config.get("eval_every_epochs", 0)
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
      sound=config.sound_eval,
      sound_iters=config.sound_iters,
      extra_eps=tuple(config.get("report_eps", ())),
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
