"""The speed benchmark on a tiny setting: every column is measured, JSON and tables agree."""

import json
import math

import pytest

from experiments import benchmark
from experiments.configs import benchmark as benchmark_config


def _tiny_config(output, **overrides):
  c = benchmark_config.get_config("smoke")
  c.models = ("MLP",)
  c.batch_size, c.steps, c.warmup_steps = 8, 2, 1
  c.power_iters["MLP"] = 1
  c.depth_sweep = True
  c.sweep.depths, c.sweep.width, c.sweep.input_shape = (2,), 4, (8, 8, 1)
  c.output = str(output)
  for k, v in overrides.items():
    c[k] = v
  return c


def test_benchmark_writes_every_column_with_consistent_ratios(tmp_path, capsys):
  path = tmp_path / "bench.json"
  returned = benchmark.run_benchmark(_tiny_config(path))
  with open(path) as f:
    result = json.load(f)
  assert result == json.loads(json.dumps(returned))
  assert result["columns"] == list(benchmark.COLUMNS)
  (row,) = result["models"]
  assert row["model"] == "MLP" and row["batch_size"] == 8 and row["power_iters"] == 1
  for column in benchmark.COLUMNS:
    assert row["ms"][column] > 0, column
    assert row["compile_s"][column] > 0, column
    assert len(row["steps_ms"][column]) == 2 and min(row["steps_ms"][column]) > 0
  ms = row["ms"]
  assert math.isclose(row["crm_ce_ratio"], ms["crm_liplt"] / ms["ce"], rel_tol=1e-12)
  assert math.isclose(row["samples_per_s_crm"], 8 / (ms["crm_liplt"] / 1e3), rel_tol=1e-12)
  assert row["peak_memory_bytes"] is None or row["peak_memory_bytes"] > 0

  depths = [r["depth"] for r in result["depth_sweep"]]
  assert depths == [2]
  for r in result["depth_sweep"]:
    assert r["table_products"] == benchmark.table_products(r["depth"])
    for method in ("liplt", "naive"):
      assert r[method]["ms"] > 0
      assert math.isclose(r[method]["ms_per_layer"], r[method]["ms"] / r["depth"])
      assert r[method]["hlo_convolutions"] >= r["depth"]

  out = capsys.readouterr().out
  assert "| model, power iterations | cross-entropy step | CRM step, LipLT |" in out
  assert "| MLP (batch 8), 1 it |" in out
  assert "| layers L | LipLT bound | LipLT ms/L |" in out
  assert f"{row['crm_ce_ratio']:.2f}x" in out


def test_table_products_counts_the_in_flight_vectors_of_each_layer():
  # layer i pushes (L - i) ends x (i + 1) starts through W_i
  assert [benchmark.table_products(n) for n in (1, 2, 3, 4)] == [1, 4, 10, 20]


def test_skipped_columns_are_none_and_printed_as_skipped(tmp_path, capsys):
  config = _tiny_config(tmp_path / "b.json", depth_sweep=False)
  config.skip["MLP"] = ("crm_liplt", "crm_liplt_1it", "crm_naive", "liplt_bound")
  (row,) = benchmark.run_benchmark(config)["models"]
  assert row["ms"]["ce"] > 0
  assert all(row["ms"][c] is None for c in config.skip["MLP"])
  assert row["crm_ce_ratio"] is None and row["samples_per_s_crm"] is None
  assert "skipped" in capsys.readouterr().out


def test_unknown_model_or_column_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="unknown model"):
    benchmark.run_benchmark(_tiny_config(tmp_path / "b.json", models=("VGG",)))
  config = _tiny_config(tmp_path / "b.json")
  config.skip["MLP"] = ("bogus",)
  with pytest.raises(ValueError, match="unknown columns"):
    benchmark.run_benchmark(config)
