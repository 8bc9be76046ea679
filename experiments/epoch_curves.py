"""Certified accuracy, clean accuracy and the mean pairwise bound per epoch, runs side by side.

``python -m experiments.epoch_curves --config=experiments/configs/epoch_curves.py`` redraws
``docs/figures/mnist_epoch_curves.png`` from ``docs/figures/mnist_epoch_curves.json`` (the
per-epoch test records of the MNIST runs in docs/results.md, as ``metrics.jsonl`` logs them);
``--config.runs="('my run=runs/mnist',)"`` adds your own runs (their ``metrics.jsonl``) beside
them, ``--config.labels`` keeps only some, ``--config.output`` writes the PNG elsewhere.
"""

from __future__ import annotations

import json
import os

import ml_collections

from crmjax import plots, summary
from experiments import cli


def load_runs(c: ml_collections.ConfigDict) -> tuple[dict[str, list[dict]], dict]:
  """``(label -> per-epoch records, marks)``: the recorded runs, then ``c.runs``, filtered."""
  recorded = {"runs": {}, "marks": {}}
  if c.recorded:
    with open(c.recorded) as f:
      recorded = json.load(f)
  runs = dict(recorded["runs"])
  for spec in c.runs:
    label, sep, workdir = spec.partition("=")
    if not (sep and label and workdir):
      raise ValueError(f"--config.runs entry {spec!r}: write it as 'label=workdir'")
    path = os.path.join(workdir, summary.METRICS_FILE)
    runs[label] = summary.epoch_records(path)
    if not any(k.startswith("test/") for r in runs[label] for k in r):
      raise ValueError(
        f"{path} has no per-epoch test records: train with --config.eval_every_epochs=1"
      )
  if c.labels:
    unknown = sorted(set(c.labels) - set(runs))
    if unknown:
      raise ValueError(f"--config.labels: no run named {unknown}; the runs are {sorted(runs)}")
    runs = {label: runs[label] for label in c.labels}
  if not runs:
    raise ValueError("no runs to draw: give --config.recorded or --config.runs")
  return runs, recorded.get("marks", {})


def main(c: ml_collections.ConfigDict) -> None:
  runs, marks = load_runs(c)
  print("| run | last epoch | certified (estimate) | clean | mean pairwise L |")
  print("| --- | --- | --- | --- | --- |")
  for label, records in runs.items():
    last = records[-1] if records else {}
    cells = [
      f"{100 * last[k]:.2f}%" if k in last else "-"
      for k in ("test/certified_accuracy_estimate", "test/clean_accuracy")
    ]
    lip = last.get("test/mean_pairwise_lipschitz_estimate")
    cells.append("-" if lip is None else f"{lip:.4g}")
    print(f"| {label} | {last.get('epoch', '-')} | {' | '.join(cells)} |")
  plots.plot_epoch_curves(runs, c.output, marks=marks, title=c.title)
  print("wrote", c.output)


if __name__ == "__main__":
  cli.run(main, config_default="experiments/configs/epoch_curves.py")
