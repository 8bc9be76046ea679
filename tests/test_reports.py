"""The certification report (crmjax.reports, experiments/certify.py) on a tiny trained run.

The report's sound bounds run with ``exact_max_dim=200``, so that the MLP's interior norms
(sides 256 and 784) are probabilistic: the Lanczos, power-method and refined certificates
then differ and each states its failure probability and key.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from crmjax import (
  attacks,
  checkpoint,
  config_schema,
  report_text,
  reports,
  runs,
  train,
  train_state,
)
from experiments.configs import certify as certify_config
from experiments.configs import mnist

REL = 1e-6


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A one-epoch MLP run on 128 MNIST images (MLP: every sound norm is exact and cheap)."""
  c = mnist.get_config("smoke")
  c.model = "MLP"
  c.train_subset, c.test_subset, c.batch_size, c.num_epochs = 128, 64, 32, 1
  c.crm.warmup_epochs, c.train_iters, c.eval_iters, c.sound_iters = 0, 2, 5, 20
  c.checkpoint_every_steps, c.progress_bar, c.sound_eval = 100, False, False
  path = str(tmp_path_factory.mktemp("run"))
  train.train_and_evaluate(c, path)
  return path


@pytest.fixture(scope="module")
def results(workdir):
  c = certify_config.get_config("smoke")
  c.test_subset, c.pgd_subset, c.pgd_batch_size, c.pgd_steps = 64, 64, 32, 5
  c.eps, c.eval_iters, c.num_radii = 0.05, 5, 20  # a small eps: some points certify
  c.compare_workdir = workdir  # the run against itself: the same LipLT curve
  c.exact_max_dim, c.sound_iters, c.key, c.extra_eps = 200, 40, 1234, (0.1,)
  c.refine_norms = "power"  # (the exact objective compiles for ~40 s)
  c.progress = False
  return reports.certify_run(c, workdir)


PROB = "upper bound with probability >= 0.999999"


def test_results_json(workdir, results):
  with open(os.path.join(workdir, "certify", "results.json")) as f:
    stored = json.load(f)
  assert {"run", "table1", "table2", "figure1", "soundness_check"} <= stored.keys()
  assert {"clean_accuracy", "pgd_accuracy", "certified_accuracy", "eps", "bound_kind"} <= stored[
    "table1"
  ].keys()
  assert {"sound", "estimate", "kinds", "sound_bounds"} <= stored["table2"].keys()
  assert stored["table2"]["kinds"]["sound"]["liplt"]["pairwise"] == PROB
  assert "not guaranteed" in stored["table2"]["kinds"]["estimate"]
  for method, info in stored["table2"]["sound_bounds"].items():
    assert info["key"] == 1234 and info["estimator"] == "lanczos", method
    assert info["probabilistic_norms"] > 0 and info["failure_probability"] == 1e-6
  check = stored["soundness_check"]
  assert check["points_attacked"] == 64 and check["violations"] == 0
  assert len(check["certificates_checked"]) == 4  # naive, LipLT, power method, refined
  assert len(stored["figure1"]["eps"]) == 20
  curves = stored["figure1"]["curves"]
  assert list(curves) == ["CRM, naive", "CRM, LipLT", f"CRM ({os.path.basename(workdir)}), LipLT"]
  assert all(len(v) == 20 for v in curves.values())
  assert curves["CRM, LipLT"] == curves[stored["compare"]["label"]]
  assert runs.load_run(workdir).scales is None  # trained without the rescaling


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


def test_certificates_every_way(results, capsys):
  """The pairwise LipLT certificate computed four ways, each stating what it is."""
  c = results["certificates"]
  assert list(c) == ["estimate", "sound_power", "sound_lanczos", "sound_refined"]
  assert c["sound_lanczos"]["certified_accuracy"] == results["table1"]["certified_accuracy"]
  assert c["sound_refined"]["certified_accuracy"] == results["table1"]["refined_certified_accuracy"]
  est = c["estimate"]
  assert "not guaranteed" in est["kind"] and est["num_iters"] == 5
  for name in ("sound_power", "sound_lanczos", "sound_refined"):
    row = c[name]
    assert row["kind"] == PROB and row["failure_probability"] == 1e-6 and row["key"] == 1234
    assert row["probabilistic_norms"] == 3 and row["exact_norms"] == 0 and row["seconds"] > 0
    assert row["mean_pairwise"] >= est["mean_pairwise"] * (1 - REL)  # sound >= estimate
    assert row["certified_accuracy"] <= est["certified_accuracy"] + 1e-12
    assert set(row["certified_accuracy_at"]) == {"0.05", "0.1"}
    assert row["certified_accuracy_at"]["0.05"] == row["certified_accuracy"]
  assert c["sound_power"]["estimator"] == "power" and c["sound_power"]["num_iters"] == 100
  assert c["sound_lanczos"]["estimator"] == "lanczos" and c["sound_lanczos"]["num_iters"] == 40
  assert c["sound_refined"]["rescaling"] == "given"
  assert c["sound_refined"]["scales"]["chosen"] in c["sound_refined"]["scales"]["candidates"]
  # Lanczos (40 steps) is tighter than the power method (100 iterations) at equal failure
  assert c["sound_lanczos"]["mean_pairwise"] < c["sound_power"]["mean_pairwise"]
  assert c["sound_lanczos"]["max_rel_err"] < c["sound_power"]["max_rel_err"]
  text = report_text.format_certificates(results)
  for name, label in report_text.CERTIFICATE_LABELS.items():
    assert (label in text) == (name in c), name  # the training D: runs trained with it
  assert "key 1234" in text and "at other radii" in text


def test_pgd_attack_runs_at_highest_precision(workdir):
  run = runs.load_run(workdir)
  attack = attacks.pgd_attack(run.model, run.state.params, eps=0.1, num_steps=2, num_restarts=1)
  x, y = np.zeros((2, 28, 28, 1), np.float32), np.zeros(2, np.int32)
  import jax  # pylint: disable=import-outside-toplevel

  text = attack.lower(x, y, jax.random.key(0)).as_text()
  dots = [l for l in text.splitlines() if "stablehlo.dot_general" in l]
  assert dots and all("HIGHEST" in l for l in dots)


def _pair_gradient_norms(run, images):
  """``||grad (z_i - z_j)||`` at each point ``(N, K, K)``: forward-mode Jacobians, differences
  formed explicitly in float64 (the report uses reverse mode and a Gram matrix)."""
  import jax  # pylint: disable=import-outside-toplevel

  f = lambda v: run.model.apply(run.params, v[None])[0]
  x = images.astype(np.float32) / 255
  with jax.default_matmul_precision("highest"):
    jac = np.asarray(jax.vmap(jax.jacfwd(f))(x), np.float64).reshape(len(x), 10, -1)
  return np.linalg.norm(jac[:, :, None] - jac[:, None, :], axis=-1)


def _radii(logits, labels, lip):
  """Eq. 5 in numpy with a ``(K, K)`` bound, or one per point ``(N, K, K)``."""
  lip = np.broadcast_to(lip, (len(labels), 10, 10))[np.arange(len(labels)), labels]
  margins = logits[np.arange(len(labels)), labels][:, None] - logits
  ratios = np.where(np.eye(10, dtype=bool)[labels], np.inf, margins / np.maximum(lip, 1e-12))
  return np.where(logits.argmax(1) == labels, np.maximum(ratios.min(1), 0), 0)


def test_margin_gradients_bound_the_sound_bound_from_below(workdir, results):
  """The report's margin gradients: below the sound LipLT bound on every pair (ratio >= 1),
  their ceiling between the certified and the clean accuracy, the first-order share at
  least the certified share; on the first ``pgd_subset`` points only, against an
  independent Jacobian and eq. 5 in numpy."""
  g, t = results["margin_gradients"], results["table1"]
  assert g["points"] == 64 and g["pairs_with_gradient"] == 45 and g["seconds"] > 0
  assert 1 <= g["bound_ratio"]["min"] <= g["bound_ratio"]["mean"] <= g["bound_ratio"]["max"]
  assert t["certified_accuracy"] <= g["ceiling_certified_accuracy"] <= t["clean_accuracy"]
  assert g["certified_accuracy"] == t["pgd_subset"]["certified_accuracy"]
  assert g["certified_accuracy"] <= g["first_order_accuracy"] <= t["clean_accuracy"]
  mean_bound = results["certificates"]["sound_lanczos"]["mean_pairwise"]
  assert g["mean_pairwise"] <= mean_bound
  text = report_text.format_margin_gradients(results)
  assert f"bound {100 * g['ceiling_certified_accuracy']:.2f}% of the 64 test points" in text
  assert f"> eps at {100 * g['first_order_accuracy']:.2f}% of the 64 points" in text
  run = runs.load_run(workdir)
  images, labels = runs.load_test(run, subset=64)
  logits = reports.certify.batched_logits(run.model, run.params, images, batch_size=64)
  per_point = _pair_gradient_norms(run, images[:16])
  want = per_point.max(0)
  c = certify_config.get_config("smoke")
  c.pgd_subset, c.progress = 16, False
  got = reports.margin_gradients(run, c, images, logits, labels, 2 * want, eps=0.05)
  np.testing.assert_allclose(got["mean_pairwise"], want[np.triu_indices(10, 1)].mean(), rtol=1e-4)
  assert got["points"] == 16
  np.testing.assert_allclose([got["bound_ratio"][k] for k in ("min", "max")], 2, rtol=1e-4)
  assert got["ceiling_certified_accuracy"] == (_radii(logits, labels, want) > 0.05).mean()
  first = (_radii(logits[:16], labels[:16], per_point) > 0.05).mean()
  assert got["first_order_accuracy"] == first
  assert got["certified_accuracy"] == (_radii(logits[:16], labels[:16], 2 * want) > 0.05).mean()
  c.margin_gradients = False
  assert reports.margin_gradients(run, c, images, logits, labels, want, eps=0.05) is None
  assert report_text.format_margin_gradients({"margin_gradients": None}) == ""


def test_figure_png(results):
  png = results["figure1"]["png"]
  assert os.path.getsize(png) > 1000
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_certified_curve_hand_made():
  radii = np.array([0.0, 0.5, 1.0, 2.0])
  eps = reports.eps_grid(3.0, num=7)  # 0, .5, 1, 1.5, 2, 2.5, 3
  np.testing.assert_allclose(eps, [0, 0.5, 1, 1.5, 2, 2.5, 3])
  np.testing.assert_allclose(reports.certified_curve(radii, eps), [0.75, 0.5, 0.25, 0.25, 0, 0, 0])
  assert reports.certified_curve(np.zeros(0), eps).tolist() == [0.0] * 7


def test_missing_checkpoint(tmp_path):
  empty = tmp_path / "no_run"
  with pytest.raises(FileNotFoundError, match="experiments.mnist"):
    reports.certify_run(certify_config.get_config("smoke"), str(empty))
  assert not empty.exists()  # nothing created
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.certify",
      "--config=experiments/configs/certify.py",
      f"--workdir={empty}",
    ],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  assert proc.returncode != 0
  assert "no checkpoint" in proc.stderr and "experiments.mnist" in proc.stderr


@pytest.mark.parametrize(
  "field,value,match",
  [
    ("refine_norms", "frobenius", r"--config\.refine_norms='frobenius' is invalid: use one of"),
    ("sound_estimator", "svd", r"--config\.sound_estimator='svd' is invalid: use one of"),
    ("pgd_subset", -1, r"--config\.pgd_subset=-1 is invalid: use an integer >= 0"),
    ("eval_batch_size", 0, r"--config\.eval_batch_size=0 is invalid"),
    ("failure_prob", 0.0, r"--config\.failure_prob=0\.0 is invalid: use a probability"),
  ],
)
def test_certify_refuses_a_bad_setting_before_reading_the_checkpoint(
  monkeypatch, field, value, match
):
  """Checked first: the message names the field, before any checkpoint is opened."""

  def load_run(workdir):
    raise AssertionError(f"the checkpoint of {workdir} was read before the config was checked")

  monkeypatch.setattr(runs, "load_run", load_run)
  c = certify_config.get_config("smoke")
  c[field] = value
  with pytest.raises(ValueError, match=match):
    reports.certify_run(c, "runs/any")


# new name -> the name in configs stored before the iteration counts were renamed
OLD_NAMES = {
  "train_iters": "power_iters",
  "eval_iters": "eval_power_iters",
  "sound_iters": "sound_power_iters",
}


def test_upgrade_config_renames_old_keys():
  old = {"model": "MLP", "power_iters": 3, "eval_power_iters": 7, "sound_power_iters": 50}
  assert config_schema.upgrade_config(old) == {
    "model": "MLP",
    "train_iters": 3,
    "eval_iters": 7,
    "sound_iters": 50,
  }
  assert "power_iters" in old  # not modified
  new = {"train_iters": 3, "eval_iters": 7, "sound_iters": 50}
  assert config_schema.upgrade_config(new) == new
  assert config_schema.upgrade_config({"power_iters": 1, "train_iters": 2}) == {"train_iters": 2}


def test_load_run_of_a_checkpoint_with_old_config_names(tmp_path):
  """A checkpoint whose meta['config'] has the old names loads with the new ones."""
  c = mnist.get_config("smoke")
  c.model = "MLP"
  model = train_state.make_model(c)
  state = train_state.create_state(model, train_state.make_optimizer(c, total_steps=1), c.seed)
  stored = json.loads(c.to_json_best_effort())
  for new, old in OLD_NAMES.items():
    stored[old] = stored.pop(new)
  meta = {"architecture": model.name, "dataset": c.dataset, "step": 1, "epoch": 0}
  with checkpoint.Checkpointer(tmp_path / "checkpoints") as ckpt:
    ckpt.save(1, state, {**meta, "step_in_epoch": 1, "config": stored})
  run = runs.load_run(str(tmp_path))
  for new, old in OLD_NAMES.items():
    assert run.config[new] == c[new] and old not in run.config, new
  assert reports._sound_iters(certify_config.get_config(), run) == c.sound_iters
