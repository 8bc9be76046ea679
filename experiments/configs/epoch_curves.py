"""Per-epoch test curves of MNIST runs (``experiments.epoch_curves``).

``--config=experiments/configs/epoch_curves.py:smoke`` draws the fast recipe's first run alone.
"""

import ml_collections

from experiments.configs import default

# The fast recipe's first run (its config was then mnist.py).
MAIN_RUN = "mnist.py (batch 32), 20 epochs, 2026-12-02"


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.recorded = "docs/figures/mnist_epoch_curves.json"  # committed records; "" for none
  c.runs = ()  # more runs: 'label=workdir' (the workdir's metrics.jsonl)
  c.labels = ()  # the runs to draw, in this order; () for all
  c.output = "docs/figures/mnist_epoch_curves.png"
  c.title = "MNIST 4C3F, CRM, full test set, per epoch (2-core CPU)"
  if default.check_variant(variant) == "smoke":
    c.labels = (MAIN_RUN,)
  return c
