"""Certification report of a trained run (Table 1 row, Table 2, Figure 1); see certify.py.

The model, dataset and eps come from the checkpoint's training config; these settings only
choose how much of the test split to use and how hard to attack and bound.
``--config=experiments/configs/certify.py:smoke`` is a seconds-long CPU variant.
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.data_dir = ""  # '' = the training config's data_dir
  c.download = False
  c.test_subset = 0  # 0 = the whole test split
  c.eval_batch_size = 1000
  c.eps = 0.0  # 0 = the training config's eps

  c.pgd_subset = 1000  # PGD (Table 1, soundness check) on the first points only; 0 = all
  c.pgd_steps = 50
  c.pgd_restarts = 3
  c.pgd_batch_size = 250
  c.seed = 0

  c.power_iters = 200  # estimate: warm-started power iterations from the checkpoint's state
  c.sound_power_iters = 0  # sound bound: 0 = the training config's sound_power_iters
  c.num_radii = 100  # Figure 1: points of np.linspace(0, radius_max, num_radii)
  c.radius_max = 0.0  # 0 = the largest certified radius of any curve

  c.compare_workdir = ""  # a second run whose LipLT curve joins Figure 1 (e.g. CE vs CRM)
  if variant == "smoke":
    c.test_subset, c.pgd_subset, c.pgd_steps, c.pgd_restarts = 256, 256, 10, 1
    c.power_iters = 20
  elif variant:
    raise ValueError(f"unknown variant {variant!r}: use '' or 'smoke'")
  return c
