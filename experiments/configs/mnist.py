"""MNIST, 4C3F, CRM: the main command's recipe, >= 62% certified in 20 epochs.

  python -m experiments.mnist --config=experiments/configs/mnist.py

The fast recipe (``mnist_fast.py``: batch 32, a one-cycle learning rate peaking at 2e-3, 4
warm-started Lanczos products on one step in 5, a moving average of the weights, soft-min
temperature 20; its docstring lists how each differs from the reference recipe) with three
changes, each measured over 20 epochs (docs/results.md, "MNIST 4C3F, CRM"):

* the bound every step (``bound_every_steps=1``) instead of one step in 5: +0.74 points;
* batch 16 instead of 32: twice the optimizer steps per epoch, +0.42 points more;
* the peak learning rate scaled by the square root of the batch ratio (2e-3 * sqrt(16/32),
  ``learning_rate=1.4e-3``, the scaling that keeps Adam's noise per sample level when the
  batch halves): +0.29 points more, and +0.3 to +1.0 on the per-epoch estimate from epoch 3
  to 15.

Measured (docs/results.md; 2-core CPU, 20 epochs, 2026-12-07): 96.34% clean, **62.00%
certified** at eps = 1.58 with the sound bound (220-261 s per epoch alone); a second run with
``--config.seed=1``: 96.36% / 61.94% (82 min wall beside a lower-priority run). Each epoch costs
2-3x that of ``mnist_fast.py`` (60.55%). At the 2e-3 peak (``--config.learning_rate=2e-3``):
96.29% / 61.71%. ``mnist_60.py`` is the fast recipe over 60 epochs (the bound on one step in 4).

``--config=experiments/configs/mnist.py:smoke`` is a seconds-long CPU variant for tests (the
same as ``mnist_fast.py``'s).
"""

import ml_collections

from experiments.configs import default, mnist_fast


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = mnist_fast.get_config(default.check_variant(variant))
  if not variant:
    c.batch_size = 16
    c.bound_every_steps = 1  # the bound on every step
    c.learning_rate = 1.4e-3  # mnist_fast.py's 2e-3 times sqrt(16 / 32)
  return c
