"""MNIST, 4C3F, CRM with the paper's settings (t=5, r0=2.2, lambda=30, 10 power iterations,
Adam 1e-3, batch 512, 20 epochs), as the reference implementation runs them:

* ``g(r) = -r`` (``crm.penalty='linear'``, the reference's ``softMax`` robust loss), whose
  gradient does not vanish at the radii that matter (``exp(-t r) / t`` is flat beyond
  r ~ 1 at t = 5: that run certified 0.02% at 1.58);
* a constant learning rate for 14 epochs, then an exponential decay to 1e-5 over the last 6
  (the reference's scheduler has this form, ``learningRateDecayEpoch``; the paper's decay
  to 1e-6 over all 20 epochs is ``--config.lr_decay_start_epoch=0
  --config.final_learning_rate=1e-6``);
* the penalty from the first step (``crm.warmup_epochs=0``): five cross-entropy epochs at
  1e-3 take the mean pairwise bound to ~3e4, from which the penalty never recovered
  (BUILD_NOTES.md has every run).

``--config=experiments/configs/mnist.py:smoke`` is a seconds-long CPU variant for tests.
"""

import ml_collections

from experiments.configs import default


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = default.get_config()
  c.crm.penalty = "linear"
  c.lr_decay_start_epoch, c.final_learning_rate = 14, 1e-5
  c.crm.warmup_epochs = 0
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
    c.eval_every_epochs = 0
  elif variant:
    raise ValueError(f"unknown variant {variant!r}: use '' or 'smoke'")
  return c
