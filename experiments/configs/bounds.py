"""Bounds of randomly initialised paper architectures (naive vs LipLT, pairwise)."""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.models = ("4C3F", "6C2F")
  c.seed = 0
  c.num_iters = 10  # power iterations of one bound evaluation (the timed call)
  c.converged_iters = 300  # for the averages
  c.repeats = 5
  c.sound_iters = 1000  # 0 = skip the sound bound (crmjax.soundness)
  if variant == "smoke":
    c.models, c.num_iters, c.converged_iters, c.repeats = ("4C3F",), 2, 20, 1
    c.sound_iters = 50
  return c
