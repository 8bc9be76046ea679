"""Training with the bound of the rescaled network, D refreshed every N steps:
``config.rescaling``, ``refinement.refresh_scales``, ``train_step.make_refresh``."""

import logging
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crmjax import (
  certify,
  checkpoint,
  config_schema,
  models,
  report_text,
  reports,
  runs,
  soundness,
  train,
  train_state,
  train_step,
)
from experiments.configs import certify as certify_config
from tests import reference as ref
from tests import test_recipes
from tests.test_refinement import _mean_pairwise, _pairwise_lower, _rescaled_blocks


@pytest.fixture(autouse=True, scope="module")
def tiny_mlp():
  """``TinyMLP``: 784-16-12-10. Narrow layers, where the rescaling lowers the bound already
  at initialisation (at 784-256-256-10 the gain at init is within power-iteration noise)."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setitem(
      models.ARCHITECTURES, "TinyMLP", lambda num_classes=10: models.mlp(num_classes, (16, 12))
    )
    yield


def _config(every=3, **overrides):
  """``test_recipes``' tiny run (2 epochs of 4 steps, CRM from step 0) with ``TinyMLP``, D
  refreshed every ``every`` steps by cheap refreshes, the final certificate by the estimate."""
  c = test_recipes._tiny_config(model="TinyMLP", sound_eval=False, eval_every_epochs=0)
  for k, v in overrides.items():
    c[k] = v
  c.rescaling.update(
    every_steps=every, steps=5, step_iters=3, warmup_iters=20, final_iters=20, learning_rate=0.05
  )
  return c


def _stored(workdir, step, like):
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    got = ckpt.restore_extra("rescaling", like, step=step)
  return None if got is None else [np.asarray(a) for a in got]


def _log_d_like(config):
  model = train_state.make_model(config)
  return train_step.initial_log_scales(model, model.init(jax.random.key(0)))


def test_refreshed_bound_is_eq19_of_the_rescaled_net_sound_and_below_plain_liplt():
  """The train step's bound after a refresh equals the float64 eq. 19 of the rescaled
  matrices (``W <- D W``, ``G <- D^{-1}``), stays above every pair's Lipschitz constant
  (exact Jacobians at random points), is well below plain LipLT, and neither the step nor the
  refresh recompiles for a new D."""
  model = models.Model("tiny", models.mlp(num_classes=4, hidden=(12, 10)), (3, 3, 1))
  config = _config(every=2)
  config.rescaling.update(steps=20, step_iters=2, final_iters=50, learning_rate=0.01)
  rep, bat = train_state.make_mesh(jax.devices()[:1])
  tx = train_state.make_optimizer(config, 100)
  state = jax.device_put(train_state.create_state(model, tx, 0, init="torch"), rep)
  step = train_step.jit_step(
    chex.assert_max_traces(
      train_step.make_train_step(model, tx, config, regularized=True, steps_per_epoch=4), n=1
    ),
    rep,
    bat,
    extra=True,
  )
  refresh = train_step.jit_refresh(
    chex.assert_max_traces(train_step.make_refresh(model, config), n=1), rep
  )
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random((8, 3, 3, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 4, 8), jnp.int32)
  log_d = jax.device_put(train_step.initial_log_scales(model, state.params), rep)  # as the loop
  for i in range(2):  # two refreshes, two steps: one trace each
    params = jax.device_get(state.params)  # the step donates the state
    log_d, power, info = refresh(state.params, state.power, log_d)
    state, m = step(state.replace(power=power), x, y, log_d)
    blocks, Rm = ref.blocks_of(model.layers, params, model.input_shape)
    d = [np.exp(np.asarray(l, np.float64)) for l in log_d]
    plain = ref.liplt_reference(blocks, Rm, mode="pairwise")[0]
    rescaled = ref.liplt_reference(_rescaled_blocks(blocks, d), Rm, mode="pairwise")[0]
    # The step's mean pairwise bound is eq. 19 of the rescaled net (converged power vectors).
    np.testing.assert_allclose(float(m["lip"]), _mean_pairwise(rescaled), rtol=1e-4)
    np.testing.assert_allclose(float(info["objective"]), _mean_pairwise(rescaled), rtol=1e-4)
    off = ~np.eye(4, dtype=bool)
    low = _pairwise_lower(blocks, Rm, model.input_shape, num=500)
    assert np.all(low[off] <= rescaled[off]), (low / np.where(off, rescaled, 1)).max()
    # The refresh keeps the best of previous, AOL, D = I and the optimised D (at the first
    # refresh the optimised one; at the second the previous D may win: the per-step estimates
    # lag behind), well below plain LipLT (a refresh returning D = I, or a step ignoring D,
    # would fail).
    assert float(info["objective"]) == float(info["candidates"].min())
    assert i > 0 or int(info["chosen"]) == 3, info
    assert _mean_pairwise(rescaled) < 0.95 * _mean_pairwise(plain)
    assert [a.dtype for a in log_d] == [jnp.float32] * 2
    assert [a.shape for a in log_d] == [(12,), (10,)]


def _warmup_config(**overrides):
  """CE warm-up for the first epoch (4 steps), then CRM with D refreshed every 3 steps from
  the first CRM step: before steps 4 and 7; a checkpoint every step."""
  c = _config(every=3, checkpoint_every_steps=1, max_checkpoints=8, **overrides)
  c.crm.warmup_epochs = 1
  return c


class _Messages(logging.Handler):
  def __init__(self):
    super().__init__(logging.WARNING)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def warmup_run(tiny_mlp, tmp_path_factory):
  """The uninterrupted ``_warmup_config`` run (shared): ``(workdir, result, jax compile logs)``."""
  workdir, handler, logger = tmp_path_factory.mktemp("full"), _Messages(), logging.getLogger("jax")
  level = logger.level
  logger.addHandler(handler)
  logger.setLevel(logging.WARNING)
  try:
    with jax.log_compiles():
      result = train.train_and_evaluate(_warmup_config(), str(workdir))
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)
  return str(workdir), result, handler.messages


def test_d_changes_only_at_refresh_steps_and_each_function_compiles_once(warmup_run):
  """The checkpoint of every step holds the D its last step used: D = I through the CE
  warm-up, then the refresh of step 4, then that of step 7. The CE and CRM steps and the
  refresh compile once each (two refreshes)."""
  tmp_path, result, messages = warmup_run
  config = _warmup_config()
  assert result["step"] == 8
  assert len([m for m in messages if m.startswith("Compiling jit(train_step)")]) == 2, messages
  assert len([m for m in messages if m.startswith("Compiling jit(refresh_scales)")]) == 1
  like = _log_d_like(config)
  ds = {s: _stored(tmp_path, s, like) for s in range(1, 9)}
  zero = [np.zeros_like(a) for a in ds[1]]
  same = lambda a, b: all(np.array_equal(u, v) for u, v in zip(a, b))
  for s in (1, 2, 3, 4):  # the CE warm-up: D = I, never refreshed
    assert same(ds[s], zero), s
  assert not same(ds[5], zero) and same(ds[5], ds[6]) and same(ds[6], ds[7])
  tb = test_recipes._tb_scalars(tmp_path)
  assert [s for s, _ in tb["rescaling/objective"]] == [4, 7]
  for (_, value), (_, plain) in zip(tb["rescaling/objective"], tb["rescaling/plain"]):
    assert value <= plain
  # The refresh at 7 changed D unless it kept the previous one (candidate 0).
  assert same(ds[8], ds[7]) == (tb["rescaling/chosen"][1][1] == 0)
  assert [train_step.refreshes_at(s, every=3, first=4) for s in range(9)] == [
    False,
    False,
    False,
    False,
    True,
    False,
    False,
    True,
    False,
  ]


def _final(workdir, config):
  model = train_state.make_model(config)
  tx = train_state.make_optimizer(config, 8, steps_per_epoch=4)
  state = train_state.create_state(model, tx, 0)
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    state, meta = ckpt.restore(state)
  assert meta["step"] == 8
  return jax.device_get(state), _stored(workdir, 8, _log_d_like(config))


def test_final_and_epoch_evaluations_certify_with_the_training_d(warmup_run):
  """The final evaluation bounds each pair by the smaller of the plain bound and that of the
  training D (both valid): on ``TinyMLP``, where D lowers the bound, its bound is that of
  ``certify.evaluate`` with the stored D and below the plain one; the per-epoch estimate
  does the same, and with D = I it is the plain estimate."""
  workdir, result, _ = warmup_run
  config = _warmup_config()
  state, log_d = _final(workdir, config)
  job = train._make_job(config)
  params, kw = train_state.eval_params(state), dict(eps=config.eps, sound=None, eval_iters=5)
  args = (job.model, params, state.power, *job.test)
  plain = certify.evaluate(*args, **kw)["estimate_mean_pairwise_lipschitz"]
  scaled = certify.evaluate(*args, scales=[np.exp(l) for l in log_d], **kw)
  assert result["estimate_mean_pairwise_lipschitz"] == scaled["estimate_mean_pairwise_lipschitz"]
  assert result["estimate_mean_pairwise_lipschitz"] < 0.99 * plain
  assert result["certified_accuracy"] == scaled["certified_accuracy"]
  epoch_eval = train.make_epoch_eval(job.model, config, *job.test)
  key = "test/mean_pairwise_lipschitz_estimate"
  with_d, without = epoch_eval(state, log_d)[key], epoch_eval(state)[key]
  assert with_d < 0.99 * without
  assert epoch_eval(state, [np.zeros_like(l) for l in log_d])[key] == without


def test_resume_with_refreshed_rescaling_is_bitwise(warmup_run, tmp_path):
  """Stopped at step 5 (the D of the refresh at 4 in the checkpoint) and resumed: the same
  params, power vectors, optimiser state and D as the uninterrupted run. Without the stored
  D, steps 5 and 6 would use D = I and the runs would differ."""
  full, full_result, _ = warmup_run
  part = str(tmp_path / "part")
  assert train.train_and_evaluate(_warmup_config(stop_after_steps=5), part)["stopped"]
  like = _log_d_like(_warmup_config())
  assert any(np.abs(x).max() > 0 for x in _stored(part, 5, like))
  resumed = train.train_and_evaluate(_warmup_config(), part)
  assert [(r["epoch"], r["step"]) for r in test_recipes._records(part)[:-1]] == [
    (1, 4),
    (2, 5),
    (2, 8),
  ]
  for key in ("clean_accuracy", "certified_accuracy", "mean_pairwise_lipschitz"):
    assert resumed[key] == full_result[key], key
  (a, da), (b, db) = _final(full, _warmup_config()), _final(part, _warmup_config())
  chex.assert_trees_all_equal(a, b)
  chex.assert_trees_all_equal(da, db)


def test_checkpoint_without_rescaling_restores_and_resumes_with_it(tmp_path, caplog):
  """A checkpoint written with the rescaling off (the format of every checkpoint before it
  existed: no ``rescaling`` item, the same TrainState) restores; the run continues with
  D = I until the next refresh (step 6) and then stores its D."""
  work = str(tmp_path)
  assert train.train_and_evaluate(_config(every=0, stop_after_steps=5), work)["stopped"]
  assert not os.path.exists(os.path.join(work, "checkpoints", "5", "rescaling"))
  assert sorted(os.listdir(os.path.join(work, "checkpoints", "5"))) == [
    "_CHECKPOINT_METADATA",
    "commit_success.txt",
    "meta",
    "state",
  ]
  with caplog.at_level(logging.INFO, logger="crmjax.train"):
    result = train.train_and_evaluate(_config(every=3), work)
  assert result["step"] == 8
  assert "resumed from step 5" in caplog.text and "holds no rescaling D" in caplog.text
  (_, d8) = _final(work, _config())
  assert any(np.abs(x).max() > 0 for x in d8)  # refreshed at step 6
  assert [s for s, _ in test_recipes._tb_scalars(tmp_path)["rescaling/objective"]] == [6]


@pytest.mark.parametrize(
  "setting,match",
  [
    ({"rescaling.every_steps": -1}, r"--config\.rescaling\.every_steps=-1 is invalid: use an int"),
    ({"bound": "liplt_aol"}, r"--config\.bound='liplt_aol' is invalid: .*--config\.bound=liplt"),
    ({"bound": "naive"}, r"--config\.bound='naive' is invalid"),
    ({"loss": "ce"}, r"rescaling\.every_steps=3 is invalid: --config\.loss=ce uses no bound"),
    ({"rescaling.steps": -1}, r"--config\.rescaling\.steps=-1 is invalid: use an integer >= 0"),
    ({"rescaling.step_iters": 0}, r"rescaling\.step_iters=0 is invalid: use an integer >= 1"),
    ({"rescaling.final_iters": 0}, r"rescaling\.final_iters=0 is invalid"),
    ({"rescaling.warmup_iters": True}, r"rescaling\.warmup_iters=True is invalid: use an int"),
    ({"rescaling.learning_rate": 0.0}, r"rescaling\.learning_rate=0\.0 is invalid: use a pos"),
  ],
)
def test_invalid_rescaling_config_is_refused_with_the_field_and_the_fix(setting, match):
  config = _config(every=3)
  for field, value in setting.items():
    group, _, name = field.rpartition(".")
    (config[group] if group else config)[name] = value
  with pytest.raises(ValueError, match=match):
    config_schema.validate_config(config, num_devices=1)
  # Off (the default), the other rescaling settings and the bound are not constrained.
  config.rescaling.every_steps = 0
  config_schema.validate_config(config, num_devices=1)


def test_certify_report_checks_the_training_d_certificate_against_pgd(warmup_run):
  """``experiments.certify`` of a run trained with the rescaling restores its last D and
  certifies with the per-pair minimum of the plain bound and that of D: the minimum of two
  independently computed sound bounds, below the plain one, and checked by PGD."""
  workdir, _, _ = warmup_run
  run = runs.load_run(workdir)
  _, log_d = _final(workdir, _warmup_config())
  for got, want in zip(run.scales, log_d):
    np.testing.assert_array_equal(got, np.exp(want))
  c = certify_config.get_config("smoke")
  c.test_subset, c.pgd_subset, c.pgd_batch_size, c.pgd_steps, c.eps = 64, 64, 32, 5, 0.05
  c.refine, c.compare_power, c.progress, c.key, c.exact_max_dim = False, False, False, 7, 200
  results = reports.certify_run(c, workdir)
  row = results["certificates"]["sound_training_d"]
  net = run.model.lipnet(run.params)
  plain, _ = soundness.sound_bound(net, mode="pairwise")
  scaled, _ = soundness.sound_bound(net, scales=run.scales, mode="pairwise")
  assert row["mean_pairwise"] == pytest.approx(certify.mean_pairwise(np.minimum(plain, scaled)))
  assert row["mean_pairwise"] < 0.99 * results["certificates"]["sound_lanczos"]["mean_pairwise"]
  assert row["kind"] == "guaranteed upper bound"
  t = results["table1"]
  assert t["training_d_certified_accuracy"] == row["certified_accuracy"]
  assert t["training_d_certified_accuracy"] >= t["certified_accuracy"]
  check = results["soundness_check"]
  assert "sound_training_d pairwise liplt bound" in check["certificates_checked"]
  assert check["violations"] == 0
  assert "training D: mean L_ij" in report_text.format_certificates(results)
