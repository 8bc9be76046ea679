"""How tight is LipLT? Global l2 Lipschitz bounds of small ReLU MLPs against LipSDP-Neuron.

``python -m experiments.tightness --config=experiments/configs/tightness.py[:smoke]``

Per network: a lower estimate (largest ``||J(x)||_2`` found by random search + hill
climbing: a true lower bound of the Lipschitz constant), LipSDP-Neuron (``crmjax.lipsdp``,
SDP via cvxpy, certified from its multipliers), LipLT (``crmjax.liplt``, global mode,
converged power iteration), LipLT with the AOL rescaling of ``crmjax.refinement``, LipLT
with optimised rescaling (``refinement.optimize_scales``: Adam on ``log D`` of the exact
eq. 19 bound, best of plain / AOL / optimised), and the naive product of norms, each with
its time (the optimised one: the whole optimisation, compiled beforehand).
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from crmjax import layers as L
from crmjax import liplt, lipsdp, network, refinement
from experiments import cli, timing


def mlp_layers(hidden, num_classes) -> tuple:
  return tuple(x for h in hidden for x in (L.Dense(h), L.Act())) + (L.Dense(num_classes),)


def build(hidden, *, input_dim, num_classes, seed, weight_scale=1.0, bias_scale=0.1):
  """``(layers, params)`` of a random ReLU MLP."""
  layers = mlp_layers(hidden, num_classes)
  p = L.Sequential(layers).init(jax.random.key(seed), jnp.zeros((1, input_dim)))["params"]
  keys = iter(jax.random.split(jax.random.key(seed + 1000), 64))

  def init(path, a):
    if "bias" in jax.tree_util.keystr(path):
      return bias_scale * jax.random.normal(next(keys), a.shape)
    return weight_scale * a

  return layers, jax.tree_util.tree_map_with_path(init, p)


def lower_estimate(layers, params, input_dim, *, key, chains=512, rounds=30, step=0.3):
  """``max ||J(x)||_2`` over random starts refined by random-step hill climbing.

  ReLU networks are piecewise linear, so ``J`` is piecewise constant and gradient ascent on
  ``||J(x)||`` stalls; random steps move between linear regions. Every value is the norm
  of a Jacobian of the network: a valid lower bound of its Lipschitz constant.
  """
  model = L.Sequential(layers)

  @jax.jit
  def score(x):
    jac = jax.vmap(jax.jacrev(lambda z: model.apply({"params": params}, z[None])[0]))(x)
    return jnp.linalg.norm(jac, 2, axis=(1, 2))

  k0, key = jax.random.split(key)
  x = jax.random.normal(k0, (chains, input_dim))
  best = score(x)
  for _ in range(rounds):
    k, key = jax.random.split(key)
    cand = x + step * jnp.linalg.norm(x, axis=1, keepdims=True) / np.sqrt(
      input_dim
    ) * jax.random.normal(k, x.shape)
    s = score(cand)
    better = s > best
    x, best = jnp.where(better[:, None], cand, x), jnp.where(better, s, best)
  return float(jnp.max(best))


def measure(hidden, c) -> dict:
  layers, params = build(
    hidden,
    input_dim=c.input_dim,
    num_classes=c.num_classes,
    seed=c.seed,
    weight_scale=c.weight_scale,
    bias_scale=c.bias_scale,
  )
  row = {"hidden": list(hidden)}
  t0 = time.perf_counter()
  row["lower"] = lower_estimate(
    layers,
    params,
    c.input_dim,
    key=jax.random.key(c.seed + 7),
    chains=c.lower.chains,
    rounds=c.lower.rounds,
    step=c.lower.step,
  )
  row["lower_s"] = time.perf_counter() - t0

  weights, (alpha, beta) = lipsdp.weights_of(layers, params)
  sdp = lipsdp.lipsdp_neuron(weights, alpha=alpha, beta=beta, solver=c.solver or None)
  row.update(
    lipsdp=sdp["bound"],
    lipsdp_s=sdp["seconds"],
    lipsdp_status=sdp["status"],
    lipsdp_lmi_max_eig=sdp["lmi_max_eig"],
  )

  net = network.from_layers(layers, params, (c.input_dim,))
  state = liplt.init_state(net, jax.random.key(c.seed + 1))
  n = c.eval_iters
  for name, fn in (
    ("liplt", lambda nt, s: liplt.liplt_bound(nt, s, mode="global", num_iters=n)[0]),
    (
      "liplt_aol",
      lambda nt, s: refinement.refined_liplt_bound(nt, s, mode="global", num_iters=n)[0],
    ),
    ("naive", lambda nt, s: liplt.naive_bound(nt, s, mode="global", num_iters=n)[0]),
  ):
    fn = jax.jit(fn)
    row[name] = float(fn(net, state))
    row[f"{name}_s"] = timing.measure(fn, (net, state), steps=c.repeats, warmup=1)["ms"] / 1e3
  opt = {
    "mode": "global",
    "init": c.opt.init,
    "steps": c.opt.steps,
    "learning_rate": c.opt.learning_rate,
    "norms": c.opt.norms,
  }
  refinement.optimize_scales(net, **opt)  # compile
  t0 = time.perf_counter()
  _, info = refinement.optimize_scales(net, **opt)
  row.update(
    liplt_opt=info["bound"],
    liplt_opt_s=time.perf_counter() - t0,
    liplt_opt_chosen=info["chosen"],
    liplt_opt_norms=info["norms"],
  )
  row["naive_exact"] = lipsdp.naive(weights, alpha=alpha, beta=beta)
  return row


def table(rows) -> str:
  head = (
    "| hidden | lower est. | LipSDP | LipLT | LipLT+AOL | LipLT+opt D | naive | "
    "LipLT / LipSDP | opt D / LipSDP | lower s | LipSDP s | LipLT ms | LipLT+AOL ms | "
    "opt D ms | naive ms |"
  )
  lines = [head, "| --- " * 15 + "|"]
  for r in rows:
    opt, opt_s = r.get("liplt_opt", np.nan), r.get("liplt_opt_s", np.nan)  # nan: not run
    lines.append(
      f"| {'x'.join(map(str, r['hidden']))} | {r['lower']:.4f} | {r['lipsdp']:.4f} | "
      f"{r['liplt']:.4f} | {r['liplt_aol']:.4f} | {opt:.4f} | {r['naive']:.4f} | "
      f"{r['liplt'] / r['lipsdp']:.3f} | {opt / r['lipsdp']:.3f} | "
      f"{r['lower_s']:.1f} | {r['lipsdp_s']:.2f} | {1e3 * r['liplt_s']:.2f} | "
      f"{1e3 * r['liplt_aol_s']:.2f} | {1e3 * opt_s:.1f} | {1e3 * r['naive_s']:.2f} |"
    )
  return "\n".join(lines)


def run(c) -> list[dict]:
  rows = [measure(tuple(h), c) for h in c.hidden]
  for r in rows:  # every estimate sits between the lower estimate and the naive bound
    for k in ("lipsdp", "liplt", "liplt_aol", "liplt_opt"):
      if not (r["lower"] <= r[k] * (1 + 1e-4) and r[k] <= r["naive"] * (1 + 1e-4)):
        raise AssertionError(f"{k} out of [lower, naive] for {r['hidden']}: {r}")
    if r["liplt_opt"] > min(r["liplt"], r["liplt_aol"]) * (1 + 1e-4):
      raise AssertionError(f"optimised D worse than plain / AOL for {r['hidden']}: {r}")
  return rows


def main(c: ml_collections.ConfigDict) -> None:
  print(
    f"backend: {jax.default_backend()}; input {c.input_dim}, {c.num_classes} outputs, "
    f"ReLU, weight scale {c.weight_scale}, seed {c.seed}; LipLT / naive: "
    f"{c.eval_iters} power iterations, time per jitted call after compilation; "
    f"opt D: {c.opt.steps} Adam steps (lr {c.opt.learning_rate}, init {c.opt.init}, "
    f"{c.opt.norms} norms), whole optimisation after compilation; "
    f"LipSDP: cvxpy + {c.solver} incl. canonicalisation"
  )
  rows = run(c)
  print(table(rows))
  if c.output:
    with open(c.output, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  cli.run(
    main,
    config_default="experiments/configs/tightness.py",
    renamed={"converged_iters": "eval_iters"},
  )
