"""Naive vs LipLT pairwise bounds of randomly initialised 4C3F / 6C2F, and bound timing.

``python -m experiments.bounds --config=experiments/configs/bounds.py[:smoke]``

Each bound is averaged at ``eval_iters`` warm-started power iterations and timed at
``train_iters`` (a training step's); the sound LipLT bound (``crmjax.soundness``) takes
``sound_iters`` Lanczos steps on the operators too large to materialise.
"""

import time

import jax
import ml_collections

from crmjax import certify, liplt, soundness
from experiments import benchmark, cli, timing


def measure(
  name: str, *, seed: int, train_iters: int, eval_iters: int, repeats: int, sound_iters: int = 0
):
  model = benchmark.paper_model(name)
  params = model.init(jax.random.key(seed))
  state = liplt.init_state(model.lipnet(params), jax.random.key(seed + 1))
  row = {"model": name}
  for method in liplt.METHODS:

    def bound_fn(n, m=method):
      return jax.jit(lambda p, s: liplt.lipschitz_bound(model.lipnet(p), s, method=m, num_iters=n))

    bound, _ = bound_fn(eval_iters)(params, state)
    row[f"{method}_mean_pairwise"] = certify.mean_pairwise(bound)
    row[f"{method}_ms"] = timing.measure(
      bound_fn(train_iters), (params, state), steps=repeats, warmup=1
    )["ms"]
  if sound_iters:
    t0 = time.perf_counter()
    bound, info = soundness.sound_bound(model.lipnet(params), warm=state, num_iters=sound_iters)
    row.update(
      sound_mean_pairwise=certify.mean_pairwise(bound),
      sound_kind=info["kind"],
      sound_s=time.perf_counter() - t0,
      sound_exact=info["exact_norms"],
      sound_probabilistic=info["probabilistic_norms"],
    )
  return row


def main(c: ml_collections.ConfigDict) -> None:
  print(
    f"backend: {jax.default_backend()}, {jax.devices()[0].device_kind}; "
    f"{c.train_iters} power iterations per timed call, {c.eval_iters} for the means"
  )
  print("| model | naive mean L_ij | LipLT mean L_ij | naive / LipLT | naive ms | LipLT ms |")
  print("| --- | --- | --- | --- | --- | --- |")
  rows = []
  for name in c.models:
    r = measure(
      name,
      seed=c.seed,
      train_iters=c.train_iters,
      eval_iters=c.eval_iters,
      repeats=c.repeats,
      sound_iters=c.sound_iters,
    )
    rows.append(r)
    print(
      f"| {name} | {r['naive_mean_pairwise']:.2f} | {r['liplt_mean_pairwise']:.2f} | "
      f"{r['naive_mean_pairwise'] / r['liplt_mean_pairwise']:.2f} | {r['naive_ms']:.1f} | "
      f"{r['liplt_ms']:.1f} |"
    )
  if c.sound_iters:
    print(
      f"\nSound LipLT bound (crmjax.soundness, {c.sound_iters} Lanczos steps where not "
      "exact) vs the converged power-iteration estimate:"
    )
    print(
      "| model | estimate mean L_ij | sound mean L_ij | sound / estimate | exact norms | "
      "probabilistic norms | kind | seconds |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
      print(
        f"| {r['model']} | {r['liplt_mean_pairwise']:.3f} | {r['sound_mean_pairwise']:.3f}"
        f" | {r['sound_mean_pairwise'] / r['liplt_mean_pairwise']:.4f} | "
        f"{r['sound_exact']} | {r['sound_probabilistic']} | {r['sound_kind']} | "
        f"{r['sound_s']:.0f} |"
      )


if __name__ == "__main__":
  cli.run(
    main,
    config_default="experiments/configs/bounds.py",
    renamed={"num_iters": "train_iters", "converged_iters": "eval_iters"},
  )
