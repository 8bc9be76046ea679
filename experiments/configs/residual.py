"""Residual networks end to end: CRM-train a model with skip connections (H = I in
paper eq. 17) once with the LipLT bound and once with the naive bound, then certify each
with both sound bounds.

``python -m experiments.residual --config=experiments/configs/residual.py`` (MNIST, Res4C3F
and CtrlConv). Other models: ``--config.models=...`` (registered architecture names).
``--config=experiments/configs/residual.py:smoke`` is a CPU variant of under a minute.
"""

import ml_collections

from experiments.configs import default, mnist_fast


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  t = mnist_fast.get_config()
  # The fast MNIST recipe (mnist_fast.py: g(r) = -r, one-cycle learning rate), shortened, at the
  # batch (64) of the runs measured in docs/results.md.
  t.num_epochs, t.train_subset, t.batch_size = 3, 20000, 64
  t.progress_bar = False
  c.train = t
  c.models = ("Res4C3F", "CtrlConv")
  c.train_bounds = ("liplt", "naive")  # one training run per bound
  c.certify_bounds = ("naive", "liplt")  # each trained model certified with each sound bound
  if default.check_variant(variant) == "smoke":
    c.models = ("ResMLP",)
    t.train_subset, t.test_subset, t.batch_size, t.num_epochs = 256, 128, 64, 1
    t.crm.warmup_epochs, t.train_iters, t.eval_iters = 0, 1, 10
    t.sound_iters, t.checkpoint_every_steps, t.log_every_steps = 20, 100, 100
  return c
