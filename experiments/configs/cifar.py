"""CIFAR-10, 6C2F, CRM (t=5, r0=0.2, lambda=15, 5 power iterations), eps = 36/255."""

import ml_collections

from experiments.configs import default


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = default.get_config()
  c.dataset, c.model = "cifar10", "6C2F"
  c.power_iters = 5
  c.crm.lam, c.crm.r0, c.crm.r0_start = 15.0, 0.2, 0.2
  c.num_epochs, c.crm.warmup_epochs = 200, 10
  c.eps = 36 / 255
  c.augment.crop_padding, c.augment.flip = 4, True
  return default.apply_variant(c, variant, train_subset=128, test_subset=64, batch_size=32)
