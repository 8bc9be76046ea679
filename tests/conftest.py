"""Test setup: 8 virtual CPU devices (for the sharding tests), CPU only, no internet.

The experiment configs download missing datasets by default; in tests every download goes to
a closed loopback port (fails at once with the usual message) unless a test serves its own
archives, and the download cache is a fresh temporary folder (a developer's real cache is
never read or written).
"""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("CRMJAX_DOWNLOAD_URL", "http://127.0.0.1:9/")
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="crmjax_test_cache_")
