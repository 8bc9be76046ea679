"""Shared assertion of the certificate tests: PGD inside the certified radii breaks nothing."""

import jax
import numpy as np

from crmjax import attacks


def assert_pgd_breaks_no_certificate(logits_fn, xs, labels, radii, *, seed: int) -> None:
  """l2 PGD (multi-targeted, 30 steps, 2 restarts, no box: certificates hold in all of R^n)
  at 0.999 x each point's certified radius must not change any prediction.

  Raises ``attacks.raise_on_violation``'s error, naming the broken points, if one does.
  """
  res = attacks.pgd_l2(
    logits_fn,
    xs,
    labels,
    key=jax.random.key(seed),
    eps=0.999 * np.asarray(radii),
    num_steps=30,
    num_restarts=2,
    loss="multitarget",
    clip_min=-np.inf,
    clip_max=np.inf,
  )
  attacks.raise_on_violation(np.ones(len(xs), bool), np.asarray(res.success))
