"""The figures: Figure 1 (share of test points certified per radius) and the test curves per
epoch of training runs side by side (``experiments.epoch_curves``).

Both draw with matplotlib's object-oriented API, without pyplot: no global backend switch
(Jupyter keeps its inline backend).
"""

from __future__ import annotations

import numpy as np


def plot_curves(
  eps: np.ndarray,
  curves: dict[str, np.ndarray],
  path: str,
  *,
  eps_mark: float | None = None,
  title: str = "",
) -> None:
  """Figure 1 as a PNG: one line per curve ``(E,)`` over the radii ``eps`` ``(E,)``."""
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
  from matplotlib import colormaps  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  marks = marks or {}
  legend_in = 0.17 * -(-len(runs) // 2)  # the runs' legend below the panels, two columns
  fig = Figure(figsize=(17, 4.3 + legend_in), dpi=100)
  axes = fig.subplots(1, len(EPOCH_PANELS))
  colors = colormaps["tab20"]
  styles = (("gray", "--"), ("tab:red", ":"), ("tab:purple", ":"), ("black", "-."))
  for ax, (key, name, scale, log_axis) in zip(axes, EPOCH_PANELS, strict=True):
    for i, (label, records) in enumerate(runs.items()):  # one colour per run in every panel
      epochs = [r["epoch"] for r in records if key in r]
      values = [scale * r[key] for r in records if key in r]
      ax.plot(epochs, values, color=colors(i % 20), marker=".", lw=1.5, label=label)
    lines = [
      ax.axhline(value, color=styles[i % 4][0], lw=1.2, ls=styles[i % 4][1], label=label)
      for i, (label, value) in enumerate(marks.get(key, {}).items())
    ]
    if log_axis:
      ax.set_yscale("log")
    ax.set(title=name, xlabel="epoch")
    ax.grid(alpha=0.3)
    if lines:
      ax.legend(handles=lines, fontsize=7, loc="lower right")
  # Every run (one without points in the first panel too), below the panels.
  fig.legend(axes[0].get_lines()[: len(runs)], list(runs), loc="lower center", ncol=2, fontsize=7)
  fig.suptitle(title)
  fig.tight_layout(rect=(0, (legend_in + 0.1) / (4.3 + legend_in), 1, 1))
  fig.savefig(path)
