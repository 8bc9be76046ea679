"""MNIST, 4C3F, CRM with the paper's settings (t=5, r0=2.2, lambda=30, 10 power iterations).

``--config=experiments/configs/mnist.py:smoke`` is a seconds-long CPU variant for tests.
"""

import ml_collections

from experiments.configs import default


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = default.get_config()
  if variant == "smoke":
    c.train_subset, c.test_subset = 512, 256
    c.batch_size, c.num_epochs = 64, 2
    c.crm.warmup_epochs = 1
    c.power_iters = 2
    c.eval_power_iters = 20
    c.sound_power_iters = 50
    c.checkpoint_every_steps = 4
    c.log_every_steps = 2
    c.progress_bar = False
  elif variant:
    raise ValueError(f"unknown variant {variant!r}: use '' or 'smoke'")
  return c
