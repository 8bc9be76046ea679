"""MNIST, 4C3F: the recipe that reproduces the reference implementation's 20-epoch run.

The paper's settings (t=5, r0=2.2, lambda=30, 10 power iterations, Adam 1e-3, batch 512,
20 epochs) as the reference implementation (o4lc/CRM-LipLT) runs them:

* ``g(r) = -r`` (``crm.penalty='linear'``, the reference's ``softMax`` robust loss), whose
  gradient does not vanish at the radii that matter (``exp(-t r) / t`` is flat beyond
  r ~ 1 at t = 5: that run certified 0.02% at 1.58);
* a constant learning rate for 14 epochs, then an exponential decay to 1e-5 over the last 6
  (the reference's scheduler has this form, ``learningRateDecayEpoch``; the paper's decay
  to 1e-6 over all 20 epochs is ``--config.lr_decay_start_epoch=0
  --config.final_learning_rate=1e-6``);
* the penalty from the first step (``crm.warmup_epochs=0``): five cross-entropy epochs at
  1e-3 take the mean pairwise bound to ~3e4, from which the penalty never recovered;
* Flax's default initialisation (``init='flax'``).

Measured (docs/results.md, 2026-11-25): 92.48% clean, 46.73% certified at eps = 1.58 with the
sound bound of the time (power method); the reference code: 90.83% / 41.85%.
``mnist_fast.py`` is this one with batch 32 and a one-cycle learning rate; ``mnist.py``, the
main command's recipe, is that at batch 16 with the bound every step.

  python -m experiments.mnist --config=experiments/configs/mnist_reference.py --workdir=runs/mnist_reference
"""

import ml_collections

from experiments.configs import default


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = default.get_config()
  c.crm.penalty = "linear"
  c.lr_decay_start_epoch, c.final_learning_rate = 14, 1e-5
  c.crm.warmup_epochs = 0
  c.init = "flax"
  default.check_variant(variant, known=("",))  # the smoke variant is mnist.py's
  return c
