"""The train state and what builds it from a training config: model, optimizer, fresh and
abstract states, the device mesh.

Training (``crmjax.train``) and every reader of a trained run (``crmjax.runs``) build these
the same way, so a checkpoint restores into exactly the tree that wrote it.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from crmjax import data, liplt, models

LR_SCHEDULES = ("exponential", "cosine", "one_cycle")


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


def make_model(config: ml_collections.ConfigDict) -> models.Model:
  """``config.model`` on ``config.dataset``'s image shape and classes, with the fixed
  ``config.normalize`` first layer (none for ``()``)."""
  info = data.dataset_info(config.dataset)
  normalize = tuple(map(tuple, config.normalize)) if config.normalize else None
  return models.get_model(
    config.model, input_shape=info.image_shape, num_classes=info.num_classes, normalize=normalize
  )


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

  The warm-up of the last two is capped at half of ``total_steps``
  (``config_schema.validate_config`` warns): with ``pct_start = 1`` optax's one-cycle
  schedule drops its peak and only decays, so e.g. ``mnist.py`` with
  ``--config.num_epochs=1`` rises for half the epoch, then decays.
  """
  kind = config.lr_schedule
  lr, final = config.learning_rate, config.final_learning_rate
  warmup = min(int(config.lr_warmup_epochs) * steps_per_epoch, total_steps // 2)
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
  start = min(int(config.lr_decay_start_epoch) * steps_per_epoch, total_steps)
  decay = optax.exponential_decay(
    lr, transition_steps=max(total_steps - start, 1), decay_rate=final / lr
  )
  return optax.join_schedules([optax.constant_schedule(lr), decay], [start])


def make_optimizer(
  config: ml_collections.ConfigDict, total_steps: int, *, steps_per_epoch: int = 1
) -> optax.GradientTransformation:
  """Adam (AdamW when ``weight_decay > 0``) with ``learning_rate_schedule``, after an
  optional global-norm gradient clip (``grad_clip_norm > 0``), followed by ``params_ema``
  when ``ema_decay > 0``.

  With no option the transformation is plain ``optax.adam`` (checkpoints of earlier runs
  keep restoring).
  """
  lr = learning_rate_schedule(config, total_steps, steps_per_epoch=steps_per_epoch)
  wd, clip = config.weight_decay, config.grad_clip_norm
  tx = optax.adamw(lr, weight_decay=wd) if wd else optax.adam(lr)
  tx = optax.chain(optax.clip_by_global_norm(clip), tx) if clip else tx
  return optax.chain(tx, params_ema(decay=config.ema_decay)) if config.ema_decay else tx


class ParamsEMAState(NamedTuple):
  """``params_ema``'s state: the moving average of the params (their tree)."""

  params_ema: Any


def params_ema(*, decay: float) -> optax.GradientTransformation:
  """An exponential moving average of the params, kept in the optimizer state.

  The last transformation of a chain: it passes the updates through unchanged and sets
  ``ema <- decay * ema + (1 - decay) * (params + updates)``, the average of the params each
  step leaves (``optax.incremental_update``; starts at the initial params, so needs no
  bias correction). Polyak & Juditsky (1992); the weights evaluated and certified where the
  training config sets ``ema_decay`` (``eval_params``).

  Args:
    decay: the average's decay per step, in ``[0, 1)``.
  """

  def init_fn(params):
    return ParamsEMAState(params_ema=jax.tree.map(jnp.array, params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("params_ema needs the params: call update(updates, state, params)")
    new = optax.apply_updates(params, updates)
    return updates, ParamsEMAState(optax.incremental_update(new, state.params_ema, 1.0 - decay))

  return optax.GradientTransformation(init_fn, update_fn)


def eval_params(state: TrainState) -> Any:
  """The params to evaluate and certify: the moving average where the optimizer keeps one
  (``params_ema``), else the params."""
  ema = optax.tree_utils.tree_get(state.opt_state, "params_ema")
  return state.params if ema is None else ema


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


def make_mesh(devices=None) -> tuple[NamedSharding, NamedSharding]:
  """(replicated, batch-sharded) shardings over ``devices`` (default: all; data parallel)."""
  devices = jax.devices() if devices is None else list(devices)
  mesh = jax.make_mesh(
    (len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
  )
  return NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
