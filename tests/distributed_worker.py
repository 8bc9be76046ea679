"""One process of tests/test_distributed.py's training runs (not a test file).

  python -m tests.distributed_worker WORKDIR STOP_AFTER PROCESS_ID NUM_PROCESSES PORT DEVICES

Trains the tiny MNIST config of the test in ``WORKDIR`` (resuming from its checkpoints;
``STOP_AFTER`` > 0: stops after that many steps, 0: to the end and the final evaluation), on ``DEVICES`` local CPU devices. With ``NUM_PROCESSES > 1`` the
run is one of a data-parallel group: ``--config.distributed`` with the coordinator on
``127.0.0.1:PORT`` (JAX's gloo CPU collectives), the global batch split between the
processes. Prints the run's result as JSON on the last line.
"""

import json
import os
import sys


def tiny_config():
  """The MNIST smoke config, smaller, with the MLP: 8 steps of 32 (128 images, 2 epochs)."""
  from experiments.configs import mnist

  c = mnist.get_config("smoke")
  c.model = "MLP"
  c.train_subset, c.test_subset, c.batch_size, c.num_epochs = 128, 64, 32, 2
  c.crm.warmup_epochs, c.train_iters, c.eval_iters, c.sound_iters = 1, 2, 5, 20
  c.checkpoint_every_steps, c.log_every_steps, c.progress_bar = 2, 2, False
  c.eval_every_epochs, c.tensorboard = 1, False
  return c


def main(
  workdir: str, stop_after: int, process_id: int, num_processes: int, port: int, devices: int
):
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  from crmjax import train

  config = tiny_config()
  config.stop_after_steps = stop_after
  if num_processes > 1:
    config.distributed = True
    config.coordinator_address = f"127.0.0.1:{port}"
    config.num_processes, config.process_id = num_processes, process_id
  result = train.train_and_evaluate(config, workdir)
  assert jax.process_count() == num_processes and jax.device_count() == devices * num_processes
  print(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float, str))}))


if __name__ == "__main__":
  a = sys.argv[1:]
  main(a[0], int(a[1]), int(a[2]), int(a[3]), int(a[4]), int(a[5]))
