"""Certify a trained run: Table 1 row, Table 2 and Figure 1 of the paper.

  python -m experiments.certify --config=experiments/configs/certify.py --workdir=runs/mnist \
      [--config.compare_workdir=runs/mnist_ce]

Loads the latest checkpoint of ``--workdir`` (model and eps from its training config),
prints the tables and writes ``<workdir>/certify/results.json`` and ``figure1.png``.
Certificates use the sound pairwise bounds; a certified point that PGD breaks stops the
run with ``SOUNDNESS BUG``. The pairwise LipLT certificate is also reported computed every
way (the power-iteration estimate, the former power-method sound bound, the Lanczos sound
bound, the sound bound of the optimised Theorem 3.2 rescaling), with each bound's wall
time, failure probability and key; ``--config.key=<int>`` reproduces a report's bounds.
The largest margin gradients at the attacked points show how tight the bound is, and the
most any global certificate of the network could certify (``--config.margin_gradients``).
"""

import ml_collections

from crmjax import report_text, reports
from experiments import cli


def main(config: ml_collections.ConfigDict, workdir: str) -> None:
  results = reports.certify_run(config, workdir)
  print(report_text.format_table1(results))
  print()
  print(report_text.format_certificates(results))
  print()
  print(report_text.format_table2(results))
  check = results["soundness_check"]
  print(
    f"\nsoundness check: {check['points_attacked']} points attacked, "
    f"{check['certified_liplt']} certified (LipLT), {check['pgd_broken']} broken by PGD, "
    f"{check['violations']} violations"
  )
  if results["margin_gradients"]:
    print(report_text.format_margin_gradients(results))
  if results["compare"]:
    c = results["compare"]
    print(
      f"compare: {c['label']}: clean {c['clean_accuracy']:.2%}, certified "
      f"{c['certified_accuracy']:.2%}"
    )
  print(f"wrote {results['figure1']['png']} and results.json next to it")


if __name__ == "__main__":
  cli.run(
    main,
    workdir_help="The training run's directory (with checkpoints/).",
    renamed={"power_iters": "eval_iters", "power_sound_iters": "baseline_sound_iters"},
  )
