"""The paper's report of a trained run: Table 1 row, Table 2 and Figure 1.

``certify_run(config, workdir)`` loads the latest checkpoint of a training run
(``runs.load_run``: model and training config rebuilt from the checkpoint's meta) and writes
``<workdir>/certify/``:

* ``results.json``: ``table1`` (clean, PGD and certified accuracy at the training eps; the
  certificate uses the SOUND pairwise LipLT bound), ``certificates`` (certified accuracy
  at eps of the pairwise LipLT bound computed every way: the power-iteration estimate, the
  sound bound with the power method (the former default, ``config.compare_power``), the
  sound bound with Lanczos, and the sound bound of the Theorem 3.2 rescaling optimised by
  ``refinement.optimize_scales`` (``config.refine``), and for a run trained with the
  rescaling the per-pair minimum of the plain bound and that of its last training ``D``
  (``sound_training_d``, as its final evaluation); each with its kind, estimator,
  failure probability, key, exact / probabilistic norm counts and wall time), ``table2``
  (mean pairwise Lipschitz bounds, naive and LipLT, pairwise / per-class / global, both
  the sound bound and the power-iteration estimate, each with its kind), ``figure1``
  (certified-radius curves), ``soundness_check`` (points attacked, points certified,
  violations of any certificate) and ``margin_gradients`` (``config.margin_gradients``:
  the largest margin gradient per pair on the attacked points, a lower bound of the true
  constant where the network is differentiable; the sound bound's ratio to it; the ceiling
  any global certificate could reach; the share of those points whose first-order radius
  exceeds eps);
* ``figure1.png``: share of test points certified at each radius, naive vs LipLT (and the
  LipLT curve of a second run, ``config.compare_workdir``).

The report runs in phases, one function each: the bounds (``lipschitz_table``), the
certificates (``certificates``), the attack that checks them (``attack_check``), the
comparison run (``compare_run``) and Figure 1 (``figure1``). Every sound bound takes the
report's one ``soundness.SoundSettings`` (``sound_settings``). Every point certified at eps
(by any sound certificate) that PGD breaks raises ``RuntimeError('SOUNDNESS BUG ...')``.
Logits and the attack run at the highest matmul precision. With ``config.progress`` each
long phase shows a tqdm bar or a line (stderr). ``report_text`` prints the results.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from crmjax import (
  attacks,
  certify,
  config_schema,
  liplt,
  plots,
  refinement,
  runs,
  soundness,
)

ESTIMATE_KIND = "power-iteration estimate (lower estimate, not guaranteed)"

# ------------------------------------------------------------------------ pieces


def eps_grid(radius_max: float, *, num: int = 100) -> np.ndarray:
  """``np.linspace(0, radius_max, num)``: the radii of Figure 1."""
  return np.linspace(0.0, float(radius_max), num)


def certified_curve(radii: np.ndarray, eps: np.ndarray) -> np.ndarray:
  """Share of points certified at each radius.

  Args:
    radii: ``(N,)`` certified radii (0 where misclassified).
    eps: ``(E,)`` radii of the curve.

  Returns:
    ``(E,)`` share of points with radius ``> eps`` (strict, as ``certified_accuracy``:
    the curve at 0 is the share of correctly classified points with a positive margin,
    and at the training eps it is Table 1's certified accuracy).
  """
  return np.atleast_1d(certify.certified_accuracy(radii, np.atleast_1d(eps)))


def lipschitz_table(
  net,
  power: liplt.PowerState,
  *,
  num_classes: int,
  eval_iters: int,
  sound: soundness.SoundSettings = soundness.DEFAULT_SETTINGS,
  exact_cache: dict | None = None,
) -> dict:
  """Table 2: mean pairwise Lipschitz bounds of every method and mode, sound and estimated.

  Each mode is turned into a ``(K, K)`` pairwise matrix (``liplt.as_pairwise``:
  ``L_ij``, ``L_i + L_j``, ``sqrt(2) L``) and averaged over the ``K (K - 1) / 2`` pairs.

  Args:
    net: the network (``model.lipnet(params)``).
    power: the checkpoint's warm ``PowerState``.
    num_classes: K.
    eval_iters: power iterations of the estimate, from ``power``.
    sound: the sound bounds' settings (``soundness.sound_bounds``).
    exact_cache: of ``soundness.sound_bounds``.

  Returns:
    ``{'sound': {method: {mode: mean}}, 'estimate': {...}, 'kinds': {'sound': {method:
    {mode: kind}}, 'estimate': kind}, 'pairwise_sound': {method: (K, K) ndarray},
    'pairwise_estimate': {method: (K, K) ndarray}, 'info': {method: sound bound info, with
    'seconds'}}``.
  """
  out = {
    "sound": {},
    "estimate": {},
    "kinds": {"sound": {}, "estimate": ESTIMATE_KIND},
    "pairwise_sound": {},
    "pairwise_estimate": {},
    "info": {},
  }
  for method in liplt.METHODS:
    _phase(
      f"sound {method} bound ({sound.estimator}, {sound.iterations} steps where not exact)",
      sound.progress,
    )
    t0 = time.perf_counter()
    bounds, info = soundness.sound_bounds(
      net, method=method, modes=liplt.MODES, warm=power, settings=sound, exact_cache=exact_cache
    )
    info["seconds"] = time.perf_counter() - t0
    out["info"][method] = info
    out["pairwise_sound"][method] = bounds["pairwise"]
    out["sound"][method], out["kinds"]["sound"][method] = {}, {}
    for mode in liplt.MODES:
      pair = liplt.as_pairwise(jnp.asarray(bounds[mode]), mode=mode, num_classes=num_classes)
      out["sound"][method][mode] = certify.mean_pairwise(np.asarray(pair))
      out["kinds"]["sound"][method][mode] = info["kind"]
    out["estimate"][method] = _estimates(net, power, method, eval_iters, num_classes, out)
  return out


def _estimates(net, power, method: str, eval_iters: int, num_classes: int, out: dict) -> dict:
  """``{mode: mean}`` of the power-iteration estimates of ``method`` (``lipschitz_table``);
  the pairwise matrix and its wall time go into ``out``."""
  means = {}
  for mode in liplt.MODES:

    def estimate(n, s, mode=mode):
      with jax.default_matmul_precision("highest"):
        return liplt.lipschitz_bound(n, s, method=method, mode=mode, num_iters=eval_iters)

    t0 = time.perf_counter()
    est, _ = jax.jit(estimate)(net, power)
    if mode == "pairwise":
      out["pairwise_estimate"][method] = np.asarray(est)
      out["info"][method]["estimate_seconds"] = time.perf_counter() - t0
    pair = liplt.as_pairwise(est, mode=mode, num_classes=num_classes)
    means[mode] = certify.mean_pairwise(np.asarray(pair))
  return means


def _phase(message: str, progress: bool) -> None:
  """One line on stderr when a long phase starts (``progress``), above any tqdm bar."""
  if progress:
    tqdm.tqdm.write(f"[certify] {message} ...", file=sys.stderr)


def certificate_row(
  bound: np.ndarray,
  info: dict | None,
  logits: np.ndarray,
  labels: np.ndarray,
  *,
  eps: float,
  extra_eps=(),
  seconds: float = 0.0,
) -> tuple[dict, np.ndarray]:
  """Certified accuracy of one pairwise bound, with what the bound is (JSON-ready).

  Args:
    bound: ``(K, K)`` pairwise bound.
    info: ``soundness`` info of a sound bound, or ``None`` for the estimate.
    logits, labels: the test points.
    eps, extra_eps: the radii reported.
    seconds: wall time of the bound.

  Returns:
    ``(row, radii)``.
  """
  radii = certify.radii_of(logits, labels, bound)
  row = {
    "certified_accuracy": certify.certified_accuracy(radii, eps),
    "certified_accuracy_at": {
      certify.eps_key(e): certify.certified_accuracy(radii, e) for e in (eps, *extra_eps)
    },
    "mean_pairwise": certify.mean_pairwise(bound),
    "seconds": seconds,
  }
  if info is None:
    row["kind"] = ESTIMATE_KIND
    return row, radii
  row.update(
    {
      k: info[k]
      for k in (
        "kind",
        "method",
        "estimator",
        "failure_probability",
        "key",
        "exact_norms",
        "probabilistic_norms",
        "max_rel_err",
        "rescaling",
      )
      if k in info
    }
  )
  row["num_iters"] = info.get("num_iters", 0)
  return row, radii


def sound_settings(config: ml_collections.ConfigDict, run: runs.Run) -> soundness.SoundSettings:
  """The settings of the report's sound bounds, from the certification config: its estimator,
  failure probability, exact size and progress; ``sound_iters`` (0: the training config's);
  one key for every bound (``config.key``; negative: fresh OS entropy, drawn once here)."""
  return soundness.SoundSettings(
    estimator=config.sound_estimator,
    iterations=_sound_iters(config, run),
    key=soundness.seed_of(None if config.key < 0 else config.key),
    failure_probability=config.failure_prob,
    exact_size=config.exact_max_dim,
    progress=config.progress,
  )


def _sound_iters(config, run: runs.Run) -> int:
  return config.sound_iters or run.config.sound_iters


def refined_bound(
  net,
  power: liplt.PowerState,
  *,
  steps: int,
  norms: str = "auto",
  final_iters: int = 300,
  sound: soundness.SoundSettings = soundness.DEFAULT_SETTINGS,
  exact_cache: dict | None = None,
) -> tuple[np.ndarray, dict]:
  """The sound pairwise LipLT bound of the rescaling D optimised for it (Theorem 3.2).

  ``refinement.optimize_scales`` chooses ``D`` (the best of ``D = I``, AOL and ``steps`` Adam
  steps on the mean pairwise bound, judged by its own objective with ``norms``: exact or
  warm-started power iteration, ``final_iters`` iterations to compare the candidates); the
  sound bound (``sound``) of ``rescale(net, D)`` (valid for every ``D > 0``) is then
  computed from its own random start, independent of how ``D`` was chosen.

  Returns:
    ``(bound (K, K), info)``; ``info`` has the sound bound's fields plus ``'scales'`` (the
    chosen candidate and the candidates' objective values) and ``'seconds'`` (total).
  """
  t0 = time.perf_counter()
  _phase(f"optimising the rescaling D ({steps} Adam steps)", sound.progress)
  scales, opt = refinement.optimize_scales(
    net, mode="pairwise", steps=steps, norms=norms, final_iters=final_iters
  )
  _phase(f"sound bound of the rescaled network ({sound.estimator})", sound.progress)
  bound, info = soundness.sound_bound(
    net, scales=scales, mode="pairwise", warm=power, settings=sound, exact_cache=exact_cache
  )
  info["scales"] = {
    "chosen": opt["chosen"],
    "candidates": opt["candidates"],
    "norms": opt["norms"],
    "steps": steps,
  }
  info["seconds"] = time.perf_counter() - t0
  return bound, info


# ------------------------------------------------------------------------ phases


def certificates(
  net, power: liplt.PowerState, lip: dict, row, *, config, sound, exact_cache, scales=None
) -> tuple[dict, dict]:
  """The pairwise LipLT certificate computed every way (the results' ``certificates``): the
  estimate, the sound bound with the power method (``config.compare_power``), the sound
  bound of ``lipschitz_table`` (``lip``), that of the refined rescaling
  (``config.refine``) and, for a run trained with the rescaling, the per-pair minimum of
  the plain bound and that of the training ``D`` (``scales``; ``sound_training_d``, the
  bound the run's final evaluation certified with).

  Args:
    net, power: the run's network and warm ``PowerState``.
    lip: ``lipschitz_table``'s result.
    row: ``certificate_row`` with the test points and radii bound.
    config: the certification config.
    sound, exact_cache: the report's sound-bound settings and exact-norm cache.

  Returns:
    ``(rows, radii)``: the rows by name, and the radii of the certificates not in ``lip``.
  """
  certs, cert_radii = {}, {}
  certs["estimate"], _ = row(
    lip["pairwise_estimate"]["liplt"], None, seconds=lip["info"]["liplt"]["estimate_seconds"]
  )
  certs["estimate"]["num_iters"] = config.eval_iters
  if config.compare_power and sound.estimator != "power":
    iters = config.baseline_sound_iters
    _phase(f"sound liplt bound, power method ({iters} iterations)", sound.progress)
    t0 = time.perf_counter()
    bound, info = soundness.sound_bound(
      net,
      method="liplt",
      mode="pairwise",
      warm=power,
      settings=dataclasses.replace(sound, estimator="power", iterations=iters),
      exact_cache=exact_cache,
    )
    certs["sound_power"], cert_radii["sound_power"] = row(
      bound, info, seconds=time.perf_counter() - t0
    )
  info = lip["info"]["liplt"]
  certs[f"sound_{sound.estimator}"], _ = row(
    lip["pairwise_sound"]["liplt"], info, seconds=info["seconds"]
  )
  if config.refine:
    bound, info = refined_bound(
      net,
      power,
      steps=config.refine_steps,
      norms=config.refine_norms,
      final_iters=config.refine_final_iters,
      sound=sound,
      exact_cache=exact_cache,
    )
    certs["sound_refined"], cert_radii["sound_refined"] = row(bound, info, seconds=info["seconds"])
    certs["sound_refined"]["scales"] = info["scales"]
  if scales is not None:
    _phase("sound bound with the training rescaling D", sound.progress)
    t0 = time.perf_counter()
    bound, info = certify.sound_pairwise(
      net, power, sound=sound, scales=scales, exact_cache=exact_cache
    )
    certs["sound_training_d"], cert_radii["sound_training_d"] = row(
      bound, info, seconds=time.perf_counter() - t0
    )
    certs["sound_training_d"]["rescaled"] = info["rescaled"]
  return certs, cert_radii


def _attacked(config, num_test: int) -> int:
  """How many of the first test points the report attacks (``config.pgd_subset``; 0: all)."""
  return min(config.pgd_subset, num_test) if config.pgd_subset else num_test


def attack_check(
  run: runs.Run, config, images, labels, checked: dict[str, np.ndarray], *, eps: float
) -> tuple[np.ndarray, dict]:
  """PGD on the first ``config.pgd_subset`` points (0: all) against every certificate.

  Args:
    checked: certificate name -> radii ``(N,)``.

  Returns:
    ``(broken, soundness_check)``: which attacked points PGD broke, and the counts.

  Raises:
    RuntimeError: PGD broke a point some certificate certifies at ``eps`` (a soundness bug).
  """
  n = _attacked(config, len(labels))
  steps, restarts = config.pgd_steps, config.pgd_restarts
  _phase(f"PGD on {n} points ({steps} steps x {restarts} restarts)", config.progress)
  broken = attacks.pgd_success(
    run.model,
    run.params,
    images[:n],
    labels[:n],
    eps=eps,
    num_steps=steps,
    num_restarts=restarts,
    batch_size=config.pgd_batch_size,
    seed=config.seed,
    progress=config.progress,
  )
  where = f"eps={eps:.6g}, {run.model.name}, {run.workdir}"
  for what, r in checked.items():
    attacks.raise_on_violation(r[:n] > eps, broken, context=f"{what}, {where}")
  liplt_radii, naive_radii = (
    checked["sound pairwise liplt bound"],
    checked["sound pairwise naive bound"],
  )
  return broken, {
    "points_attacked": int(n),
    "pgd_broken": int(broken.sum()),
    "certified_liplt": int((liplt_radii[:n] > eps).sum()),
    "certified_naive": int((naive_radii[:n] > eps).sum()),
    "certificates_checked": sorted(checked),
    "violations": sum(attacks.check_certificates(r[:n] > eps, broken) for r in checked.values()),
  }


def margin_gradients(
  run: runs.Run, config, images, logits, labels, bound: np.ndarray, *, eps: float
) -> dict | None:
  """How tight the sound pairwise LipLT ``bound`` is on this network (the results'
  ``margin_gradients``; ``None`` without ``config.margin_gradients``).

  ``certify.margin_gradient_norms`` on the first ``config.pgd_subset`` points (0: all): where
  the network is differentiable, their maximum over the points is a lower bound of each
  pair's true Lipschitz constant. Reported: its mean, the bound's ratio to it (mean, min,
  max over the pairs: the bound is at most that much above the true constant), the
  certified accuracy over all the test points with it in place of the bound (the most that
  any valid global pairwise bound of this network could certify: a ceiling, not a
  certificate), and, on the first points, the share whose first-order radius
  (``certify.first_order_radii``: a ceiling for local Lipschitz certificates) exceeds
  ``eps`` beside the share the bound certifies.

  Args:
    run: the loaded run (its evaluated params).
    config: the certification config (``margin_gradients``, ``pgd_subset``,
      ``pgd_batch_size``, ``progress``).
    images, logits, labels: the test points ``(N, H, W, C)`` uint8, ``(N, K)``, ``(N,)``.
    bound: ``(K, K)`` the sound pairwise LipLT bound.
    eps: the radius.
  """
  if not config.margin_gradients:
    return None
  n = _attacked(config, len(labels))
  _phase(f"margin gradients at {n} points", config.progress)
  t0 = time.perf_counter()
  grads = certify.margin_gradient_norms(
    run.model, run.params, images[:n], batch_size=config.pgd_batch_size
  )
  low = grads.max(0, initial=0.0)
  pairs = np.triu_indices(len(low), 1)
  seen = low[pairs] > 0
  ratio = np.asarray(bound)[pairs][seen] / low[pairs][seen]
  first_order = certify.first_order_radii(logits[:n], labels[:n], grads)
  return {
    "points": int(n),
    "mean_pairwise": certify.mean_pairwise(low),
    "bound_ratio": {
      "mean": float(ratio.mean()) if seen.any() else float("nan"),
      "min": float(ratio.min(initial=np.inf)),
      "max": float(ratio.max(initial=0.0)),
    },
    "pairs_with_gradient": int(seen.sum()),
    "ceiling_certified_accuracy": certify.certified_accuracy(
      certify.radii_of(logits, labels, low), eps
    ),
    "first_order_accuracy": certify.certified_accuracy(first_order, eps),
    "certified_accuracy": certify.certified_accuracy(
      certify.radii_of(logits[:n], labels[:n], bound), eps
    ),
    "seconds": time.perf_counter() - t0,
  }


def table1(
  clean: np.ndarray, broken: np.ndarray, radii: dict, lip: dict, certs: dict, *, eps, config
) -> dict:
  """Table 1's row: clean, PGD and (sound pairwise LipLT) certified accuracy at ``eps``."""
  n, liplt_radii = len(broken), radii["liplt"]
  row = {
    "eps": eps,
    "num_test": int(len(clean)),
    "num_pgd": int(n),
    "clean_accuracy": float(clean.mean()),
    "pgd_accuracy": float((clean[:n] & ~broken).mean()) if n else float("nan"),
    "certified_accuracy": certify.certified_accuracy(liplt_radii, eps),
    "naive_certified_accuracy": certify.certified_accuracy(radii["naive"], eps),
    "pgd_subset": {
      "clean_accuracy": float(clean[:n].mean()) if n else float("nan"),
      "certified_accuracy": certify.certified_accuracy(liplt_radii[:n], eps),
    },
    "bound_kind": lip["kinds"]["sound"]["liplt"]["pairwise"],
    "pgd": {"loss": "margin", "steps": config.pgd_steps, "restarts": config.pgd_restarts},
  }
  if "sound_refined" in certs:
    row["refined_certified_accuracy"] = certs["sound_refined"]["certified_accuracy"]
  if "sound_training_d" in certs:
    row["training_d_certified_accuracy"] = certs["sound_training_d"]["certified_accuracy"]
  return row


def compare_run(
  run: runs.Run, config, images, labels, curves: dict, *, eps: float, sound
) -> dict | None:
  """The sound LipLT curve of the run in ``config.compare_workdir`` (if any), added to
  ``curves``; returns the results' ``compare`` (``None`` without a second run)."""
  if not config.compare_workdir:
    return None
  other = runs.load_run(config.compare_workdir)
  if other.config.dataset != run.config.dataset:
    raise ValueError(
      f"--config.compare_workdir={config.compare_workdir!r} is a "
      f"{other.config.dataset} run, {run.workdir} is {run.config.dataset}"
    )
  logits = certify.batched_logits(
    other.model, other.params, images, batch_size=config.eval_batch_size
  )
  bound, info = soundness.sound_bound(
    other.model.lipnet(other.params),
    method="liplt",
    mode="pairwise",
    warm=other.state.power,
    settings=dataclasses.replace(sound, iterations=_sound_iters(config, other)),
  )
  radii = certify.radii_of(logits, labels, bound)
  label = f"{other.label}, LipLT"
  if label in curves:
    label = f"{other.label} ({os.path.basename(os.path.normpath(other.workdir))}), LipLT"
  curves[label] = radii
  return {
    "workdir": other.workdir,
    "label": label,
    "loss": other.config.loss,
    "step": int(other.state.step),
    "bound_kind": info["kind"],
    "clean_accuracy": float((logits.argmax(1) == labels).mean()),
    "certified_accuracy": certify.certified_accuracy(radii, eps),
  }


def figure1(run: runs.Run, curves: dict, outdir: str, *, eps: float, config) -> dict:
  """Figure 1 (``figure1.png`` in ``outdir``) of the radii ``curves`` (label -> ``(N,)``);
  returns the results' ``figure1``."""
  top = config.radius_max or max(float(r.max(initial=0.0)) for r in curves.values()) or 2 * eps
  grid = eps_grid(top, num=config.num_radii)
  png = os.path.join(outdir, "figure1.png")
  values = {k: certified_curve(r, grid) for k, r in curves.items()}
  plots.plot_curves(
    grid,
    values,
    png,
    eps_mark=eps,
    title=f"{run.config.dataset} {run.model.name}: sound pairwise bounds",
  )
  return {
    "eps": grid.tolist(),
    "curves": {k: v.tolist() for k, v in values.items()},
    "criterion": "radius > eps",
    "png": png,
  }


def table2(lip: dict, *, config, sound) -> dict:
  """The results' ``table2``: ``lipschitz_table``'s means and kinds, with how they were made."""
  return {k: lip[k] for k in ("sound", "estimate", "kinds")} | {
    "columns": {"pairwise": "mean L_ij", "per_class": "mean (L_i + L_j)", "global": "sqrt(2) L"},
    "eval_iters": config.eval_iters,
    "sound_iters": sound.iterations,
    "sound_estimator": sound.estimator,
    "sound_bounds": {m: _compact(lip["info"][m]) for m in liplt.METHODS},
  }


# ------------------------------------------------------------------------- the job


def certify_run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Table 1 row, Table 2 and Figure 1 of the run in ``workdir``; see the module docstring.

  Args:
    config: the certification config (``experiments/configs/certify.py``).
    workdir: the training run's directory.

  Returns:
    The results (also written to ``<workdir>/certify/results.json``).

  Raises:
    FileNotFoundError: no checkpoint (or no data).
    RuntimeError: a certified point was broken by PGD (a soundness bug).
  """
  config_schema.validate_certify_config(config)
  run = runs.load_run(workdir)
  images, labels = runs.load_test(
    run, data_dir=config.data_dir, subset=config.test_subset, download=config.download
  )
  eps = float(config.eps or run.config.eps)
  sound, cache = sound_settings(config, run), {}  # exact norms shared by the bounds of one net
  net, power = run.model.lipnet(run.params), run.state.power
  _phase(f"logits of {len(labels)} test points", config.progress)
  logits = certify.batched_logits(run.model, run.params, images, batch_size=config.eval_batch_size)
  lip = lipschitz_table(
    net,
    power,
    num_classes=run.model.num_classes,
    eval_iters=config.eval_iters,
    sound=sound,
    exact_cache=cache,
  )
  radii = {m: certify.radii_of(logits, labels, lip["pairwise_sound"][m]) for m in liplt.METHODS}
  extra_eps = tuple(float(e) for e in config.extra_eps)
  row = functools.partial(
    certificate_row, logits=logits, labels=labels, eps=eps, extra_eps=extra_eps
  )
  certs, cert_radii = certificates(
    net, power, lip, row, config=config, sound=sound, exact_cache=cache, scales=run.scales
  )
  checked = {f"sound pairwise {m} bound": radii[m] for m in liplt.METHODS}
  checked |= {f"{name} pairwise liplt bound": r for name, r in cert_radii.items()}
  broken, check = attack_check(run, config, images, labels, checked, eps=eps)
  gradients = margin_gradients(
    run, config, images, logits, labels, lip["pairwise_sound"]["liplt"], eps=eps
  )
  curves = {f"{run.label}, naive": radii["naive"], f"{run.label}, LipLT": radii["liplt"]}
  compare = compare_run(run, config, images, labels, curves, eps=eps, sound=sound)
  outdir = os.path.join(workdir, "certify")
  os.makedirs(outdir, exist_ok=True)
  clean = logits.argmax(1) == labels
  results = {
    "run": {
      "workdir": workdir,
      "step": int(run.state.step),
      "model": run.model.name,
      "dataset": run.config.dataset,
      "loss": run.config.loss,
    },
    "table1": table1(clean, broken, radii, lip, certs, eps=eps, config=config),
    "certificates": certs,
    "table2": table2(lip, config=config, sound=sound),
    "figure1": figure1(run, curves, outdir, eps=eps, config=config),
    "soundness_check": check,
    "margin_gradients": gradients,
    "compare": compare,
  }
  with open(os.path.join(outdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  return results


def _compact(info: dict) -> dict:
  """A sound bound's info without the per-operator list (``norms``) and tables."""
  drop = ("norms", "interior_norms", "interior_bounds", "layer_norms")
  return {k: v for k, v in info.items() if k not in drop}
