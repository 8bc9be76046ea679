"""Faults: SIGKILL and resume, NaN losses, unwritable workdirs, bad input with clear errors."""

import gzip
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crmjax import checkpoint, train, train_step
from tests.conftest import QUICK_COMPILE
from tests.test_train import ROOT, _setup, _tiny_config

MAIN = [sys.executable, "-m", "experiments.mnist", "--config=experiments/configs/mnist.py:smoke"]
MLP = [
  "--config.model=MLP",
  "--config.train_subset=256",
  "--config.test_subset=64",
  "--config.batch_size=32",
  "--config.num_epochs=2",
  "--config.crm.warmup_epochs=1",
  "--config.checkpoint_every_steps=2",
  "--config.sound_iters=20",
  "--config.eval_iters=5",
]
# An MLP on a few images: compile-bound, so compiled quickly (tests/conftest.py).
ENV = {**os.environ, **QUICK_COMPILE, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}


def _run(workdir, *extra, timeout=300):
  return subprocess.run(
    MAIN + MLP + [f"--workdir={workdir}", *extra],
    cwd=ROOT,
    env=ENV,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _final_state(workdir):
  config = _tiny_config()
  _, _, _, _, state = _setup(config)
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    state, _ = ckpt.restore(state)
  return jax.device_get(state)


@pytest.mark.slow
def test_sigkill_then_rerun_finishes_with_bitwise_the_same_params(tmp_path):
  ref = _run(tmp_path / "ref")
  assert ref.returncode == 0, ref.stderr[-2000:]
  work = tmp_path / "killed"
  proc = subprocess.Popen(
    MAIN + MLP + [f"--workdir={work}"],
    cwd=ROOT,
    env=ENV,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  ckpts = work / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline and not (
    ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir())
  ):
    time.sleep(0.05)
  time.sleep(random.Random(0).uniform(0.0, 1.5))  # a random point after the first save
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  saved = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
  metrics = work / "metrics.jsonl"
  logged = len(metrics.read_text().splitlines()) if metrics.exists() else 0
  again = _run(work)
  assert again.returncode == 0, again.stderr[-2000:]
  a, b = _final_state(tmp_path / "ref"), _final_state(work)
  assert int(a.step) == int(b.step) == 16
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  # The rerun continued from the last checkpoint written before the kill (a rerun that
  # started over would end with the same params: training is deterministic) ...
  said = again.stdout + again.stderr  # the message is logged (stderr) or printed
  assert saved > 0 and f"resumed from step {saved} " in said, (
    f"the rerun did not restore the step-{saved} checkpoint: {said[-1500:]}"
  )
  # ... and did not redo steps: its epoch records (8 steps per epoch) start after that step.
  new = [json.loads(l) for l in metrics.read_text().splitlines()[logged:]]
  steps = [r["step"] for r in new if "final" not in r]
  if saved < 16:
    assert steps and steps[0] > saved and steps == sorted(set(steps)), (saved, steps)
    assert steps[-1] == 16 and all(s % 8 == 0 for s in steps), steps
  assert "final" in new[-1]


def test_nan_loss_stops_with_step_and_untouched_last_checkpoint(tmp_path, monkeypatch):
  real = train_step.make_train_step

  def poisoned(*args, **kwargs):
    step_fn = real(*args, **kwargs)

    def wrapped(state, x, y):
      new, m = step_fn(state, x, y)
      bad = jnp.where(state.step >= 4, jnp.nan, 1.0)
      return new.replace(params=jax.tree.map(lambda p: p * bad, new.params)), {
        **m,
        "loss": m["loss"] * bad,
      }

    return wrapped

  monkeypatch.setattr(train_step, "make_train_step", poisoned)
  config = _tiny_config(checkpoint_every_steps=2, log_every_steps=1)
  work = str(tmp_path / "nan")
  with pytest.raises(train.TrainingDiverged, match=r"step 5.*last good checkpoint is step 4"):
    train.train_and_evaluate(config, work)
  ckdir = os.path.join(work, "checkpoints")
  assert sorted(int(s) for s in os.listdir(ckdir) if s.isdigit()) == [2, 4]
  state = _final_state(work)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))


def test_unwritable_workdir_fails_at_start(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  t0 = time.time()
  with pytest.raises(OSError, match="workdir|writ|director"):
    train.train_and_evaluate(_tiny_config(), str(blocker / "run"))
  assert time.time() - t0 < 10


def _write_idx(path, arr):
  dims = arr.shape
  code = 0x08
  header = struct.pack(">BBBB", 0, 0, code, len(dims)) + struct.pack(f">{len(dims)}I", *dims)
  with gzip.open(path, "wb") as f:
    f.write(header + arr.astype(np.uint8).tobytes())


def _fake_mnist(root, *, size=28, max_label=9):
  d = root / "mnist"
  d.mkdir(parents=True)
  rng = np.random.default_rng(0)
  for split, n in (("train", 64), ("t10k", 32)):
    _write_idx(d / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, size, size)))
    _write_idx(d / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, max_label + 1, n))
  return str(root)


def test_bad_inputs_get_one_clear_message(tmp_path, monkeypatch):
  monkeypatch.delenv("CRMJAX_DATA_DIR", raising=False)
  cases = [
    ({"data_dir": _fake_mnist(tmp_path / "shape", size=32)}, ValueError, "shape"),
    ({"data_dir": _fake_mnist(tmp_path / "labels", max_label=12)}, ValueError, r"\[0, 10\)"),
    (
      {"dataset": "cifar10", "data_dir": str(tmp_path / "empty")},
      FileNotFoundError,
      "CRMJAX_DATA_DIR",
    ),
    ({"dataset": "imagenet"}, ValueError, "dataset"),
    ({"model": "ResNet50"}, ValueError, "model"),
  ]
  (tmp_path / "empty").mkdir()
  for overrides, error, match in cases:
    config = _tiny_config()
    for k, v in overrides.items():
      config[k] = v
    with pytest.raises(error, match=match):
      train.train_and_evaluate(config, str(tmp_path / "w" / str(len(str(overrides)))))


def test_checkpoint_of_another_architecture_or_corrupt_is_refused(tmp_path):
  work = str(tmp_path / "run")
  done = _run(work, "--config.num_epochs=1", "--config.crm.warmup_epochs=0")
  assert done.returncode == 0, done.stderr[-2000:]
  before = sorted(os.listdir(os.path.join(work, "checkpoints")))
  other = _run(work, "--config.model=4C3F")
  assert other.returncode == 2 and "fresh --workdir" in other.stderr, other.stderr[-2000:]
  last = os.path.join(work, "checkpoints", max((s for s in before if s.isdigit()), key=int))
  for root, _, files in os.walk(os.path.join(last, "state")):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  broken = _run(work, "--config.num_epochs=2")
  assert broken.returncode == 2 and "delete" in broken.stderr.lower(), broken.stderr[-2000:]
  assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == before
