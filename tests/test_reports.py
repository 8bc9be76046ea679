"""The certification report (crmjax.reports, experiments/certify.py) on a tiny trained run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from crmjax import reports, train
from experiments.configs import certify as certify_config
from experiments.configs import mnist

REL = 1e-6


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A one-epoch MLP run on 128 MNIST images (MLP: every sound norm is exact and cheap)."""
  c = mnist.get_config("smoke")
  c.model = "MLP"
  c.train_subset, c.test_subset, c.batch_size, c.num_epochs = 128, 64, 32, 1
  c.crm.warmup_epochs, c.power_iters, c.eval_power_iters, c.sound_power_iters = 0, 2, 5, 20
  c.checkpoint_every_steps, c.progress_bar, c.sound_eval = 100, False, False
  path = str(tmp_path_factory.mktemp("run"))
  train.train_and_evaluate(c, path)
  return path


@pytest.fixture(scope="module")
def results(workdir):
  c = certify_config.get_config("smoke")
  c.test_subset, c.pgd_subset, c.pgd_batch_size, c.pgd_steps = 64, 64, 32, 5
  c.eps, c.power_iters, c.num_radii = 0.05, 5, 20  # a small eps: some points certify
  c.compare_workdir = workdir  # the run against itself: the same LipLT curve
  return reports.certify_run(c, workdir)


def test_results_json(workdir, results):
  with open(os.path.join(workdir, "certify", "results.json")) as f:
    stored = json.load(f)
  assert {"run", "table1", "table2", "figure1", "soundness_check"} <= stored.keys()
  assert {"clean_accuracy", "pgd_accuracy", "certified_accuracy", "eps",
          "bound_kind"} <= stored["table1"].keys()
  assert {"sound", "estimate", "kinds"} <= stored["table2"].keys()
  assert stored["table2"]["kinds"]["sound"]["liplt"]["pairwise"] == "guaranteed upper bound"
  assert "not guaranteed" in stored["table2"]["kinds"]["estimate"]
  check = stored["soundness_check"]
  assert check["points_attacked"] == 64 and check["violations"] == 0
  assert len(stored["figure1"]["eps"]) == 20
  curves = stored["figure1"]["curves"]
  assert list(curves) == ["CRM, naive", "CRM, LipLT", f"CRM ({os.path.basename(workdir)}), LipLT"]
  assert all(len(v) == 20 for v in curves.values())
  assert curves["CRM, LipLT"] == curves[stored["compare"]["label"]]


def test_table2_orderings(results):
  t = results["table2"]
  for kind in ("sound", "estimate"):
    for mode in ("pairwise", "per_class", "global"):
      assert t[kind]["liplt"][mode] <= t[kind]["naive"][mode] * (1 + REL), (kind, mode)
    for method in ("liplt", "naive"):
      v = t[kind][method]
      assert v["pairwise"] <= v["per_class"] * (1 + REL), (kind, method)
      assert v["pairwise"] <= v["global"] * (1 + REL), (kind, method)
  for method in ("liplt", "naive"):  # a sound bound is above the estimate
    assert t["estimate"][method]["pairwise"] <= t["sound"][method]["pairwise"] * (1 + REL)


def test_table1_orderings(results):
  t = results["table1"]
  assert t["num_pgd"] == t["num_test"] == 64
  assert 0 <= t["certified_accuracy"] <= t["pgd_accuracy"] <= t["clean_accuracy"] <= 1
  curve = results["figure1"]["curves"]["CRM, LipLT"]
  assert curve[0] <= t["clean_accuracy"]


def test_figure_png(results):
  png = results["figure1"]["png"]
  assert os.path.getsize(png) > 1000
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_certified_curve_hand_made():
  radii = np.array([0.0, 0.5, 1.0, 2.0])
  eps = reports.eps_grid(3.0, num=7)  # 0, .5, 1, 1.5, 2, 2.5, 3
  np.testing.assert_allclose(eps, [0, 0.5, 1, 1.5, 2, 2.5, 3])
  np.testing.assert_allclose(reports.certified_curve(radii, eps),
                             [0.75, 0.5, 0.25, 0.25, 0, 0, 0])
  assert reports.certified_curve(np.zeros(0), eps).tolist() == [0.0] * 7


def test_missing_checkpoint(tmp_path):
  empty = tmp_path / "no_run"
  with pytest.raises(FileNotFoundError, match="experiments.mnist"):
    reports.certify_run(certify_config.get_config("smoke"), str(empty))
  assert not empty.exists()  # nothing created
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.certify", "--config=experiments/configs/certify.py",
       f"--workdir={empty}"], capture_output=True, text=True, timeout=120,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode != 0
  assert "no checkpoint" in proc.stderr and "experiments.mnist" in proc.stderr
