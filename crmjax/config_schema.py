"""The schema of the training and certification configs: validation, renamed fields, and the
fields an old stored config lacks.

The values of a new run come from its config file (``experiments/configs/default.py`` and
the files built on it); library code reads every field as ``config.field``. A config stored
in a checkpoint (``meta['config']``) may predate fields added since: ``stored_config`` renames
its old fields (``RENAMED_CONFIG_KEYS``) and fills each missing one with ``ADDED_FIELDS``,
the value that reproduces how the run that wrote it behaved before the field existed (a
record of the schema's history, not a default: a changed default must not change how an
old checkpoint restores).

Every check raises ``ValueError('--config.<field>=<value> is invalid: <fix>')``
(``invalid_setting``); the experiments' command line prints it and exits with status 2.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any, NoReturn

import ml_collections

from crmjax import data, liplt, losses, models, refinement, soundness, train_state

LOSSES = ("crm", "ce", "gloro")

# Training-config fields renamed since checkpoints were first written: old name -> new name.
RENAMED_CONFIG_KEYS = {
  "power_iters": "train_iters",
  "eval_power_iters": "eval_iters",
  "sound_power_iters": "sound_iters",
}

# Training-config fields added since checkpoints were first written (a dotted name is a field
# of a group) -> the value that reproduces a run from before the field existed.
ADDED_FIELDS: Mapping[str, Any] = {
  "download_url": "",
  "init": "flax",
  "lr_schedule": "exponential",
  "lr_decay_start_epoch": 0,
  "lr_warmup_epochs": 0,
  "weight_decay": 0.0,
  "grad_clip_norm": 0.0,
  "report_eps": (),
  "eval_every_epochs": 0,
  "epoch_eval_subset": 0,
  "tensorboard": True,
  "stop_after_steps": 0,
  "crm.penalty": "exp",
  "crm.normalize": "correct",
  "crm.r_floor": 0.0,
  "augment.rotation_degrees": 0.0,
  "augment.translation": 0.0,
  "augment.fill": 0.0,
  "rescaling.every_steps": 0,  # off: the group's other fields are read only when on
  "coordinator_address": "",  # the multi-host settings: JAX's own detection
  "num_processes": 0,
  "process_id": -1,
  "train_solver": "power",
  "ema_decay": 0.0,
  "bound_every_steps": 1,
}

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ stored configs


def upgrade_config(stored: dict) -> dict:
  """A stored training config (``meta['config']``) with the fields of ``RENAMED_CONFIG_KEYS``
  under their new names; a new name already present wins. The input is not modified."""
  config = dict(stored)
  for old, new in RENAMED_CONFIG_KEYS.items():
    if old in config:
      config.setdefault(new, config.pop(old))
  return config


def fill_added_fields(stored: dict) -> dict:
  """``stored`` with every field of ``ADDED_FIELDS`` it lacks (groups created as needed);
  fields present are kept. The input is not modified."""
  config = copy.deepcopy(stored)
  for field, value in ADDED_FIELDS.items():
    *groups, name = field.split(".")
    section = config
    for group in groups:
      section = section.setdefault(group, {})
    section.setdefault(name, value)
  return config


def stored_config(stored: dict) -> ml_collections.ConfigDict:
  """The training config of a checkpoint's ``meta['config']``, renamed and filled once
  (``upgrade_config``, ``fill_added_fields``), ready for ``config.field`` reads."""
  return ml_collections.ConfigDict(fill_added_fields(upgrade_config(stored)))


# ------------------------------------------------------------------------ checks


def invalid_setting(field: str, value: Any, fix: str) -> NoReturn:
  """Raises the ``ValueError`` of every config check: ``--config.<field>=<value> is invalid:
  <fix>`` (the experiments' command line prints it and exits with status 2)."""
  raise ValueError(f"--config.{field}={value!r} is invalid: {fix}")


def require_integers(config: ml_collections.ConfigDict, minimums: dict[str, int]) -> None:
  """``invalid_setting`` for the first field of ``minimums`` that is not an integer (bools
  refused) at least its minimum. A dotted field (``'rescaling.steps'``) names a field of a
  group."""
  for field, low in minimums.items():
    *groups, name = field.split(".")
    section = config
    for group in groups:
      section = section[group]
    v = section[name]
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= low):
      invalid_setting(field, v, f"use an integer >= {low}")


def _require_choice(field: str, value: Any, choices) -> None:
  if value not in choices:
    invalid_setting(field, value, f"use one of {list(choices)}")


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int) -> None:
  """Raises ``ValueError`` naming the field and the fix for any invalid training setting."""
  _validate_choices(config)
  _validate_sizes(config, num_devices)
  _validate_training(config)
  _validate_schedule(config)
  _validate_normalize(config)
  _validate_rescaling(config)


def _validate_choices(config) -> None:
  _require_choice("dataset", config.dataset, data.KNOWN_DATASETS)
  if config.model not in models.ARCHITECTURES:
    invalid_setting("model", config.model, f"use one of {sorted(models.ARCHITECTURES)}")
  _require_choice("loss", config.loss, LOSSES)
  _require_choice("bound", config.bound, liplt.ALL_METHODS)
  _require_choice("bound_mode", config.bound_mode, liplt.MODES)
  _require_choice("train_solver", config.train_solver, tuple(liplt.SOLVERS))


def _validate_sizes(config, num_devices: int) -> None:
  bad = invalid_setting
  if not (isinstance(config.batch_size, int) and config.batch_size >= 1):
    bad("batch_size", config.batch_size, "use a positive integer")
  if config.batch_size % num_devices:
    bad(
      "batch_size",
      config.batch_size,
      f"it must be divisible by the {num_devices} devices; use a multiple of {num_devices}",
    )
  require_integers(config, {"train_iters": 1, "eval_iters": 1, "sound_iters": 1})
  _validate_bound_every(config)
  if config.train_solver == "lanczos" and config.train_iters > liplt.MAX_LANCZOS_ITERS:
    invalid_setting(
      "train_iters",
      config.train_iters,
      f"Lanczos is unrolled for a few products: use at most {liplt.MAX_LANCZOS_ITERS} with "
      "--config.train_solver=lanczos, or --config.train_solver=power",
    )
  if not config.eps >= 0:
    bad("eps", config.eps, "the certified radius eps must be >= 0")


def _validate_bound_every(config) -> None:
  every = config.bound_every_steps
  if not (isinstance(every, int) and not isinstance(every, bool) and every >= 1):
    invalid_setting("bound_every_steps", every, "use an integer >= 1 (1: the bound every step)")
  if every > 1 and config.loss == "ce":
    invalid_setting(
      "bound_every_steps",
      every,
      "--config.loss=ce uses no bound: use --config.loss=crm or gloro, or bound_every_steps=1",
    )
  if every > 1 and config.rescaling.every_steps:
    invalid_setting(
      "bound_every_steps",
      every,
      "the refreshed rescaling needs the bound every step: use --config.bound_every_steps=1 "
      "or --config.rescaling.every_steps=0",
    )


def _validate_training(config) -> None:
  bad, crm = invalid_setting, config.crm
  if not crm.temperature > 0:
    bad("crm.temperature", crm.temperature, "the soft-min temperature t must be > 0")
  if not crm.lam >= 0:
    bad("crm.lam", crm.lam, "lambda must be >= 0")
  if not config.learning_rate > 0:
    bad("learning_rate", config.learning_rate, "use a positive learning rate")
  if not (isinstance(config.num_epochs, int) and config.num_epochs >= 1):
    bad("num_epochs", config.num_epochs, "use an integer >= 1")
  _require_choice("crm.penalty", crm.penalty, losses.PENALTIES)
  if not (isinstance(config.lr_decay_start_epoch, int) and config.lr_decay_start_epoch >= 0):
    bad(
      "lr_decay_start_epoch",
      config.lr_decay_start_epoch,
      "use an integer epoch >= 0 (past num_epochs: a constant rate)",
    )
  if crm.warmup_epochs < 0:
    bad("crm.warmup_epochs", crm.warmup_epochs, "use an integer >= 0")
  if config.loss == "crm" and crm.warmup_epochs >= config.num_epochs:
    bad(
      "crm.warmup_epochs",
      crm.warmup_epochs,
      f"the cross-entropy warm-up would take all --config.num_epochs={config.num_epochs} and "
      "the CRM penalty never switch on: use fewer warm-up epochs (0: CRM from the first "
      "step) or --config.loss=ce",
    )
  if crm.ramp_epochs < 0:
    bad("crm.ramp_epochs", crm.ramp_epochs, "use an integer >= 0 (0: no ramp)")
  for field in ("r0", "r0_start"):
    if crm[field] is not None and not crm[field] > 0:
      bad(f"crm.{field}", crm[field], "the target radius must be > 0")
  lowest_r0 = min(crm.r0, crm.r0 if crm.r0_start is None else crm.r0_start)
  if not 0 <= crm.r_floor < lowest_r0:
    bad(
      "crm.r_floor",
      crm.r_floor,
      "use 0 <= r_floor < r0 (and < r0_start with an r0 ramp; 0: every point below r0)",
    )
  if crm.r_floor and config.loss != "crm":
    bad("crm.r_floor", crm.r_floor, "it is a setting of the CRM penalty: use --config.loss=crm")
  if crm.r0_start is not None and not crm.ramp_epochs:
    bad(
      "crm.r0_start",
      crm.r0_start,
      "it is where r0's ramp starts, and there is no ramp: set --config.crm.ramp_epochs > 0 "
      "too, or leave crm.r0_start unset (r0 from the start)",
    )
  _require_choice("init", config.init, models.INIT_SCHEMES)


def _validate_schedule(config) -> None:
  bad, schedule = invalid_setting, config.lr_schedule
  _require_choice("lr_schedule", schedule, train_state.LR_SCHEDULES)
  require_integers(config, {"lr_warmup_epochs": 0})
  warmup_epochs = config.lr_warmup_epochs
  # A setting the chosen schedule never reads is refused rather than silently ignored.
  if schedule != "exponential" and config.lr_decay_start_epoch:
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
  if not config.final_learning_rate > 0:
    bad("final_learning_rate", config.final_learning_rate, "use a positive rate")
  if config.final_learning_rate > config.learning_rate:
    bad(
      "final_learning_rate",
      config.final_learning_rate,
      f"the schedules decay to it: use a rate <= --config.learning_rate={config.learning_rate}",
    )
  if not config.weight_decay >= 0:
    bad("weight_decay", config.weight_decay, "use a decay >= 0 (0: plain Adam)")
  if not config.grad_clip_norm >= 0:
    bad("grad_clip_norm", config.grad_clip_norm, "use a norm >= 0 (0: no clipping)")
  if not 0 <= config.ema_decay < 1:
    bad("ema_decay", config.ema_decay, "use a decay in [0, 1), e.g. 0.999 (0: no average)")
  _require_choice("crm.normalize", config.crm.normalize, losses.PENALTY_NORMALIZATIONS)
  every = config.eval_every_epochs
  if not (isinstance(every, int) and every >= 0):
    bad("eval_every_epochs", every, "use an integer >= 0 (0: never)")
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


def _validate_normalize(config) -> None:
  norm = config.normalize or ()
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
    invalid_setting(
      "normalize",
      norm,
      f"use ((mean, ...), (std, ...)) with one value or one per channel ({channels} for "
      f"{config.dataset}) each and every std > 0, e.g. '((0.1307,), (0.3081,))', or () for none",
    )


def _validate_rescaling(config) -> None:
  bad, r = invalid_setting, config.rescaling
  every = r.every_steps
  if not (isinstance(every, int) and not isinstance(every, bool) and every >= 0):
    bad("rescaling.every_steps", every, "use an integer >= 0 (0: off, the plain bound)")
  if not every:
    return
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
  if not (isinstance(r.learning_rate, (int, float)) and r.learning_rate > 0):
    bad("rescaling.learning_rate", r.learning_rate, "use a positive Adam step on log D")


def validate_certify_config(config: ml_collections.ConfigDict) -> None:
  """Raises ``ValueError`` naming the field and the fix for any invalid certification setting
  (``experiments/configs/certify.py``), before any checkpoint is read: a bad choice would
  otherwise surface only after minutes of bounds."""
  bad = invalid_setting
  _require_choice("sound_estimator", config.sound_estimator, soundness.ESTIMATORS)
  _require_choice("refine_norms", config.refine_norms, refinement.NORM_CHOICES)
  require_integers(
    config,
    {
      "eval_batch_size": 1,
      "pgd_batch_size": 1,
      "pgd_steps": 1,
      "pgd_restarts": 1,
      "eval_iters": 1,
      "test_subset": 0,
      "pgd_subset": 0,
      "sound_iters": 0,
    },
  )
  if not 0 < config.failure_prob < 1:
    bad("failure_prob", config.failure_prob, "use a probability in (0, 1), e.g. 1e-6")
  if not config.eps >= 0:
    bad("eps", config.eps, "use a radius >= 0 (0: the training config's eps)")
