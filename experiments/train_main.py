"""The shared command-line entry of the training experiments (mnist, cifar10, tiny_imagenet)."""

import ml_collections

from crmjax import certify, train
from experiments import cli


def main(config: ml_collections.ConfigDict, workdir: str) -> None:
  result = train.train_and_evaluate(config, workdir)
  if result.get("stopped"):
    return
  at = result.get("certified_accuracy_at", {})
  others = "".join(
    f", {acc:.2%} at eps={e}" for e, acc in at.items() if e != certify.eps_key(result["eps"])
  )
  print(
    f"clean accuracy {result['clean_accuracy']:.2%}, certified accuracy "
    f"{result['certified_accuracy']:.2%} at eps={result['eps']:.4g}{others} "
    f"({result['bound_kind']}), mean pairwise Lipschitz "
    f"{result['mean_pairwise_lipschitz']:.4g}"
  )


def run(default_workdir: str) -> None:
  """``python -m experiments.<dataset>``: trains and certifies ``--config`` in ``--workdir``."""
  cli.run(
    main,
    workdir_default=default_workdir,
    workdir_help="Directory for checkpoints, metrics.jsonl and results.json; rerunning "
    "with the same one resumes.",
  )
