"""Test setup: 8 virtual CPU devices (for the sharding tests), CPU only, no internet.

The experiment configs download missing datasets by default; in tests every download goes to
a closed loopback port (fails at once with the usual message) unless a test serves its own
archives, and the download cache is a fresh temporary folder (a developer's real cache is
never read or written).

One JAX persistent compilation cache (a temporary folder per test session, removed at its
end) is shared by the pytest-xdist workers, the experiments the tests start as subprocesses and
the notebook kernels: a computation that takes >= 0.3 s to compile is compiled once per session
instead of once per process (tracing and lowering still happen in each). Set
``JAX_COMPILATION_CACHE_DIR`` to keep a cache across sessions.
"""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("CRMJAX_DOWNLOAD_URL", "http://127.0.0.1:9/")
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="crmjax_test_cache_")
# Made by the session's first process (xdist's controller); its workers inherit the variable.
_OWN_JAX_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_JAX_CACHE = tempfile.mkdtemp(prefix="crmjax_test_jax_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_JAX_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")


def pytest_sessionfinish(session):
  if _OWN_JAX_CACHE and not hasattr(session.config, "workerinput"):  # not in an xdist worker
    shutil.rmtree(_OWN_JAX_CACHE, ignore_errors=True)
