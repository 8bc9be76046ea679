"""The paper's report of a trained run: Table 1 row, Table 2 and Figure 1.

``certify_run(config, workdir)`` loads the latest checkpoint of a training run (model and
training config rebuilt from the checkpoint's meta) and writes ``<workdir>/certify/``:

* ``results.json``: ``table1`` (clean, PGD and certified accuracy at the training eps; the
  certificate uses the SOUND pairwise LipLT bound), ``certificates`` (certified accuracy
  at eps of the pairwise LipLT bound computed every way: the power-iteration estimate, the
  sound bound with the power method (the former default, ``config.compare_power``), the
  sound bound with Lanczos, and the sound bound of the Theorem 3.2 rescaling optimised by
  ``refinement.optimize_scales`` (``config.refine``); each with its kind, estimator,
  failure probability, key, exact / probabilistic norm counts and wall time), ``table2``
  (mean pairwise Lipschitz bounds, naive and LipLT, pairwise / per-class / global, both
  the sound bound and the power-iteration estimate, each with its kind), ``figure1``
  (certified-radius curves) and ``soundness_check`` (points attacked, points certified,
  violations of any certificate);
* ``figure1.png``: share of test points certified at each radius, naive vs LipLT (and the
  LipLT curve of a second run, ``config.compare_workdir``).

Every point certified at eps (by any sound certificate) that PGD breaks raises
``RuntimeError('SOUNDNESS BUG ...')``. Logits and the attack run at the highest matmul
precision. With ``config.progress`` each long phase shows a tqdm bar or a line (stderr).

``epoch_records`` / ``plot_epoch_curves`` read runs' ``metrics.jsonl`` and draw their test
curves per epoch side by side (``experiments.epoch_curves``).
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
  checkpoint,
  config_schema,
  data,
  liplt,
  models,
  refinement,
  soundness,
  train_state,
)

LOSS_LABELS = {"crm": "CRM", "ce": "standard CE", "gloro": "GloRo"}
ESTIMATE_KIND = "power-iteration estimate (lower estimate, not guaranteed)"
TRAIN_COMMAND = (
  "python -m experiments.mnist --config=experiments/configs/mnist.py "
  "--workdir={workdir}  (or experiments.cifar10 / experiments.tiny_imagenet "
  "with experiments/configs/cifar.py / tiny_imagenet.py)"
)


@dataclasses.dataclass(frozen=True)
class Run:
  """A restored training run.

  Attributes:
    workdir: the run's directory.
    config: its training config (rebuilt from the checkpoint's ``meta['config']``, old
      old fields renamed and missing ones filled by
      ``config_schema.stored_config``).
    model: the classifier.
    state: the restored ``crmjax.train_state.TrainState``.
    meta: the checkpoint's meta dict.
  """

  workdir: str
  config: ml_collections.ConfigDict
  model: models.Model
  state: train_state.TrainState
  meta: dict

  @property
  def label(self) -> str:
    return LOSS_LABELS.get(self.config.loss, self.config.loss)


# ------------------------------------------------------------------------- loading


def load_run(workdir: str) -> Run:
  """Restores the latest checkpoint of ``workdir`` (written by ``train.train_and_evaluate``).

  Raises:
    FileNotFoundError: ``workdir`` holds no complete checkpoint (the message names the
      training command).
    crmjax.checkpoint.CheckpointError: the checkpoint is corrupt or does not match.
  """
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  missing = FileNotFoundError(
    f"no checkpoint in {directory}: train the run first, e.g. "
    f"{TRAIN_COMMAND.format(workdir=workdir)}"
  )
  if not os.path.isdir(directory):  # checked first: Checkpointer would create it
    raise missing
  with checkpoint.Checkpointer(directory) as ckpt:
    step = ckpt.latest_step()
    if step is None:
      raise missing
    stored = ckpt.read_meta(step)
    if "config" not in stored:
      raise checkpoint.CorruptCheckpointError(
        f"checkpoint step {step} in {directory} has no meta['config'] (not written by "
        "crmjax.train)",
        step=step,
        path=ckpt.step_dir(step),
      )
    config = config_schema.stored_config(stored["config"])
    model = train_state.make_model(config)
    # The optimizer's state structure does not depend on the schedule length.
    tx = train_state.make_optimizer(config, total_steps=1)
    replicated, _ = train_state.make_mesh()
    state, meta = ckpt.restore(
      train_state.abstract_state(model, tx, config.seed, replicated),
      step=step,
      expected_meta={"architecture": model.name, "dataset": config.dataset},
    )
  return Run(workdir=workdir, config=config, model=model, state=state, meta=meta)


def load_test(
  run: Run, *, data_dir: str = "", subset: int = 0, download: bool = False
) -> tuple[np.ndarray, np.ndarray]:
  """The run's test split: uint8 images ``(N, H, W, C)`` and int32 labels ``(N,)``."""
  images, labels = data.load_split(
    run.config.dataset, "test", data_dir=data_dir or run.config.data_dir or None, download=download
  )
  if subset:
    images, labels = images[:subset], labels[:subset]
  return images, np.asarray(labels, np.int32)


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
  sound_iters: int,
  estimator: str = "lanczos",
  key: int | jax.Array | None = None,
  failure_prob: float = 1e-6,
  exact_max_dim: int = soundness.EXACT_MAX_DIM,
  progress: bool = False,
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
    sound_iters: Lanczos steps (or power iterations) of the sound bound's probabilistic norms.
    estimator, key, failure_prob, exact_max_dim, progress, exact_cache: of
      ``soundness.sound_bounds``.

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
    out["sound"][method], out["estimate"][method], out["kinds"]["sound"][method] = {}, {}, {}
    _phase(f"sound {method} bound ({estimator}, {sound_iters} steps where not exact)", progress)
    t0 = time.perf_counter()
    bounds, info = soundness.sound_bounds(
      net,
      method=method,
      modes=liplt.MODES,
      warm=power,
      num_iters=sound_iters,
      estimator=estimator,
      key=key,
      failure_prob=failure_prob,
      exact_max_dim=exact_max_dim,
      progress=progress,
      exact_cache=exact_cache,
    )
    info["seconds"] = time.perf_counter() - t0
    out["info"][method] = info
    for mode in liplt.MODES:
      bound = bounds[mode]
      if mode == "pairwise":
        out["pairwise_sound"][method] = bound
      pair = liplt.as_pairwise(jnp.asarray(bound), mode=mode, num_classes=num_classes)
      out["sound"][method][mode] = certify.mean_pairwise(np.asarray(pair))
      out["kinds"]["sound"][method][mode] = info["kind"]

      def estimate(n, s, mode=mode, method=method):
        with jax.default_matmul_precision("highest"):
          return liplt.lipschitz_bound(n, s, method=method, mode=mode, num_iters=eval_iters)

      t0 = time.perf_counter()
      est, _ = jax.jit(estimate)(net, power)
      if mode == "pairwise":
        out["pairwise_estimate"][method] = np.asarray(est)
        out["info"][method]["estimate_seconds"] = time.perf_counter() - t0
      pair = liplt.as_pairwise(est, mode=mode, num_classes=num_classes)
      out["estimate"][method][mode] = certify.mean_pairwise(np.asarray(pair))
  return out


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


def pgd_attack(model: models.Model, params, *, eps: float, num_steps: int, num_restarts: int):
  """Jitted ``(x, y, key) -> success`` of l2 PGD (margin loss), traced at the highest matmul
  precision (as the logits of the certificates it checks)."""
  logits_fn = functools.partial(model.apply, params)

  def attack_fn(x, y, k):
    with jax.default_matmul_precision("highest"):
      return attacks.pgd_l2(
        logits_fn,
        x,
        y,
        key=k,
        eps=eps,
        num_steps=num_steps,
        num_restarts=num_restarts,
        loss="margin",
      ).success

  return jax.jit(attack_fn)


def pgd_success(
  model: models.Model,
  params,
  images: np.ndarray,
  labels: np.ndarray,
  *,
  eps: float,
  num_steps: int,
  num_restarts: int,
  batch_size: int,
  seed: int,
  progress: bool = False,
) -> np.ndarray:
  """Whether l2 PGD (margin loss) breaks each point at ``eps``.

  The logits of the attack are computed at the highest matmul precision (as the logits of
  the certificates it checks).

  Args:
    images: uint8 ``(N, H, W, C)``; attacked in [0, 1] pixel space.
    labels: ``(N,)``.
    progress: a tqdm bar over the batches (stderr).

  Returns:
    ``(N,)`` bool; misclassified points count as broken.
  """
  attack = pgd_attack(model, params, eps=eps, num_steps=num_steps, num_restarts=num_restarts)
  key, out = jax.random.key(seed), []
  for i in tqdm.trange(
    0,
    len(images),
    batch_size,
    desc="PGD",
    unit=" batches",
    disable=not progress,
    file=sys.stderr,
    leave=False,
  ):
    x = images[i : i + batch_size].astype(np.float32) / np.float32(255)
    y, n = labels[i : i + batch_size], len(labels[i : i + batch_size])
    pad = batch_size - n if len(images) > batch_size else 0  # one compiled shape
    x, y = np.pad(x, [(0, pad)] + [(0, 0)] * 3), np.pad(y, (0, pad))
    out.append(np.asarray(attack(x, y, jax.random.fold_in(key, i)))[:n])
  return np.concatenate(out) if out else np.zeros(0, bool)


def _sound_iters(config, run: Run) -> int:
  return config.sound_iters or run.config.sound_iters


def _key(config) -> int:
  """The seed of every sound bound of the report: ``config.key``, or fresh OS entropy."""
  return soundness.seed_of(None if config.key < 0 else config.key)


def _sound_radii(run: Run, logits, labels, sound_iters, *, key, config) -> tuple[np.ndarray, dict]:
  bound, info = soundness.sound_bound(
    run.model.lipnet(run.state.params),
    method="liplt",
    mode="pairwise",
    warm=run.state.power,
    num_iters=sound_iters,
    estimator=config.sound_estimator,
    key=key,
    failure_prob=config.failure_prob,
    exact_max_dim=config.exact_max_dim,
    progress=config.progress,
  )
  return certify.radii_of(logits, labels, bound), info


def refined_bound(
  net,
  power: liplt.PowerState,
  *,
  steps: int,
  sound_iters: int,
  norms: str = "auto",
  final_iters: int = 300,
  estimator: str = "lanczos",
  key: int | jax.Array | None = None,
  failure_prob: float = 1e-6,
  exact_max_dim: int = soundness.EXACT_MAX_DIM,
  progress: bool = False,
  exact_cache: dict | None = None,
) -> tuple[np.ndarray, dict]:
  """The sound pairwise LipLT bound of the rescaling D optimised for it (Theorem 3.2).

  ``refinement.optimize_scales`` chooses ``D`` (the best of ``D = I``, AOL and ``steps`` Adam
  steps on the mean pairwise bound, judged by its own objective with ``norms``: exact or
  warm-started power iteration, ``final_iters`` iterations to compare the candidates); the
  sound bound of
  ``rescale(net, D)`` (valid for every ``D > 0``) is then computed from its own random
  start, independent of how ``D`` was chosen.

  Returns:
    ``(bound (K, K), info)``; ``info`` has the sound bound's fields plus ``'scales'`` (the
    chosen candidate and the candidates' objective values) and ``'seconds'`` (total).
  """
  t0 = time.perf_counter()
  _phase(f"optimising the rescaling D ({steps} Adam steps)", progress)
  scales, opt = refinement.optimize_scales(
    net, mode="pairwise", steps=steps, norms=norms, final_iters=final_iters
  )
  _phase(f"sound bound of the rescaled network ({estimator})", progress)
  bound, info = soundness.sound_bound(
    net,
    scales=scales,
    mode="pairwise",
    warm=power,
    num_iters=sound_iters,
    estimator=estimator,
    key=key,
    failure_prob=failure_prob,
    exact_max_dim=exact_max_dim,
    progress=progress,
    exact_cache=exact_cache,
  )
  info["scales"] = {
    "chosen": opt["chosen"],
    "candidates": opt["candidates"],
    "norms": opt["norms"],
    "steps": steps,
  }
  info["seconds"] = time.perf_counter() - t0
  return bound, info


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
  run = load_run(workdir)
  images, labels = load_test(
    run, data_dir=config.data_dir, subset=config.test_subset, download=config.download
  )
  eps = float(config.eps or run.config.eps)
  extra_eps = tuple(float(e) for e in config.extra_eps)
  params, power, K = run.state.params, run.state.power, run.model.num_classes
  sound_iters, key, progress = _sound_iters(config, run), _key(config), config.progress
  net = run.model.lipnet(params)
  _phase(f"logits of {len(labels)} test points", progress)
  logits = certify.batched_logits(run.model, params, images, batch_size=config.eval_batch_size)
  clean = logits.argmax(1) == labels

  # exact norms are shared by the bounds of the same network (Lanczos and power method)
  sound_kw = dict(
    key=key,
    failure_prob=config.failure_prob,
    exact_max_dim=config.exact_max_dim,
    progress=progress,
    exact_cache={},
  )
  lip = lipschitz_table(
    net,
    power,
    num_classes=K,
    eval_iters=config.eval_iters,
    sound_iters=sound_iters,
    estimator=config.sound_estimator,
    **sound_kw,
  )
  radii = {m: certify.radii_of(logits, labels, lip["pairwise_sound"][m]) for m in liplt.METHODS}

  # The pairwise LipLT certificate computed every way (table "certificates").
  row = functools.partial(
    certificate_row, logits=logits, labels=labels, eps=eps, extra_eps=extra_eps
  )
  certs, cert_radii = {}, {}
  certs["estimate"], _ = row(
    lip["pairwise_estimate"]["liplt"], None, seconds=lip["info"]["liplt"]["estimate_seconds"]
  )
  certs["estimate"]["num_iters"] = config.eval_iters
  if config.compare_power and config.sound_estimator != "power":
    _phase(f"sound liplt bound, power method ({config.baseline_sound_iters} iterations)", progress)
    t0 = time.perf_counter()
    bound, info = soundness.sound_bound(
      net,
      method="liplt",
      mode="pairwise",
      warm=power,
      estimator="power",
      num_iters=config.baseline_sound_iters,
      **sound_kw,
    )
    certs["sound_power"], cert_radii["sound_power"] = row(
      bound, info, seconds=time.perf_counter() - t0
    )
  info = lip["info"]["liplt"]
  certs[f"sound_{config.sound_estimator}"], _ = row(
    lip["pairwise_sound"]["liplt"], info, seconds=info["seconds"]
  )
  if config.refine:
    bound, info = refined_bound(
      net,
      power,
      steps=config.refine_steps,
      sound_iters=sound_iters,
      norms=config.refine_norms,
      final_iters=config.refine_final_iters,
      estimator=config.sound_estimator,
      **sound_kw,
    )
    certs["sound_refined"], cert_radii["sound_refined"] = row(bound, info, seconds=info["seconds"])
    certs["sound_refined"]["scales"] = info["scales"]

  n = min(config.pgd_subset, len(labels)) if config.pgd_subset else len(labels)
  _phase(f"PGD on {n} points ({config.pgd_steps} steps x {config.pgd_restarts} restarts)", progress)
  broken = pgd_success(
    run.model,
    params,
    images[:n],
    labels[:n],
    eps=eps,
    num_steps=config.pgd_steps,
    num_restarts=config.pgd_restarts,
    batch_size=config.pgd_batch_size,
    seed=config.seed,
    progress=progress,
  )
  where = f"eps={eps:.6g}, {run.model.name}, {workdir}"
  checked = {f"sound pairwise {m} bound": radii[m] for m in liplt.METHODS}
  checked |= {f"{name} pairwise liplt bound": r for name, r in cert_radii.items()}
  for what, r in checked.items():
    attacks.raise_on_violation(r[:n] > eps, broken, context=f"{what}, {where}")
  table1 = {
    "eps": eps,
    "num_test": int(len(labels)),
    "num_pgd": int(n),
    "clean_accuracy": float(clean.mean()),
    "pgd_accuracy": float((clean[:n] & ~broken).mean()) if n else float("nan"),
    "certified_accuracy": certify.certified_accuracy(radii["liplt"], eps),
    "naive_certified_accuracy": certify.certified_accuracy(radii["naive"], eps),
    "pgd_subset": {
      "clean_accuracy": float(clean[:n].mean()) if n else float("nan"),
      "certified_accuracy": certify.certified_accuracy(radii["liplt"][:n], eps),
    },
    "bound_kind": lip["kinds"]["sound"]["liplt"]["pairwise"],
    "pgd": {"loss": "margin", "steps": config.pgd_steps, "restarts": config.pgd_restarts},
  }
  if "sound_refined" in certs:
    table1["refined_certified_accuracy"] = certs["sound_refined"]["certified_accuracy"]
  check = {
    "points_attacked": int(n),
    "pgd_broken": int(broken.sum()),
    "certified_liplt": int((radii["liplt"][:n] > eps).sum()),
    "certified_naive": int((radii["naive"][:n] > eps).sum()),
    "certificates_checked": sorted(checked),
    "violations": sum(attacks.check_certificates(r[:n] > eps, broken) for r in checked.values()),
  }

  curves = {f"{run.label}, naive": radii["naive"], f"{run.label}, LipLT": radii["liplt"]}
  compare = None
  if config.compare_workdir:
    other = load_run(config.compare_workdir)
    if other.config.dataset != run.config.dataset:
      raise ValueError(
        f"--config.compare_workdir={config.compare_workdir!r} is a "
        f"{other.config.dataset} run, {workdir} is {run.config.dataset}"
      )
    o_logits = certify.batched_logits(
      other.model, other.state.params, images, batch_size=config.eval_batch_size
    )
    o_radii, info = _sound_radii(
      other, o_logits, labels, _sound_iters(config, other), key=key, config=config
    )
    label = f"{other.label}, LipLT"
    if label in curves:
      label = f"{other.label} ({os.path.basename(os.path.normpath(other.workdir))}), LipLT"
    curves[label] = o_radii
    compare = {
      "workdir": other.workdir,
      "label": label,
      "loss": other.config.loss,
      "step": int(other.state.step),
      "bound_kind": info["kind"],
      "clean_accuracy": float((o_logits.argmax(1) == labels).mean()),
      "certified_accuracy": certify.certified_accuracy(o_radii, eps),
    }
  top = config.radius_max or max(float(r.max(initial=0.0)) for r in curves.values()) or 2 * eps
  grid = eps_grid(top, num=config.num_radii)

  outdir = os.path.join(workdir, "certify")
  os.makedirs(outdir, exist_ok=True)
  png = os.path.join(outdir, "figure1.png")
  curve_vals = {k: certified_curve(r, grid) for k, r in curves.items()}
  plot_curves(
    grid,
    curve_vals,
    png,
    eps_mark=eps,
    title=f"{run.config.dataset} {run.model.name}: sound pairwise bounds",
  )
  results = {
    "run": {
      "workdir": workdir,
      "step": int(run.state.step),
      "model": run.model.name,
      "dataset": run.config.dataset,
      "loss": run.config.loss,
    },
    "table1": table1,
    "certificates": certs,
    "table2": {k: lip[k] for k in ("sound", "estimate", "kinds")}
    | {
      "columns": {"pairwise": "mean L_ij", "per_class": "mean (L_i + L_j)", "global": "sqrt(2) L"},
      "eval_iters": config.eval_iters,
      "sound_iters": sound_iters,
      "sound_estimator": config.sound_estimator,
      "sound_bounds": {m: _compact(lip["info"][m]) for m in liplt.METHODS},
    },
    "figure1": {
      "eps": grid.tolist(),
      "curves": {k: v.tolist() for k, v in curve_vals.items()},
      "criterion": "radius > eps",
      "png": png,
    },
    "soundness_check": check,
    "compare": compare,
  }
  with open(os.path.join(outdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  return results


def _compact(info: dict) -> dict:
  """A sound bound's info without the per-operator list (``norms``) and tables."""
  drop = ("norms", "interior_norms", "interior_bounds", "layer_norms")
  return {k: v for k, v in info.items() if k not in drop}


# ---------------------------------------------------------------------- output


def plot_curves(
  eps: np.ndarray,
  curves: dict[str, np.ndarray],
  path: str,
  *,
  eps_mark: float | None = None,
  title: str = "",
) -> None:
  """Figure 1 as a PNG: one line per curve ``(E,)`` over the radii ``eps`` ``(E,)``."""
  # The object-oriented API draws without pyplot: no global backend switch (Jupyter keeps
  # its inline backend).
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  fig = Figure(figsize=(5, 3.5), dpi=150)
  ax = fig.subplots()
  for label, vals in curves.items():
    ax.plot(eps, 100 * np.asarray(vals), label=label, lw=1.5, ls="--" if "naive" in label else "-")
  if eps_mark and len(eps) and eps_mark <= eps[-1]:
    ax.axvline(eps_mark, color="gray", lw=0.8, ls=":", label=f"eps = {eps_mark:.3g}")
  ax.set(
    xlabel="l2 radius eps",
    ylabel="certified at eps (% of test points)",
    ylim=(0, 100),
    xlim=(0, float(eps[-1]) if len(eps) and eps[-1] > 0 else 1.0),
    title=title,
  )
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)


# The panels of ``plot_epoch_curves``: a ``metrics.jsonl`` key, its axis title, the factor
# from the record to the axis, and whether the axis is logarithmic.
EPOCH_PANELS = (
  ("test/certified_accuracy_estimate", "certified accuracy at eps (%, estimate)", 100.0, False),
  ("test/clean_accuracy", "clean accuracy (%)", 100.0, False),
  ("test/mean_pairwise_lipschitz_estimate", "mean pairwise Lipschitz bound (estimate)", 1.0, True),
)


def epoch_records(path: str) -> list[dict]:
  """The per-epoch records of a run's ``metrics.jsonl`` (``summary.MetricWriter``), by epoch.

  A resumed run may log an epoch twice (once per attempt); the last record of each counts.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no {path}: give the workdir of a training run (its metrics.jsonl)")
  by_epoch = {}
  with open(path) as f:
    for line in f:
      if line.strip():
        record = json.loads(line)
        if "epoch" in record:
          by_epoch[int(record["epoch"])] = record
  return [by_epoch[e] for e in sorted(by_epoch)]


def plot_epoch_curves(
  runs: dict[str, list[dict]],
  path: str,
  *,
  marks: dict[str, dict[str, float]] | None = None,
  title: str = "",
) -> None:
  """Test curves per epoch as a PNG: one panel per ``EPOCH_PANELS`` metric, one line per run.

  Args:
    runs: label -> the run's per-epoch records (``epoch_records``); an epoch without a test
      evaluation (``eval_every_epochs``) has no point.
    path: the PNG to write.
    marks: metric key -> {label: value}: horizontal reference lines (targets, other papers),
      in the panel's units (percent for accuracies).
    title: the figure's title.
  """
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  marks = marks or {}
  fig = Figure(figsize=(17, 4.3), dpi=100)
  axes = fig.subplots(1, len(EPOCH_PANELS))
  styles = (("gray", "--"), ("tab:red", ":"), ("tab:purple", ":"), ("black", "-."))
  for ax, (key, name, scale, log_axis) in zip(axes, EPOCH_PANELS, strict=True):
    for i, (label, records) in enumerate(runs.items()):  # one colour per run in every panel
      epochs = [r["epoch"] for r in records if key in r]
      values = [scale * r[key] for r in records if key in r]
      ax.plot(epochs, values, color=f"C{i % 10}", marker=".", lw=1.5, label=label)
    lines = [
      ax.axhline(value, color=styles[i % 4][0], lw=1.2, ls=styles[i % 4][1], label=label)
      for i, (label, value) in enumerate(marks.get(key, {}).items())
    ]
    if log_axis:
      ax.set_yscale("log")
    ax.set(title=name, xlabel="epoch")
    ax.grid(alpha=0.3)
    if ax is axes[0]:  # every run (one without points here too), with this panel's marks
      ax.legend(fontsize=7, loc="lower right")
    elif lines:
      ax.legend(handles=lines, fontsize=7, loc="lower right")
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path)


def format_table1(results: dict) -> str:
  """The Table 1 row as plain text."""
  t, r = results["table1"], results["run"]
  head = f"{'model':<10}{'loss':<8}{'eps':>8}{'clean %':>10}{'PGD %':>10}{'cert. %':>10}"
  row = (
    f"{r['model']:<10}{r['loss']:<8}{t['eps']:>8.4g}{100 * t['clean_accuracy']:>10.2f}"
    f"{100 * t['pgd_accuracy']:>10.2f}{100 * t['certified_accuracy']:>10.2f}"
  )
  note = (
    f"PGD: l2, margin loss, {t['pgd']['steps']} steps x {t['pgd']['restarts']} restarts "
    f"on {t['num_pgd']} of {t['num_test']} points; certified: sound pairwise LipLT "
    f"({t['bound_kind']})"
  )
  return "\n".join(["Table 1", head, row, note])


def format_table2(results: dict) -> str:
  """Table 2 (mean pairwise Lipschitz) as plain text: sound bound and estimate."""
  t = results["table2"]
  lines = [
    "Table 2: average pairwise Lipschitz over all unique pairs",
    f"{'':<22}{'L_ij':>12}{'L_i + L_j':>12}{'sqrt(2) L':>12}",
  ]
  for kind in ("sound", "estimate"):
    for method in liplt.METHODS:
      vals = "".join(f"{t[kind][method][m]:>12.4g}" for m in liplt.MODES)
      lines.append(f"{method + ' (' + kind + ')':<22}{vals}")
  lines.append(
    f"sound: {t['kinds']['sound']['liplt']['pairwise']} "
    f"({t['sound_iters']} {t['sound_estimator']} steps where not exact)"
  )
  lines.append(
    f"estimate: {t['kinds']['estimate']}, {t['eval_iters']} warm-started "
    "power iterations from the checkpoint"
  )
  return "\n".join(lines)


CERTIFICATE_LABELS = {
  "estimate": "estimate (power iteration, not guaranteed)",
  "sound_power": "sound, power method (former)",
  "sound_lanczos": "sound, Lanczos",
  "sound_refined": "sound, refined D (Thm 3.2 rescaling)",
}


def format_certificates(results: dict) -> str:
  """The pairwise LipLT certificate computed every way, as plain text (``certificates``)."""
  t, certs = results["table1"], results["certificates"]
  head = f"{'pairwise LipLT bound':<40}{'cert. %':>9}{'mean L_ij':>11}{'seconds':>9}  kind"
  lines = [f"Certified accuracy at eps = {t['eps']:.4g}", head]
  for name, c in certs.items():
    label = CERTIFICATE_LABELS.get(name, name)
    kind = c["kind"]
    if c.get("probabilistic_norms"):
      kind += (
        f"; {c['exact_norms']} exact + {c['probabilistic_norms']} {c['estimator']} "
        f"norms, {c['num_iters']} steps, key {c['key']}"
      )
    elif "exact_norms" in c:
      kind += f"; {c['exact_norms']} exact norms"
    lines.append(
      f"{label:<40}{100 * c['certified_accuracy']:>9.2f}{c['mean_pairwise']:>11.5g}"
      f"{c['seconds']:>9.1f}  {kind}"
    )
  if "sound_refined" in certs:
    sc = certs["sound_refined"]["scales"]
    lines.append(
      f"refined D: {sc['chosen']} of "
      + ", ".join(f"{k} {v:.5g}" for k, v in sc["candidates"].items())
      + f" (mean L_ij by the optimiser's {sc['norms']} objective)"
    )
  first = next(iter(certs.values()))["certified_accuracy_at"]
  if any(k != certify.eps_key(t["eps"]) for k in first):
    for name, c in certs.items():
      lines.append(
        f"{CERTIFICATE_LABELS.get(name, name)} at other radii: "
        + ", ".join(f"{k}: {100 * v:.2f}%" for k, v in c["certified_accuracy_at"].items())
      )
  return "\n".join(lines)
