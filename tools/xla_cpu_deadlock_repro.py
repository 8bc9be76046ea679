"""Reproducer of XLA:CPU's thread-pool deadlock under sharded training (not a pytest file).

The CIFAR-10 smoke run of ``tests/test_dataset_configs.py`` (MLP, tfds mock data, 8 virtual
CPU devices, one all-reduce per step), in a loop in one process, from the repo root. On a
2-core CPU (BUILD_NOTES.md):

  PJRT_NPROC=8 python -m tools.xla_cpu_deadlock_repro 40   # hangs within 1-10 runs
  PJRT_NPROC=32 python -m tools.xla_cpu_deadlock_repro 40  # what tests/conftest.py sets: 40/40

A hang shows as XLA's "waiting for `all reduce RendezvousKey...` for 20 seconds" warnings,
then "Fatal Python error: Aborted" after 40 s; the Python stacks are dumped after 120 s.
"""

import faulthandler
import sys
import tempfile
import time

from tests import conftest  # noqa: F401  (8 devices, PJRT_NPROC unless set, quick compiles)


def main(runs: int) -> None:
  import jax
  import tensorflow_datasets as tfds

  from crmjax import train
  from experiments.configs import cifar
  from tests.test_dataset_configs import _quick

  faulthandler.enable()
  for i in range(runs):
    config = _quick(cifar.get_config("smoke"), download=False)
    config.progress_bar = False
    t0 = time.time()
    faulthandler.dump_traceback_later(120)
    with tempfile.TemporaryDirectory() as folder:
      config.data_dir = folder + "/tfds"
      with tfds.testing.mock_data(num_examples=config.train_subset):
        train.train_and_evaluate(config, folder + "/run")
    faulthandler.cancel_dump_traceback_later()
    print(f"run {i}: ok in {time.time() - t0:.1f} s on {jax.device_count()} devices", flush=True)


if __name__ == "__main__":
  main(int(sys.argv[1]) if len(sys.argv) > 1 else 40)
