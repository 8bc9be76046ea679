"""Tightness of LipLT against LipSDP-Neuron on small random ReLU MLPs (global l2 constant).

``--config=experiments/configs/tightness.py:smoke`` runs in well under a minute on a CPU.
"""

import ml_collections

from experiments.configs import default


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.input_dim = 32
  c.num_classes = 10
  c.hidden = ((64,), (64, 64), (64, 64, 64))  # one network per entry
  c.seed = 0
  c.weight_scale = 1.0  # multiplies the Flax (LeCun normal) initial kernels
  c.bias_scale = 0.1  # random biases, so the lower estimate sees varied activation patterns
  c.eval_iters = 2000  # power iterations of LipLT / naive (converged)
  c.repeats = 3  # timed calls (median) of LipLT / naive after compilation
  c.solver = "SCS"
  c.opt = ml_collections.ConfigDict()  # refinement.optimize_scales (LipLT + optimised D)
  c.opt.init = "aol"  # aol | ones
  c.opt.steps = 300
  c.opt.learning_rate = 0.005
  c.opt.norms = "auto"  # auto | exact | power (the objective's interior norms)
  c.lower = ml_collections.ConfigDict()
  c.lower.chains = 512  # random starting points
  c.lower.rounds = 30  # hill-climbing rounds (random steps, keep the larger ||J(x)||)
  c.lower.step = 0.3
  c.output = ""  # a JSON path, or "" for none
  if default.check_variant(variant) == "smoke":
    c.input_dim, c.num_classes = 8, 4
    c.hidden = ((16,), (16, 16))
    c.eval_iters, c.repeats = 300, 1
    c.lower.chains, c.lower.rounds = 128, 5
    c.opt.steps = 50
  return c
