"""The speed benchmark on a tiny setting: every column is measured, JSON and tables agree."""

import json
import math

import chex
import jax
import numpy as np
import pytest

from crmjax import train_state
from experiments import benchmark, timing
from experiments.configs import benchmark as benchmark_config


def _tiny_config(output, **overrides):
  c = benchmark_config.get_config("smoke")
  c.models = ("MLP",)
  c.batch_size, c.steps, c.warmup_steps = 8, 2, 1
  c.train_iters["MLP"], c.train_solvers["MLP"] = 1, "lanczos"
  c.bound_every["MLP"] = 1  # the bound every step (the cycle has its own test)
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
  assert row["model"] == "MLP" and row["batch_size"] == 8 and row["train_iters"] == 1
  assert row["train_solver"] == "lanczos"
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
  assert "| model, iterations per step | cross-entropy step | CRM step, LipLT |" in out
  assert "| MLP (batch 8), 1 Lanczos it |" in out
  assert "| layers L | LipLT bound | LipLT ms/L |" in out
  assert f"{row['crm_ce_ratio']:.2f}x" in out


def test_a_bound_every_n_steps_column_is_timed_per_step_of_its_cycle(tmp_path, capsys, monkeypatch):
  """With ``bound_every['MLP'] = 3`` the CRM column times one jitted 3-step cycle (the step
  that computes the bound and two reusing it: the power vectors advance once) and reports a
  third of its time; the row's label says so."""
  config = _tiny_config(tmp_path / "b.json", depth_sweep=False)
  config.bound_every["MLP"] = 3
  config.skip["MLP"] = ("crm_liplt_1it", "crm_naive", "liplt_bound")
  (row,) = benchmark.run_benchmark(config)["models"]
  assert row["bound_every_steps"] == 3
  assert "| MLP (batch 8), 1 Lanczos it, bound every 3 steps |" in capsys.readouterr().out

  setup = benchmark.make_setup(benchmark.paper_model("MLP"), config, jax.devices(), batch_size=8)
  cycles, real = [], timing.measure

  def spy(*args, **kwargs):
    result = real(*args, **kwargs)
    cycles.append(dict(result))  # a copy: the column divides the returned one
    return result

  monkeypatch.setattr(timing, "measure", spy)
  column = benchmark.step_column(
    setup, config, regularized=True, bound="liplt", train_iters=1, bound_every=3
  )
  (cycle,) = cycles
  assert column["ms"] == pytest.approx(cycle["ms"] / 3)
  np.testing.assert_allclose(column["steps_ms"], np.asarray(cycle["steps_ms"]) / 3)

  tc = benchmark.train_config(config, bound="liplt", train_iters=1, batch_size=8, bound_every=3)
  make = lambda **kw: benchmark.train_step.make_train_step(
    setup.model, setup.tx, tc, regularized=True, steps_per_epoch=1000, **kw
  )
  after_cycle, metrics = jax.jit(benchmark.bound_cycle(make(), make(stale=True), 3))(
    benchmark._copy(setup.state), setup.images, setup.labels
  )
  after_one, _ = jax.jit(make())(benchmark._copy(setup.state), setup.images, setup.labels)
  assert int(after_cycle.step) == 3 and "pairwise_bound" not in metrics
  chex.assert_trees_all_close(after_cycle.power, after_one.power, rtol=1e-6)


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


def test_random_state_is_shaped_like_create_state_with_fresh_optimizer_state():

  model = benchmark.paper_model("MLP")
  config = benchmark_config.get_config()
  tx = train_state.make_optimizer(
    benchmark.train_config(config, bound="liplt", train_iters=1, batch_size=8), 10
  )
  state = benchmark.random_state(model, tx, 0)
  want = jax.eval_shape(lambda: train_state.create_state(model, tx, 0))
  assert jax.tree.structure(state) == jax.tree.structure(want)
  for got, ref in zip(jax.tree.leaves(state), jax.tree.leaves(want)):
    assert got.shape == ref.shape and got.dtype == ref.dtype
  # Adam's state is what tx.init gives these params (zero moments and count)
  for got, ref in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(tx.init(state.params))):
    np.testing.assert_array_equal(got, ref)
  kernels = [k for k in jax.tree.leaves(state.params) if k.ndim == 2]
  assert kernels and all(np.std(k) > 0 for k in kernels)
  for rows in jax.tree.leaves(state.power):  # unit starting vectors
    np.testing.assert_allclose(np.linalg.norm(rows.reshape(len(rows), -1), axis=1), 1, rtol=1e-5)


def test_models_take_their_shapes_from_their_dataset():
  from crmjax import data
  from experiments.configs import cifar, mnist_fast, tiny_imagenet

  for config in (mnist_fast.get_config(), cifar.get_config(), tiny_imagenet.get_config()):
    want = (config.dataset, config.train_iters, config.train_solver, config.bound_every_steps)
    assert benchmark_config.MODELS[config.model] == want
  for name, (dataset, *_) in benchmark_config.MODELS.items():
    model, info = benchmark.paper_model(name), data.dataset_info(dataset)
    assert model.input_shape == info.image_shape and model.num_classes == info.num_classes


def test_a_run_stopped_mid_way_keeps_the_rows_measured(tmp_path, monkeypatch):
  def stopped(*args, **kwargs):
    raise KeyboardInterrupt  # what a time limit's signal does, in effect

  monkeypatch.setattr(benchmark, "sweep_depth", stopped)
  config = _tiny_config(tmp_path / "b.json")
  config.skip["MLP"] = ("crm_liplt", "crm_liplt_1it", "crm_naive", "liplt_bound")
  with pytest.raises(KeyboardInterrupt):
    benchmark.run_benchmark(config)
  partial = json.loads((tmp_path / "b.json").read_text())
  assert partial["complete"] is False and partial["depth_sweep"] == []
  (row,) = partial["models"]
  assert row["model"] == "MLP" and row["ms"]["ce"] > 0


def test_time_steps_threads_outputs_into_the_next_call_and_times_after_warmup():
  seen = []

  def fn(x):
    seen.append(x)
    return x + 1

  times = timing.time_steps(fn, (0,), lambda args, out: (out,), steps=3, warmup=2)
  assert seen == [0, 1, 2, 3, 4] and len(times) == 3 and min(times) >= 0
  assert timing.time_steps(fn, (7,), steps=2, warmup=0) and seen[-2:] == [7, 7]
  with pytest.raises(ValueError, match="steps"):
    timing.time_steps(fn, (0,), steps=0, warmup=0)


def test_default_settings_time_the_recipe_batch_too():
  """The default run times each model at batch 512 and at the fast MNIST recipe's batch 32
  (where the bound is the largest share of a step); the smoke run at its one batch."""
  from experiments.configs import mnist_fast

  config = benchmark_config.get_config()
  assert config.small_batch_size == mnist_fast.get_config().batch_size == 32
  assert benchmark.model_batches("4C3F", config) == [512, 32]
  assert benchmark.model_batches("6C2F", config) == [512, 32]
  config.batch_size = 32
  assert benchmark.model_batches("4C3F", config) == [32]
  assert benchmark.model_batches("4C3F", benchmark_config.get_config("smoke")) == [64]


def test_breakdown_times_each_part_of_the_bound(tmp_path, capsys):
  config = _tiny_config(tmp_path / "bench.json", breakdown=True, depth_sweep=False)
  (row,) = benchmark.run_benchmark(config)["models"]
  for column in benchmark.BREAKDOWN:
    assert row["ms"][column] > 0, column
  out = capsys.readouterr().out
  for column in benchmark.BREAKDOWN[1:]:
    assert benchmark.HEADERS[column] in out
