"""The certification report's results (``reports.certify_run``) as plain text: the Table 1
row, the pairwise LipLT certificate computed every way, Table 2 and the margin gradients."""

from __future__ import annotations

from crmjax import certify, liplt


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
  "sound_training_d": "sound, min(plain, training D)",
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
  if "sound_training_d" in certs:
    r = certs["sound_training_d"]["rescaled"]
    lines.append(
      f"training D: mean L_ij {r['mean_pairwise_rescaled']:.5g} (plain "
      f"{r['mean_pairwise_plain']:.5g}); sets {r['pairs_from_rescaled']} pairs"
    )
  first = next(iter(certs.values()))["certified_accuracy_at"]
  if any(k != certify.eps_key(t["eps"]) for k in first):
    for name, c in certs.items():
      lines.append(
        f"{CERTIFICATE_LABELS.get(name, name)} at other radii: "
        + ", ".join(f"{k}: {100 * v:.2f}%" for k, v in c["certified_accuracy_at"].items())
      )
  return "\n".join(lines)


def format_margin_gradients(results: dict) -> str:
  """How tight the sound bound is (``reports.margin_gradients``), two lines; ``''`` when the
  report did not compute it."""
  g, t = results.get("margin_gradients"), results.get("table1", {})
  if not g:
    return ""
  r = g["bound_ratio"]
  return (
    f"margin gradients at {g['points']} points: largest ||grad (z_i - z_j)|| mean "
    f"{g['mean_pairwise']:.4g} over pairs (where differentiable, a lower bound of the true "
    f"constant); sound LipLT is {r['mean']:.3f}x it ({r['min']:.3f}-{r['max']:.3f}x); with "
    f"it in place of the bound {100 * g['ceiling_certified_accuracy']:.2f}% of the "
    f"{t.get('num_test', '')} test points certify (the bound: "
    f"{100 * t.get('certified_accuracy', float('nan')):.2f}%), a ceiling for any global "
    f"pairwise bound\n"
    f"first-order radius (margin / its gradient at the point, a ceiling for local Lipschitz "
    f"certificates) > eps at {100 * g['first_order_accuracy']:.2f}% of the {g['points']} "
    f"points (the bound certifies {100 * g['certified_accuracy']:.2f}%)"
  )
