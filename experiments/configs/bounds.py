"""Bounds of randomly initialised paper architectures (naive vs LipLT, pairwise).

``--config=experiments/configs/bounds.py:smoke`` is a CPU check of seconds (4C3F only).
"""

import ml_collections

from experiments.configs import default


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.models = ("4C3F", "6C2F")  # any of experiments.configs.benchmark.MODELS (input shape)
  c.seed = 0
  c.train_iters = 10  # power iterations of one timed bound evaluation (as in a training step)
  c.eval_iters = 300  # power iterations of the averaged (converged) estimates
  c.repeats = 5
  c.sound_iters = 1000  # Lanczos steps of the sound bound (crmjax.soundness); 0 = skip it
  if default.check_variant(variant) == "smoke":
    c.models, c.train_iters, c.eval_iters, c.repeats = ("4C3F",), 2, 20, 1
    c.sound_iters = 50
  return c
