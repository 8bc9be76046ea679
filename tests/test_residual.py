"""Residual networks end to end (experiments.residual): train, certify with both bounds."""

import json

import numpy as np

from experiments import residual
from experiments.configs import residual as residual_config


def test_residual_run_trains_and_certifies_with_both_sound_bounds(tmp_path):
  config = residual_config.get_config("smoke")
  config.train_bounds = ("liplt",)
  assert config.models == ("ResMLP",)  # the experiment runs Res4C3F and CtrlConv
  config.train.train_subset, config.train.test_subset, config.train.batch_size = 64, 64, 32
  rows = residual.run(config, str(tmp_path))
  assert [(r["trained_with"], r["certified_with"]) for r in rows] == [
    ("liplt", "naive"),
    ("liplt", "liplt"),
  ]
  naive, lip = rows
  assert naive["model"] == "ResMLP" and naive["clean_accuracy"] == lip["clean_accuracy"]
  # Same params, two guaranteed bounds: on a residual net the naive product
  # prod_k (||H_k|| + ||G_k|| ||W_k||) is looser than LipLT, so LipLT's radii are larger
  # and it certifies at least as much.
  assert lip["mean_pairwise_lipschitz"] * 1.2 < naive["mean_pairwise_lipschitz"]
  assert lip["mean_certified_radius"] >= naive["mean_certified_radius"]
  assert lip["certified_accuracy"] >= naive["certified_accuracy"]
  assert "upper bound" in lip["bound_kind"]  # sound, not the power-iteration estimate
  stored = json.loads((tmp_path / "residual.json").read_text())
  assert stored == rows
  table = residual.format_table(rows).splitlines()
  assert len(table) == 2 + len(rows) and "| ResMLP | liplt | naive |" in table[2]
  assert np.isfinite([r["mean_pairwise_lipschitz"] for r in rows]).all()
