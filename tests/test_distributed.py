"""Two processes on 127.0.0.1 train data-parallel as one process does, and share checkpoints.

``--config.distributed=True`` with a coordinator address, a process count and index
(``jax.distributed.initialize``, JAX's gloo collectives on CPU), one CPU device per process,
against one process with two devices: the same mesh size, the same global batch of 32 split
in two. Runs (``tests/distributed_worker.py``, a subprocess each), 4 steps per epoch:

* one process: steps 0-8 (the reference; its checkpoints at steps 4, 6 and 8 are kept);
* the pair: steps 0-4 (stop), which one process then resumes to step 8;
* the pair resumes a copy of the reference cut back to its step-4 checkpoint, to step 8.

The pair's step-4 parameters are bitwise those of the one process; both cross resumes end with
the reference's step-8 parameters (bitwise): a checkpoint written by the pair restores in one
process, and the reverse. Each process of the pair loads the whole split and feeds its half of
each global batch (``make_array_from_process_local_data``).
"""

import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from crmjax import checkpoint, train_state
from tests.conftest import QUICK_COMPILE
from tests.distributed_worker import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(cache: str) -> dict:
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env["JAX_COMPILATION_CACHE_DIR"] = cache  # per process: see tests/conftest.py
  env.update(QUICK_COMPILE)  # the MLP's steps are compile-bound (tests/conftest.py)
  env.pop("XLA_FLAGS", None)
  return env


def _run(workdir, stop_after: int, num_processes: int, cache_root) -> list[str]:
  """The worker(s) on ``workdir``; their last output lines (the results)."""
  port, devices = _free_port(), 2 // num_processes
  procs = [
    subprocess.Popen(
      [sys.executable, "-m", "tests.distributed_worker", str(workdir), str(stop_after)]
      + [str(i), str(num_processes), str(port), str(devices)],
      cwd=ROOT,
      env=_env(os.path.join(cache_root, f"p{num_processes}_{i}")),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(num_processes)
  ]
  outs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    assert p.returncode == 0, out[-3000:]
    outs.append(out.strip().splitlines()[-1])
  return outs


def _params(workdir, step: int):
  config = tiny_config()
  model = train_state.make_model(config)
  tx = train_state.make_optimizer(config, 8, steps_per_epoch=4)
  replicated, _ = train_state.make_mesh()
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    state, meta = ckpt.restore(
      train_state.abstract_state(model, tx, config.seed, replicated), step=step
    )
  assert meta["step"] == step
  return jax.device_get(state)


def _assert_same(a, b, what: str) -> None:
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(x, y, err_msg=what)


@pytest.mark.slow
def test_two_processes_train_as_one_and_share_checkpoints(tmp_path):
  cache = str(tmp_path / "xla_cache")
  single, pair, back = tmp_path / "single", tmp_path / "pair", tmp_path / "single_then_pair"
  _run(single, 0, 1, cache)  # the reference: steps 0-8 (checkpoints kept at 4, 6, 8)
  ref4, ref8 = _params(single, 4), _params(single, 8)
  _run(pair, 4, 2, cache)
  _assert_same(_params(pair, 4), ref4, "the pair's step 4 vs one process")
  _run(pair, 0, 1, cache)  # the pair's checkpoint, resumed by one process
  _assert_same(_params(pair, 8), ref8, "pair (0-4) then one process (4-8)")
  shutil.copytree(single, back)  # one process' step-4 checkpoint, resumed by the pair
  for later in ("6", "8"):
    shutil.rmtree(back / "checkpoints" / later)
  outs = _run(back, 0, 2, cache)
  _assert_same(_params(back, 8), ref8, "one process (0-4) then the pair (4-8)")
  assert len(outs) == 2 and all('"step": 8' in o for o in outs), outs
