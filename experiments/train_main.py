"""The shared command-line entry of the training experiments (mnist, cifar10, tiny_imagenet)."""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from crmjax import checkpoint, train

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics; "
                               "rerunning with the same one resumes.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)


def main(argv, default_workdir: str):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # keep Orbax's per-save INFO lines out of the log
  try:
    result = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value or default_workdir)
  except (ValueError, FileNotFoundError, OSError, checkpoint.CheckpointError,
          train.TrainingDiverged) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if result.get("stopped"):
    return
  print(f"clean accuracy {result['clean_accuracy']:.2%}, certified accuracy "
        f"{result['certified_accuracy']:.2%} at eps={result['eps']:.4g} "
        f"({result['bound_kind']}), mean pairwise Lipschitz "
        f"{result['mean_pairwise_lipschitz']:.4g}")


def run(default_workdir: str):
  flags.mark_flags_as_required(["config"])
  app.run(lambda argv: main(argv, default_workdir))
