"""A trained run, restored: its training config, model and state from the latest checkpoint.

``load_run(workdir)`` rebuilds the model and the restore target from the training config
stored in the checkpoint's meta (``config_schema.stored_config``: old fields renamed, fields
added since filled), so every run written so far loads; ``load_test`` reads its test split.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections
import numpy as np

from crmjax import checkpoint, config_schema, data, models, train_state, train_step

LOSS_LABELS = {"crm": "CRM", "ce": "standard CE", "gloro": "GloRo"}
TRAIN_COMMAND = (
  "python -m experiments.mnist --config=experiments/configs/mnist.py "
  "--workdir={workdir}  (or experiments.cifar10 / experiments.tiny_imagenet "
  "with experiments/configs/cifar.py / tiny_imagenet.py)"
)


@dataclasses.dataclass(frozen=True)
class Run:
  """A restored training run.

  Attributes:
    workdir: the run's directory.
    config: its training config (rebuilt from the checkpoint's ``meta['config']``: old
      fields renamed and missing ones filled by ``config_schema.stored_config``).
    model: the classifier.
    state: the restored ``crmjax.train_state.TrainState``.
    meta: the checkpoint's meta dict.
    scales: the rescaling ``D`` (one array per block) the training loss used last
      (``--config.rescaling.every_steps``), from the checkpoint's ``rescaling`` item;
      ``None`` for runs trained without it.
  """

  workdir: str
  config: ml_collections.ConfigDict
  model: models.Model
  state: train_state.TrainState
  meta: dict
  scales: tuple[np.ndarray, ...] | None = None

  @property
  def params(self):
    """The params evaluated and certified: the moving average where the run kept one
    (``train_state.eval_params``), else the trained params."""
    return train_state.eval_params(self.state)

  @property
  def label(self) -> str:
    """The run's loss as the figures name it (``LOSS_LABELS``)."""
    return LOSS_LABELS.get(self.config.loss, self.config.loss)


def load_run(workdir: str) -> Run:
  """Restores the latest checkpoint of ``workdir`` (written by ``train.train_and_evaluate``).

  Raises:
    FileNotFoundError: ``workdir`` holds no complete checkpoint (the message names the
      training command).
    crmjax.checkpoint.CheckpointError: the checkpoint is corrupt or does not match.
  """
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  missing = FileNotFoundError(
    f"no checkpoint in {directory}: train the run first, e.g. "
    f"{TRAIN_COMMAND.format(workdir=workdir)}"
  )
  if not os.path.isdir(directory):  # checked first: Checkpointer would create it
    raise missing
  with checkpoint.Checkpointer(directory) as ckpt:
    step = ckpt.latest_step()
    if step is None:
      raise missing
    stored = ckpt.read_meta(step)
    if "config" not in stored:
      raise checkpoint.CorruptCheckpointError(
        f"checkpoint step {step} in {directory} has no meta['config'] (not written by "
        "crmjax.train)",
        step=step,
        path=ckpt.step_dir(step),
      )
    config = config_schema.stored_config(stored["config"])
    model = train_state.make_model(config)
    # The optimizer's state structure does not depend on the schedule length.
    tx = train_state.make_optimizer(config, total_steps=1)
    replicated, _ = train_state.make_mesh()
    state, meta = ckpt.restore(
      train_state.abstract_state(model, tx, config.seed, replicated),
      step=step,
      expected_meta={"architecture": model.name, "dataset": config.dataset},
    )
    log_d = None
    if config.rescaling.every_steps:
      like = train_step.initial_log_scales(model, state.params)  # the loop's restore target
      log_d = ckpt.restore_extra("rescaling", like, step=step)
  scales = None if log_d is None else tuple(np.exp(np.asarray(l)) for l in log_d)
  return Run(workdir=workdir, config=config, model=model, state=state, meta=meta, scales=scales)


def load_test(
  run: Run, *, data_dir: str = "", subset: int = 0, download: bool = False
) -> tuple[np.ndarray, np.ndarray]:
  """The run's test split: uint8 images ``(N, H, W, C)`` and int32 labels ``(N,)``."""
  images, labels = data.load_split(
    run.config.dataset, "test", data_dir=data_dir or run.config.data_dir or None, download=download
  )
  if subset:
    images, labels = images[:subset], labels[:subset]
  return images, np.asarray(labels, np.int32)
