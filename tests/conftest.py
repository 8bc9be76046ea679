"""Test setup: 8 virtual CPU devices (for the sharding tests), CPU only, quick compiles, no internet.

The experiment configs download missing datasets by default; in tests every download goes to
a closed loopback port (fails at once with the usual message) unless a test serves its own
archives, and the download cache is a fresh temporary folder (a developer's real cache is
never read or written).
"""

import atexit
import os
import shutil
import tempfile

# 8 virtual devices for the sharding tests; XLA's Eigen pool single-threaded, as two xdist
# workers already fill both cores (the suite times in BUILD_NOTES.md were measured so).
os.environ.setdefault(
  "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_cpu_multi_thread_eigen=false"
)
# XLA:CPU sizes its client thread pool max(cores, devices): 8 threads on a 2-core machine.
# Sharded training (one all-reduce per step, dispatched asynchronously) then now and then
# starves that pool: every thread blocks (launches waiting on the per-device in-flight
# semaphore or on their execution) while the all-reduce's last participants wait for a thread,
# until XLA's 40 s rendezvous timeout aborts the process ("Fatal Python error: Aborted" at
# the training loop; CI then ran into its 90-minute limit). Reproduced within 1-10
# runs of the sharded CIFAR smoke training (tools/xla_cpu_deadlock_repro.py); a pool of 4x the
# devices (PJRT_NPROC, read by XLA's DefaultThreadPoolSize) ran 120/120 (BUILD_NOTES.md).
os.environ.setdefault("PJRT_NPROC", "32")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("CRMJAX_DOWNLOAD_URL", "http://127.0.0.1:9/")
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="crmjax_test_cache_")
# A persistent XLA compilation cache, one folder per pytest process: the process that starts
# first makes a root folder (or takes $JAX_COMPILATION_CACHE_DIR as it) and passes it on in
# the environment; each xdist worker (PYTEST_XDIST_WORKER) caches in its own subfolder, which
# the subprocess experiments and notebook kernels that its tests start inherit, so a program
# that a test's processes compile one after the other (the smoke runs' train steps, a rerun
# after SIGKILL) compiles once. Not one folder for all workers: JAX writes entries unlocked,
# and a worker that read another's half-written entry warned "Error reading persistent
# compilation cache entry ... incomplete or truncated stream". Quick compiles take under a
# second, so every entry is kept. Measured: test_faults.py 73 -> 61 CPU-s alone.
if "CRMJAX_TEST_XLA_CACHE_ROOT" not in os.environ:
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    os.environ["CRMJAX_TEST_XLA_CACHE_ROOT"] = os.environ["JAX_COMPILATION_CACHE_DIR"]
  else:
    os.environ["CRMJAX_TEST_XLA_CACHE_ROOT"] = tempfile.mkdtemp(prefix="crmjax_test_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["CRMJAX_TEST_XLA_CACHE_ROOT"], ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
  os.environ["CRMJAX_TEST_XLA_CACHE_ROOT"], os.environ.get("PYTEST_XDIST_WORKER", "main")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402  (after the environment above)
import pytest  # noqa: E402

# Most tests are compile-bound (XLA's CPU backend compile is most of a bound test's time on
# small inputs): in the test processes, skip XLA's expensive LLVM passes and optimisation level
# (measured: finite-difference test 60 -> 27 CPU-s, a short in-process run 62 -> 42). Set here,
# not in the environment: subprocess experiments and notebook kernels that execute more than
# they compile (4C3F) run fully optimised (3x slower without it); the compile-bound ones ask
# for it with ``QUICK_COMPILE`` in their environment. Tests that execute long loops opt out
# with ``@pytest.mark.optimized``. Users' runs are never affected;
# ``JAX_DISABLE_MOST_OPTIMIZATIONS=0 pytest`` runs every test fully optimised.
if "JAX_DISABLE_MOST_OPTIMIZATIONS" not in os.environ:
  jax.config.update("jax_disable_most_optimizations", True)
QUICK_COMPILE = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}


@pytest.fixture(autouse=True)
def _full_xla_optimisation_when_marked(request):
  if request.node.get_closest_marker("optimized") is None:
    yield
    return
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", before)


# The files that take longest, longest first (their slowest tests' seconds, from --durations in
# a two-worker run of the whole suite, 2026-12-08). With ``--dist loadfile
# --no-loadscope-reorder`` (README's test command) pytest-xdist hands files to the workers in
# collection order, so these start first and the many short files even out the two workers'
# ends. xdist's own order (files with the most tests first) handed the files of few but
# minute-long tests out last, where one can leave the other worker with nothing to do.
LONGEST_FILES = (
  "test_notebooks.py",  # ~115 s
  "test_soundness.py",  # ~110 s
  "test_train.py",  # ~100 s
  "test_gpu_check.py",  # ~85 s
  "test_liplt.py",  # ~85 s
  "test_controlled.py",  # ~55 s
  "test_distributed.py",  # ~45 s
  "test_faults.py",  # ~45 s
  "test_rescaled_training.py",  # ~40 s
  "test_nnx.py",  # ~35 s
  "test_recipes.py",  # ~35 s
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: others as before
