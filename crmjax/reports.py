"""The paper's report of a trained run: Table 1 row, Table 2 and Figure 1.

``certify_run(config, workdir)`` loads the latest checkpoint of a training run (model and
training config rebuilt from the checkpoint's meta) and writes ``<workdir>/certify/``:

* ``results.json``: ``table1`` (clean, PGD and certified accuracy at the training eps; the
  certificate uses the SOUND pairwise LipLT bound), ``table2`` (mean pairwise Lipschitz
  bounds, naive and LipLT, pairwise / per-class / global, both the sound bound and the
  power-iteration estimate, each with its kind), ``figure1`` (certified-radius curves) and
  ``soundness_check`` (points attacked, points certified, violations);
* ``figure1.png``: share of test points certified at each radius, naive vs LipLT (and the
  LipLT curve of a second run, ``config.compare_workdir``).

Every point certified at eps that PGD breaks raises ``RuntimeError('SOUNDNESS BUG ...')``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from crmjax import attacks, certify, checkpoint, data, liplt, models, soundness, train

LOSS_LABELS = {"crm": "CRM", "ce": "standard CE", "gloro": "GloRo"}
ESTIMATE_KIND = "power-iteration estimate (lower estimate, not guaranteed)"
TRAIN_COMMAND = ("python -m experiments.mnist --config=experiments/configs/mnist.py "
                 "--workdir={workdir}  (or experiments.cifar10 / experiments.tiny_imagenet "
                 "with experiments/configs/cifar.py / tiny_imagenet.py)")


@dataclasses.dataclass(frozen=True)
class Run:
  """A restored training run.

  Attributes:
    workdir: the run's directory.
    config: its training config (rebuilt from the checkpoint's ``meta['config']``).
    model: the classifier.
    state: the restored ``crmjax.train.TrainState``.
    meta: the checkpoint's meta dict.
  """

  workdir: str
  config: ml_collections.ConfigDict
  model: models.Model
  state: train.TrainState
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
      f"{TRAIN_COMMAND.format(workdir=workdir)}")
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
          "crmjax.train)", step=step, path=ckpt.step_dir(step))
    config = ml_collections.ConfigDict(stored["config"])
    model = train.make_model(config)
    # The optimizer's state structure does not depend on the schedule length.
    tx = train.make_optimizer(config, total_steps=1)
    replicated, _ = train.make_mesh()
    target = jax.device_put(train.create_state(model, tx, config.seed), replicated)
    state, meta = ckpt.restore(target, step=step, expected_meta={
        "architecture": model.name, "dataset": config.dataset})
  return Run(workdir=workdir, config=config, model=model, state=state, meta=meta)


def load_test(run: Run, *, data_dir: str = "", subset: int = 0, download: bool = False
              ) -> tuple[np.ndarray, np.ndarray]:
  """The run's test split: uint8 images ``(N, H, W, C)`` and int32 labels ``(N,)``."""
  images, labels = data.load_split(run.config.dataset, "test",
                                   data_dir=data_dir or run.config.data_dir or None,
                                   download=download)
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


def lipschitz_table(net, power: liplt.PowerState, *, num_classes: int, power_iters: int,
                    sound_iters: int) -> dict:
  """Table 2: mean pairwise Lipschitz bounds of every method and mode, sound and estimated.

  Each mode is turned into a ``(K, K)`` pairwise matrix (``liplt.as_pairwise``:
  ``L_ij``, ``L_i + L_j``, ``sqrt(2) L``) and averaged over the ``K (K - 1) / 2`` pairs.

  Args:
    net: the network (``model.lipnet(params)``).
    power: the checkpoint's warm ``PowerState``.
    num_classes: K.
    power_iters: power iterations of the estimate, from ``power``.
    sound_iters: power iterations of the sound bound's probabilistic norms.

  Returns:
    ``{'sound': {method: {mode: mean}}, 'estimate': {...}, 'kinds': {'sound': {method:
    {mode: kind}}, 'estimate': kind}, 'pairwise_sound': {method: (K, K) ndarray}}``.
  """
  out = {"sound": {}, "estimate": {}, "kinds": {"sound": {}, "estimate": ESTIMATE_KIND},
         "pairwise_sound": {}}
  for method in liplt.METHODS:
    out["sound"][method], out["estimate"][method], out["kinds"]["sound"][method] = {}, {}, {}
    bounds, info = soundness.sound_bounds(net, method=method, modes=liplt.MODES, warm=power,
                                          num_iters=sound_iters)
    for mode in liplt.MODES:
      bound = bounds[mode]
      if mode == "pairwise":
        out["pairwise_sound"][method] = bound
      pair = liplt.as_pairwise(jnp.asarray(bound), mode=mode, num_classes=num_classes)
      out["sound"][method][mode] = certify.mean_pairwise(np.asarray(pair))
      out["kinds"]["sound"][method][mode] = info["kind"]
      fn = jax.jit(functools.partial(liplt.lipschitz_bound, method=method, mode=mode,
                                     num_iters=power_iters))
      est, _ = fn(net, power)
      pair = liplt.as_pairwise(est, mode=mode, num_classes=num_classes)
      out["estimate"][method][mode] = certify.mean_pairwise(np.asarray(pair))
  return out


def pgd_success(model: models.Model, params, images: np.ndarray, labels: np.ndarray, *,
                eps: float, num_steps: int, num_restarts: int, batch_size: int, seed: int
                ) -> np.ndarray:
  """Whether l2 PGD (margin loss) breaks each point at ``eps``.

  Args:
    images: uint8 ``(N, H, W, C)``; attacked in [0, 1] pixel space.
    labels: ``(N,)``.

  Returns:
    ``(N,)`` bool; misclassified points count as broken.
  """
  logits_fn = functools.partial(model.apply, params)
  attack = jax.jit(lambda x, y, k: attacks.pgd_l2(
      logits_fn, x, y, key=k, eps=eps, num_steps=num_steps, num_restarts=num_restarts,
      loss="margin").success)
  key, out = jax.random.key(seed), []
  for i in range(0, len(images), batch_size):
    x = images[i:i + batch_size].astype(np.float32) / np.float32(255)
    y, n = labels[i:i + batch_size], len(labels[i:i + batch_size])
    pad = batch_size - n if len(images) > batch_size else 0  # one compiled shape
    x, y = np.pad(x, [(0, pad)] + [(0, 0)] * 3), np.pad(y, (0, pad))
    out.append(np.asarray(attack(x, y, jax.random.fold_in(key, i)))[:n])
  return np.concatenate(out) if out else np.zeros(0, bool)


def _sound_iters(config, run: Run) -> int:
  return config.sound_power_iters or run.config.sound_power_iters


def _sound_radii(run: Run, logits, labels, sound_iters) -> tuple[np.ndarray, dict]:
  bound, info = soundness.sound_bound(run.model.lipnet(run.state.params), method="liplt",
                                      mode="pairwise", warm=run.state.power,
                                      num_iters=sound_iters)
  return certify.radii_of(logits, labels, bound), info


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
  run = load_run(workdir)
  images, labels = load_test(run, data_dir=config.data_dir, subset=config.test_subset,
                             download=config.download)
  eps = float(config.eps or run.config.eps)
  params, power, K = run.state.params, run.state.power, run.model.num_classes
  sound_iters = _sound_iters(config, run)
  logits = certify.batched_logits(run.model, params, images, batch_size=config.eval_batch_size)
  clean = logits.argmax(1) == labels

  lip = lipschitz_table(run.model.lipnet(params), power, num_classes=K,
                        power_iters=config.power_iters, sound_iters=sound_iters)
  radii = {m: certify.radii_of(logits, labels, lip["pairwise_sound"][m])
           for m in liplt.METHODS}

  n = min(config.pgd_subset, len(labels)) if config.pgd_subset else len(labels)
  broken = pgd_success(run.model, params, images[:n], labels[:n], eps=eps,
                       num_steps=config.pgd_steps, num_restarts=config.pgd_restarts,
                       batch_size=config.pgd_batch_size, seed=config.seed)
  where = f"eps={eps:.6g}, {run.model.name}, {workdir}"
  for m in liplt.METHODS:
    attacks.raise_on_violation(radii[m][:n] > eps, broken,
                               context=f"sound pairwise {m} bound, {where}")
  table1 = {
      "eps": eps, "num_test": int(len(labels)), "num_pgd": int(n),
      "clean_accuracy": float(clean.mean()),
      "pgd_accuracy": float((clean[:n] & ~broken).mean()) if n else float("nan"),
      "certified_accuracy": certify.certified_accuracy(radii["liplt"], eps),
      "naive_certified_accuracy": certify.certified_accuracy(radii["naive"], eps),
      "pgd_subset": {"clean_accuracy": float(clean[:n].mean()) if n else float("nan"),
                     "certified_accuracy": certify.certified_accuracy(radii["liplt"][:n], eps)},
      "bound_kind": lip["kinds"]["sound"]["liplt"]["pairwise"],
      "pgd": {"loss": "margin", "steps": config.pgd_steps, "restarts": config.pgd_restarts},
  }
  check = {"points_attacked": int(n), "pgd_broken": int(broken.sum()),
           "certified_liplt": int((radii["liplt"][:n] > eps).sum()),
           "certified_naive": int((radii["naive"][:n] > eps).sum()),
           "violations": sum(attacks.check_certificates(radii[m][:n] > eps, broken)
                             for m in liplt.METHODS)}

  curves = {f"{run.label}, naive": radii["naive"], f"{run.label}, LipLT": radii["liplt"]}
  compare = None
  if config.compare_workdir:
    other = load_run(config.compare_workdir)
    if other.config.dataset != run.config.dataset:
      raise ValueError(f"--config.compare_workdir={config.compare_workdir!r} is a "
                       f"{other.config.dataset} run, {workdir} is {run.config.dataset}")
    o_logits = certify.batched_logits(other.model, other.state.params, images,
                                      batch_size=config.eval_batch_size)
    o_radii, info = _sound_radii(other, o_logits, labels, _sound_iters(config, other))
    label = f"{other.label}, LipLT"
    if label in curves:
      label = f"{other.label} ({os.path.basename(os.path.normpath(other.workdir))}), LipLT"
    curves[label] = o_radii
    compare = {"workdir": other.workdir, "label": label, "loss": other.config.loss,
               "step": int(other.state.step), "bound_kind": info["kind"],
               "clean_accuracy": float((o_logits.argmax(1) == labels).mean()),
               "certified_accuracy": certify.certified_accuracy(o_radii, eps)}
  top = config.radius_max or max(float(r.max(initial=0.0)) for r in curves.values()) or 2 * eps
  grid = eps_grid(top, num=config.num_radii)

  outdir = os.path.join(workdir, "certify")
  os.makedirs(outdir, exist_ok=True)
  png = os.path.join(outdir, "figure1.png")
  curve_vals = {k: certified_curve(r, grid) for k, r in curves.items()}
  plot_curves(grid, curve_vals, png, eps_mark=eps,
              title=f"{run.config.dataset} {run.model.name}: sound pairwise bounds")
  results = {
      "run": {"workdir": workdir, "step": int(run.state.step), "model": run.model.name,
              "dataset": run.config.dataset, "loss": run.config.loss},
      "table1": table1,
      "table2": {k: lip[k] for k in ("sound", "estimate", "kinds")} | {
          "columns": {"pairwise": "mean L_ij", "per_class": "mean (L_i + L_j)",
                      "global": "sqrt(2) L"},
          "power_iters": config.power_iters, "sound_power_iters": sound_iters},
      "figure1": {"eps": grid.tolist(), "curves": {k: v.tolist() for k, v in curve_vals.items()},
                  "criterion": "radius > eps", "png": png},
      "soundness_check": check,
      "compare": compare,
  }
  with open(os.path.join(outdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  return results


# ---------------------------------------------------------------------- output


def plot_curves(eps: np.ndarray, curves: dict[str, np.ndarray], path: str, *,
                eps_mark: float | None = None, title: str = "") -> None:
  """Figure 1 as a PNG: one line per curve ``(E,)`` over the radii ``eps`` ``(E,)``."""
  # The object-oriented API draws without pyplot: no global backend switch (Jupyter keeps
  # its inline backend).
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  fig = Figure(figsize=(5, 3.5), dpi=150)
  ax = fig.subplots()
  for label, vals in curves.items():
    ax.plot(eps, 100 * np.asarray(vals), label=label, lw=1.5,
            ls="--" if "naive" in label else "-")
  if eps_mark and len(eps) and eps_mark <= eps[-1]:
    ax.axvline(eps_mark, color="gray", lw=0.8, ls=":", label=f"eps = {eps_mark:.3g}")
  ax.set(xlabel="l2 radius eps", ylabel="certified at eps (% of test points)", ylim=(0, 100),
         xlim=(0, float(eps[-1]) if len(eps) and eps[-1] > 0 else 1.0), title=title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)


def format_table1(results: dict) -> str:
  """The Table 1 row as plain text."""
  t, r = results["table1"], results["run"]
  head = f"{'model':<10}{'loss':<8}{'eps':>8}{'clean %':>10}{'PGD %':>10}{'cert. %':>10}"
  row = (f"{r['model']:<10}{r['loss']:<8}{t['eps']:>8.4g}{100 * t['clean_accuracy']:>10.2f}"
         f"{100 * t['pgd_accuracy']:>10.2f}{100 * t['certified_accuracy']:>10.2f}")
  note = (f"PGD: l2, margin loss, {t['pgd']['steps']} steps x {t['pgd']['restarts']} restarts "
          f"on {t['num_pgd']} of {t['num_test']} points; certified: sound pairwise LipLT "
          f"({t['bound_kind']})")
  return "\n".join(["Table 1", head, row, note])


def format_table2(results: dict) -> str:
  """Table 2 (mean pairwise Lipschitz) as plain text: sound bound and estimate."""
  t = results["table2"]
  lines = ["Table 2: average pairwise Lipschitz over all unique pairs",
           f"{'':<22}{'L_ij':>12}{'L_i + L_j':>12}{'sqrt(2) L':>12}"]
  for kind in ("sound", "estimate"):
    for method in liplt.METHODS:
      vals = "".join(f"{t[kind][method][m]:>12.4g}" for m in liplt.MODES)
      lines.append(f"{method + ' (' + kind + ')':<22}{vals}")
  lines.append(f"sound: {t['kinds']['sound']['liplt']['pairwise']} "
               f"({t['sound_power_iters']} power iterations where not exact)")
  lines.append(f"estimate: {t['kinds']['estimate']}, {t['power_iters']} warm-started "
               "power iterations from the checkpoint")
  return "\n".join(lines)
