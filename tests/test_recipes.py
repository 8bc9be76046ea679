"""Training-recipe options: init scheme, learning-rate schedules, AdamW, clipping, penalty
normalisation, per-epoch test curves, and TensorBoard events."""

import json
import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crmjax import checkpoint, config_schema, losses, models, train, train_state
from tests import test_train


def _tiny_config(**overrides):
  """``test_train``'s tiny MLP run (2 epochs of 4 steps), with CRM from the first step."""
  c = test_train._tiny_config(**overrides)
  c.crm.warmup_epochs = 0
  return c


# ------------------------------------------------------------------------ initialisation


def test_torch_init_is_uniform_with_bound_one_over_sqrt_fan_in():
  model = models.get_model("4C3F", input_shape=(28, 28, 1), num_classes=10)
  params = model.init(jax.random.key(0), scheme="torch")
  fan_in = {
    "layer_0": 3 * 3 * 1,
    "layer_2": 4 * 4 * 32,
    "layer_4": 3 * 3 * 32,
    "layer_6": 4 * 4 * 64,
    "layer_9": 7 * 7 * 64,
    "layer_11": 512,
    "layer_13": 512,
  }
  assert set(params) == set(fan_in)
  for name, n in fan_in.items():
    kernel, bias = np.asarray(params[name]["kernel"]), np.asarray(params[name]["bias"])
    bound = 1 / math.sqrt(n)
    assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound, name
    # U(-b, b): std b / sqrt(3); more than 1000 draws in every kernel.
    np.testing.assert_allclose(kernel.std(), bound / math.sqrt(3), rtol=0.1, err_msg=name)
    assert np.abs(kernel).max() > 0.9 * bound and bias.std() > 0, name
  flax = model.init(jax.random.key(0))
  assert all(float(jnp.abs(flax[k]["bias"]).max()) == 0 for k in flax)  # Flax: zero biases
  # Same key, same params; another key, others.
  again = model.init(jax.random.key(0), scheme="torch")
  chex.assert_trees_all_equal(params, again)
  other = model.init(jax.random.key(1), scheme="torch")
  assert not np.array_equal(other["layer_0"]["kernel"], params["layer_0"]["kernel"])


def test_torch_init_reaches_nested_residual_params_and_refuses_unknown_schemes():
  model = models.get_model("Res4C3F", input_shape=(28, 28, 1), num_classes=10)
  params = model.init(jax.random.key(0), scheme="torch")
  inner = params["layer_2"]["layer_0"]
  assert float(jnp.abs(inner["bias"]).max()) > 0  # redrawn (Flax's bias is 0)
  assert float(jnp.abs(inner["kernel"]).max()) <= 1 / math.sqrt(3 * 3 * 32)
  with pytest.raises(ValueError, match="unknown init scheme 'xavier'"):
    model.init(jax.random.key(0), scheme="xavier")
  with pytest.raises(ValueError, match="--config.init='xavier' is invalid"):
    config_schema.validate_config(_tiny_config(init="xavier"), num_devices=1)


# ------------------------------------------------------------------- learning-rate schedules


def _rates(config, total, spe, steps):
  fn = train_state.learning_rate_schedule(config, total, steps_per_epoch=spe)
  return [float(fn(s)) for s in steps]


def test_cosine_schedule_against_the_formula():
  c = _tiny_config(
    learning_rate=1e-3, final_learning_rate=1e-5, lr_schedule="cosine", lr_warmup_epochs=2
  )
  total, spe, warm = 100, 10, 20

  def want(s):
    if s < warm:
      return 1e-3 * s / warm
    frac = (s - warm) / (total - warm)
    return 1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * frac))

  steps = [0, 5, 10, 20, 40, 60, 80, 100]
  np.testing.assert_allclose(
    _rates(c, total, spe, steps), [want(s) for s in steps], rtol=1e-5, atol=1e-12
  )


def test_one_cycle_schedule_starts_low_peaks_after_warmup_and_ends_at_final():
  c = _tiny_config(
    learning_rate=1e-3, final_learning_rate=1e-6, lr_schedule="one_cycle", lr_warmup_epochs=3
  )
  got = _rates(c, 100, 10, [0, 30, 100])
  np.testing.assert_allclose(got, [1e-3 / 25, 1e-3, 1e-6], rtol=1e-4)
  mid = _rates(c, 100, 10, [15, 65])  # half-way up / down: cosine mid-points
  np.testing.assert_allclose(mid, [(1e-3 / 25 + 1e-3) / 2, (1e-3 + 1e-6) / 2], rtol=2e-2)


@pytest.mark.parametrize("kind", ["one_cycle", "cosine"])
def test_a_warm_up_as_long_as_the_run_is_capped_at_half_of_it(kind, caplog):
  """``mnist.py --config.num_epochs=1`` (warm-up 1 epoch): optax's one-cycle with pct_start = 1
  drops its peak and only decays; capped, the rate peaks at mid-run and ends at the final rate."""
  c = _tiny_config(
    learning_rate=1e-3,
    final_learning_rate=1e-6,
    lr_schedule=kind,
    lr_warmup_epochs=1,
    lr_decay_start_epoch=0,
    num_epochs=1,
  )
  with caplog.at_level("WARNING", logger=train.log.name):
    config_schema.validate_config(c, num_devices=1)
  assert "capped at half the run" in caplog.text
  rates = _rates(c, 10, 10, range(11))
  assert np.argmax(rates) == 5
  np.testing.assert_allclose([rates[5], rates[10]], [1e-3, 1e-6], rtol=1e-4)
  assert all(a < b for a, b in zip(rates[:5], rates[1:6]))
  assert all(a > b for a, b in zip(rates[5:10], rates[6:]))


def test_exponential_schedule_is_unchanged_by_default():
  c = _tiny_config(learning_rate=1e-3, final_learning_rate=1e-5, lr_decay_start_epoch=5)
  got = _rates(c, 100, 10, [0, 49, 50, 75, 100])
  np.testing.assert_allclose(got, [1e-3, 1e-3, 1e-3, 1e-3 * 1e-2**0.5, 1e-5], rtol=1e-5)
  with pytest.raises(ValueError, match="--config.lr_schedule='step' is invalid"):
    config_schema.validate_config(_tiny_config(lr_schedule="step"), num_devices=1)


@pytest.mark.parametrize(
  "overrides,match",
  [
    (
      {"lr_schedule": "one_cycle", "lr_decay_start_epoch": 14},
      r"--config\.lr_decay_start_epoch=14 is invalid: --config\.lr_schedule=one_cycle does not "
      r"read it .*set --config\.lr_decay_start_epoch=0",
    ),
    (
      {"lr_schedule": "cosine", "lr_decay_start_epoch": 3},
      r"--config\.lr_decay_start_epoch=3 is invalid: --config\.lr_schedule=cosine does not",
    ),
    (
      {"lr_schedule": "exponential", "lr_warmup_epochs": 1},
      r"--config\.lr_warmup_epochs=1 is invalid: --config\.lr_schedule=exponential has no "
      r"warm-up: set --config\.lr_warmup_epochs=0",
    ),
    (
      {"lr_schedule": "cosine", "lr_warmup_epochs": -1, "lr_decay_start_epoch": 0},
      r"lr_warmup_epochs=-1 is invalid: use an",
    ),
  ],
)
def test_a_schedule_setting_the_schedule_never_reads_is_refused(overrides, match):
  """Not silently ignored: the one-cycle schedule has no use for the exponential decay's start."""
  with pytest.raises(ValueError, match=match):
    config_schema.validate_config(_tiny_config(**overrides), num_devices=1)
  for ok in (
    {"lr_schedule": "one_cycle", "lr_warmup_epochs": 2, "lr_decay_start_epoch": 0},
    {"lr_schedule": "exponential", "lr_warmup_epochs": 0, "lr_decay_start_epoch": 5},
  ):
    config_schema.validate_config(_tiny_config(**ok), num_devices=1)


@pytest.mark.parametrize(
  "field,value,match",
  [
    ("log_every_steps", 0, r"--config\.log_every_steps=0 is invalid: use an integer >= 1"),
    ("checkpoint_every_steps", 0, r"--config\.checkpoint_every_steps=0 is invalid"),
    ("eval_batch_size", 0, r"--config\.eval_batch_size=0 is invalid: use an integer >= 1"),
    ("train_subset", -5, r"--config\.train_subset=-5 is invalid: use an integer >= 0"),
    ("stop_after_steps", -1, r"--config\.stop_after_steps=-1 is invalid"),
    ("final_learning_rate", 1e-2, r"final_learning_rate=0\.01 is invalid: .* <= --config\.lear"),
    ("crm.warmup_epochs", 2, r"crm\.warmup_epochs=2 is invalid: the cross-entropy warm-up would "),
    ("crm.ramp_epochs", -1, r"--config\.crm\.ramp_epochs=-1 is invalid"),
    ("crm.r0", 0.0, r"--config\.crm\.r0=0\.0 is invalid: the target radius must be > 0"),
    ("crm.r0_start", 1.0, r"crm\.r0_start=1\.0 is invalid: it is where r0's ramp starts, and"),
    ("crm.r_floor", 2.2, r"--config\.crm\.r_floor=2\.2 is invalid: use 0 <= r_floor < r0"),
    ("crm.r_floor", -0.1, r"--config\.crm\.r_floor=-0\.1 is invalid: use 0 <= r_floor < r0"),
    ("normalize", (0.13, 0.31), r"--config\.normalize=\(0\.13, 0\.31\) is invalid: use \(\(mean"),
    ("normalize", ((0.13,), (0.0,)), r"--config\.normalize=.* is invalid: .*every std > 0"),
    (
      "normalize",
      ((0.1, 0.2), (0.3, 0.4)),
      r"--config\.normalize=.* one per channel \(1 for mnist",
    ),
    ("normalize", ((0.1,), (0.3, 0.4, 0.5)), r"--config\.normalize=.* is invalid: use \(\(mean"),
  ],
)
def test_settings_that_would_fail_late_or_do_nothing_are_refused_up_front(field, value, match):
  """Each would otherwise fail deep in training (a division by zero, a TypeError) or quietly
  change the run (negative subsets dropping points, a rising 'decay', CRM never switched on)."""
  c = _tiny_config(num_epochs=2)
  if field == "normalize":
    c.normalize = value
  else:
    group, _, name = field.rpartition(".")
    (c[group] if group else c)[name] = value
  with pytest.raises(ValueError, match=match):
    config_schema.validate_config(c, num_devices=1)
  ok = _tiny_config(num_epochs=2, normalize=((0.1307,), (0.3081,)))
  ok.crm.warmup_epochs = 1
  config_schema.validate_config(ok, num_devices=1)
  ok.crm.r0_start, ok.crm.ramp_epochs = 1.0, 1  # r0_start with its ramp
  config_schema.validate_config(ok, num_devices=1)
  ok.crm.r_floor = 0.9  # below r0 and r0_start
  config_schema.validate_config(ok, num_devices=1)


@pytest.mark.parametrize(
  "overrides,match",
  [
    ({"r0_start": 1.0, "ramp_epochs": 1}, r"r_floor=1\.5 is invalid: .*< r0_start with an r0 ramp"),
    ({"loss": "gloro"}, r"r_floor=1\.5 is invalid: it is a setting of the CRM penalty"),
  ],
)
def test_a_floor_above_the_ramps_r0_or_without_the_crm_penalty_is_refused(overrides, match):
  c = _tiny_config(num_epochs=2)
  c.crm.r_floor = 1.5
  config_schema.validate_config(c, num_devices=1)  # below r0 = 2.2, no ramp: valid
  if "loss" in overrides:
    c.loss = overrides["loss"]
  else:
    c.crm.r0_start, c.crm.ramp_epochs = overrides["r0_start"], overrides["ramp_epochs"]
  with pytest.raises(ValueError, match=match):
    config_schema.validate_config(c, num_devices=1)


def _adam_reference(grads, *, lr, wd=0.0, clip=0.0, p0=1.0, b1=0.9, b2=0.999, eps=1e-8):
  """float64 numpy Adam / AdamW (decoupled decay) with a global-norm clip first."""
  p, m, v = np.float64(p0), 0.0, 0.0
  for t, g in enumerate(grads, start=1):
    g = np.float64(g)
    if clip:
      g = g * min(1.0, clip / abs(g))
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    mhat, vhat = m / (1 - b1**t), v / (1 - b2**t)
    p = p - lr * (mhat / (np.sqrt(vhat) + eps) + wd * p)
  return p


@pytest.mark.parametrize("wd,clip", [(0.0, 0.0), (0.1, 0.0), (0.0, 0.5), (0.1, 0.5)])
def test_optimizer_matches_a_float64_adamw_with_clipping(wd, clip):
  c = _tiny_config(
    learning_rate=1e-2, final_learning_rate=1e-2, weight_decay=wd, grad_clip_norm=clip
  )
  tx = train_state.make_optimizer(c, 10)
  grads = [4.0, 0.1, -2.0, 0.3]
  params = {"w": jnp.ones((), jnp.float32)}
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
    params = {"w": params["w"] + updates["w"]}
  want = _adam_reference(grads, lr=1e-2, wd=wd, clip=clip)
  np.testing.assert_allclose(float(params["w"]), want, rtol=1e-5)
  # The options change the result (so the test would see them ignored).
  if wd or clip:
    assert abs(want - _adam_reference(grads, lr=1e-2)) > 1e-4


# ------------------------------------------------------------------ penalty normalisation


def test_penalty_normalised_per_batch_or_per_correct_point():
  logits = jnp.asarray([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [2.0, 0.0, 0.0]])
  labels = jnp.asarray([0, 1, 2, 1])  # the last one is misclassified
  lip = jnp.asarray([[0.0, 2.0, 4.0], [2.0, 0.0, 1.0], [4.0, 1.0, 0.0]])
  t, r0 = 5.0, 10.0
  # float64 reference: soft radius = -(1/t) log sum_{i != y} exp(-t (z_y - z_i) / L_yi).
  z, y, L = np.asarray(logits, np.float64), np.asarray(labels), np.asarray(lip, np.float64)
  soft = [
    -np.log(sum(np.exp(-t * (z[b, y[b]] - z[b, i]) / L[y[b], i]) for i in range(3) if i != y[b]))
    / t
    for b in range(3)
  ]
  total = -sum(soft)  # linear g, the three correct points (radius < r0)
  for normalize, count in (("correct", 3), ("batch", 4)):
    _, aux = losses.crm_loss(
      logits,
      labels,
      lip,
      lam=1.0,
      temperature=t,
      r0=r0,
      penalty=losses.linear_penalty,
      normalize=normalize,
    )
    np.testing.assert_allclose(float(aux["penalty"]), total / count, rtol=1e-5)
  with pytest.raises(ValueError, match="normalize='sum'"):
    losses.crm_loss(logits, labels, lip, lam=1.0, temperature=t, r0=r0, normalize="sum")


# -------------------------------------------- the loop: curves, TensorBoard, resume, compiles


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _tb_scalars(workdir) -> dict[str, list[tuple[int, float]]]:
  """Reads the event files with TensorBoard's own reader (independent of the writer)."""
  from tensorboard.backend.event_processing import event_accumulator

  acc = event_accumulator.EventAccumulator(str(workdir), size_guidance={"scalars": 0})
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_run_writes_curves_and_tensorboard_events_holding_the_logged_values(tmp_path):
  config = _tiny_config(
    eval_every_epochs=1,
    init="torch",
    lr_schedule="cosine",
    lr_warmup_epochs=1,
    lr_decay_start_epoch=0,
    final_learning_rate=1e-5,
  )
  result = train.train_and_evaluate(config, str(tmp_path))
  records = _records(tmp_path)
  epochs = records[:-1]
  assert "final" in records[-1]
  assert [r["epoch"] for r in epochs] == [1, 2]
  for r in epochs:
    assert 0 <= r["test/certified_accuracy_estimate"] <= r["test/clean_accuracy"] <= 1
  # The last epoch's curve point is the final evaluation's estimate (same params, same bound).
  assert epochs[-1]["test/clean_accuracy"] == result["clean_accuracy"]
  assert epochs[-1]["test/certified_accuracy_estimate"] == result["estimate_certified_accuracy"]

  tb = _tb_scalars(tmp_path)
  for key in ("loss", "accuracy", "radius", "lip"):
    got = [v for _, v in tb[f"epoch/{key}"]]
    np.testing.assert_allclose(got, [r[f"train/{key}"] for r in epochs], rtol=1e-6)
  np.testing.assert_allclose(
    [v for _, v in tb["test/clean_accuracy"]], [r["test/clean_accuracy"] for r in epochs], rtol=1e-6
  )
  # Per log step: the learning rate is the schedule's, lambda the configured constant.
  lr_fn = train_state.learning_rate_schedule(config, 8, steps_per_epoch=4)
  for step, value in tb["train/learning_rate"]:
    np.testing.assert_allclose(value, float(lr_fn(step - 1)), rtol=1e-6)
  assert {v for _, v in tb["train/lambda"]} == {config.crm.lam}
  # Logged every 2 steps of an epoch, at each epoch end and at each checkpoint (every 3).
  assert [s for s, _ in tb["train/loss"]] == [2, 3, 4, 6, 8]
  np.testing.assert_allclose(
    tb["final/certified_accuracy"][0][1], result["certified_accuracy"], rtol=1e-6
  )
  assert tb["final/certified_accuracy"][0][0] == 8


def test_resume_with_the_new_options_is_bitwise_and_does_not_redo_steps(tmp_path):
  opts = dict(
    init="torch",
    lr_schedule="one_cycle",
    lr_warmup_epochs=1,
    lr_decay_start_epoch=0,
    weight_decay=1e-3,
    grad_clip_norm=1.0,
    final_learning_rate=1e-5,
  )
  full = train.train_and_evaluate(_tiny_config(**opts), str(tmp_path / "full"))
  part = str(tmp_path / "part")
  assert train.train_and_evaluate(_tiny_config(stop_after_steps=5, **opts), part)["stopped"]
  resumed = train.train_and_evaluate(_tiny_config(**opts), part)
  assert [(r["epoch"], r["step"]) for r in _records(part)[:-1]] == [(1, 4), (2, 5), (2, 8)]
  for key in ("clean_accuracy", "certified_accuracy", "mean_pairwise_lipschitz"):
    assert resumed[key] == full[key], key

  def final_state(workdir):
    config = _tiny_config(**opts)
    model = train_state.make_model(config)
    tx = train_state.make_optimizer(config, 8, steps_per_epoch=4)
    state = train_state.create_state(model, tx, 0, init="torch")
    with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
      state, meta = ckpt.restore(state)
    assert meta["step"] == 8
    return jax.device_get(state)

  chex.assert_trees_all_equal(final_state(str(tmp_path / "full")), final_state(part))


def test_new_options_compile_each_train_step_once(tmp_path, caplog):
  config = _tiny_config(
    init="torch",
    lr_schedule="cosine",
    lr_decay_start_epoch=0,
    weight_decay=1e-3,
    grad_clip_norm=1.0,
    eval_every_epochs=1,
  )
  config.crm.normalize = "batch"
  with caplog.at_level("WARNING", logger="jax"), jax.log_compiles():
    result = train.train_and_evaluate(config, str(tmp_path))
  assert result["step"] == 8
  messages = [r.getMessage() for r in caplog.records]
  assert len([m for m in messages if m.startswith("Compiling jit(train_step)")]) == 1, messages
  # The per-epoch evaluation compiles once for the two epochs (the last batch is smaller).
  assert len([m for m in messages if m.startswith("Compiling jit(epoch_bound)")]) == 1
  assert len([m for m in messages if m.startswith("Compiling jit(epoch_logits)")]) == 1
