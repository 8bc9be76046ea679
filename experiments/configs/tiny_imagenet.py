"""Tiny-ImageNet (64x64x3, 200 classes), 8C2F, CRM, eps = 36/255."""

import ml_collections

from experiments.configs import default


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = default.get_config()
  c.dataset, c.model = "tiny_imagenet", "8C2F"
  c.power_iters = 5
  c.crm.lam, c.crm.r0, c.crm.r0_start = 15.0, 0.2, 0.2
  c.batch_size, c.num_epochs, c.crm.warmup_epochs = 256, 200, 10
  c.eps = 36 / 255
  c.augment.crop_padding, c.augment.flip = 4, True
  c.eval_batch_size = 250
  return default.apply_variant(c, variant, train_subset=16, test_subset=8, batch_size=8)
