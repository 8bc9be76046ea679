"""Per-epoch test curves (``crmjax.summary.epoch_records`` / ``crmjax.plots.plot_epoch_curves``,
``experiments.epoch_curves``) and the committed records they redraw."""

import json
import os

import pytest

from crmjax import plots, summary
from experiments import epoch_curves
from experiments.configs import epoch_curves as epoch_curves_config
from tests.test_cli import _run
from tests.test_train import ROOT

RECORDED = os.path.join(ROOT, "docs", "figures", "mnist_epoch_curves.json")


def _write_metrics(workdir, records):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, summary.METRICS_FILE), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)


def test_epoch_records_keep_the_last_record_of_each_epoch_in_epoch_order(tmp_path):
  first = {"epoch": 2, "step": 8, "test/clean_accuracy": 0.5}
  resumed = {"epoch": 2, "step": 10, "test/clean_accuracy": 0.6}  # the epoch, logged again
  _write_metrics(
    tmp_path,
    [{"epoch": 1, "step": 5}, first, {"epoch": 3, "step": 15}, resumed, {"final": {"a": 1}}],
  )
  records = summary.epoch_records(str(tmp_path / summary.METRICS_FILE))
  assert [r["epoch"] for r in records] == [1, 2, 3]
  assert records[1] == resumed
  with pytest.raises(FileNotFoundError, match="give the workdir of a training run"):
    summary.epoch_records(str(tmp_path / "nowhere" / summary.METRICS_FILE))


def test_load_runs_adds_runs_from_their_workdirs_and_keeps_the_labels_order(tmp_path):
  _write_metrics(tmp_path / "a=1", [{"epoch": 1, "test/clean_accuracy": 0.9}])
  c = epoch_curves_config.get_config()
  c.recorded, c.runs = RECORDED, (f"mine={tmp_path / 'a=1'}",)  # the first '=' splits
  runs, marks = epoch_curves.load_runs(c)
  assert runs["mine"] == [{"epoch": 1, "test/clean_accuracy": 0.9}]
  assert epoch_curves_config.MAIN_RUN in runs and "test/clean_accuracy" in marks
  c.labels = ("mine", epoch_curves_config.MAIN_RUN)
  runs, marks = epoch_curves.load_runs(c)
  assert list(runs) == list(c.labels)
  # 'mine' has no certified accuracy or bound: those panels draw the other run alone.
  plots.plot_epoch_curves(runs, str(tmp_path / "p.png"), marks=marks)
  assert (tmp_path / "p.png").stat().st_size > 10_000
  c.labels = ("typo",)
  with pytest.raises(ValueError, match=r"no run named \['typo'\]"):
    epoch_curves.load_runs(c)
  c.labels, c.runs = (), ("no-separator",)
  with pytest.raises(ValueError, match="'label=workdir'"):
    epoch_curves.load_runs(c)
  _write_metrics(tmp_path / "b", [{"epoch": 1, "train/loss": 0.3}])  # eval_every_epochs=0
  c.runs = (f"b={tmp_path / 'b'}",)
  with pytest.raises(ValueError, match="no per-epoch test records: train with"):
    epoch_curves.load_runs(c)
  c.recorded, c.runs = "", ()
  with pytest.raises(ValueError, match="no runs to draw"):
    epoch_curves.load_runs(c)


def test_recorded_runs_are_per_epoch_test_records_ending_as_the_results_say():
  with open(RECORDED) as f:
    recorded = json.load(f)
  keys = {panel[0] for panel in plots.EPOCH_PANELS}
  for label, records in recorded["runs"].items():
    epochs = [r["epoch"] for r in records]
    assert epochs == sorted(set(epochs)) and epochs[0] >= 1, label
    for r in records:
      assert keys <= set(r), (label, r)
      assert 0 < r["test/certified_accuracy_estimate"] < r["test/clean_accuracy"] <= 1, label
  # Each run's last epoch against the figures docs/results.md quotes (rounded there):
  # (epoch, certified estimate %, clean %, mean pairwise L).
  last = {
    label: (
      r["epoch"],
      round(100 * r["test/certified_accuracy_estimate"], 1),
      round(100 * r["test/clean_accuracy"], 1),
      r["test/mean_pairwise_lipschitz_estimate"],
    )
    for label, (*_, r) in recorded["runs"].items()
  }
  assert last[epoch_curves_config.MAIN_RUN] == (20, 60.6, 95.8, 11.2)
  assert sorted(last.values()) == [
    (20, 51.7, 93.5, 8.1),
    (20, 54.1, 94.2, 7.4),
    (20, 57.4, 95.3, 8.6),
    (20, 60.4, 96.0, 19.201967239379883),  # the main command: the bound on one step in 5
    (20, 60.6, 95.8, 11.2),
    (20, 60.7, 96.3, 20.871105194091797),  # the main command at soft-min temperature 20
    (20, 60.8, 95.8, 10.991923332214355),  # the batch-32 run made again, unrounded
    (20, 60.8, 96.0, 16.292139053344727),  # the bound on one step in 4, raw weights
    (20, 60.9, 96.0, 16.338754653930664),  # the same at the moving average
    (20, 61.2, 95.9, 10.281839370727539),  # 4 Lanczos products every step (results.md)
    (20, 61.4, 95.9, 10.36574649810791),  # the same at the moving average
    (20, 61.5, 96.2, 11.586722373962402),  # the same at soft-min temperature 20
    (20, 61.6, 95.9, 10.831128120422363),  # every step at batch 16
    (20, 61.8, 96.3, 12.493124961853027),  # the same at temperature 20 and the moving average
    (
      20,
      62.0,
      96.4,
      10.990551948547363,
    ),  # the main command since 2026-12-07, evening: a second seed
    (20, 62.1, 96.3, 11.309893608093262),  # the same with a 1.4e-3 peak learning rate
    (60, 61.8, 96.2, 10.0),
    (60, 62.3, 96.3, 13.820914268493652),  # the 60-epoch run of today's recipe
    (60, 62.5, 96.2, 10.75844955444336),  # the 60-epoch batch-32 run, unrounded
    (60, 62.6, 96.6, 15.010294914245605),  # the 60-epoch run at temperature 20
    (60, 62.9, 96.7, 10.961478233337402),  # batch 16, a 1.4e-3 peak, the bound on one step in 2
    (60, 63.1, 96.5, 10.758996963500977),  # temperature 20 with the bound every step
  ]
  assert recorded["marks"]["test/certified_accuracy_estimate"]["paper, 400 epochs (sound)"] == 63.37


def test_the_command_draws_the_smoke_run_and_refuses_a_bad_run_in_one_line(tmp_path):
  png = tmp_path / "curves.png"
  config = "--config=experiments/configs/epoch_curves.py:smoke"
  out = _run("experiments.epoch_curves", config, f"--config.output={png}")
  assert out.returncode == 0, out.stderr
  assert f"| {epoch_curves_config.MAIN_RUN} | 20 | 60.60% | 95.80% | 11.2 |" in out.stdout
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  out = _run(
    "experiments.epoch_curves",
    config,
    f"--config.runs=('x={tmp_path / 'none'}',)",
    "--config.labels=()",
  )
  assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith("error: no ")
  assert "metrics.jsonl" in out.stderr and "Traceback" not in out.stderr
