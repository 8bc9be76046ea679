"""A rerunnable mutation check: plant small bugs in a COPY of the repo, see which tests notice.

Each mutation replaces one exact piece of library source by a plausible bug (a dropped
factor, a transposed index, a stopped gradient, a skipped branch) and runs the tests named
for it against the copy. A mutation is *killed* when those tests fail and *survives* when
they pass: a survivor is a test that cannot see the bug it is named for. The working tree
is never touched: the tracked and untracked (not ignored) files are copied to a temporary
directory once, and each mutation is applied to the copy and undone after its run.

Usage (from the repo root; ``tools/`` lies outside pytest's test paths)::

  python tools/mutation_check.py --list              # the mutations and whether they apply
  python tools/mutation_check.py                     # all: ~30 min on a busy 2-core CPU
  python tools/mutation_check.py --only losses-count-zero,attacks-restart-at-x
  nice -n 10 python tools/mutation_check.py > /tmp/mutation.log 2>&1 &

Options: ``--keep-going`` runs every selected test instead of stopping at the first
failure (slower; shows which tests see each bug), ``--no-baseline`` skips running each
test selection on the unmutated copy first (the baseline guards against counting a
pre-existing failure as a kill), ``--timeout`` bounds each pytest run (seconds; a timeout
counts as killed, reported as such), ``--out`` keeps the per-mutation pytest logs and
``report.md`` / ``report.json`` there.

Every entry's ``old`` text must occur exactly once in its file, or nothing runs: the check
stops with an error naming the entry, the file, the pattern and how often it occurs (the
code moved on: re-point the entry at today's code; nothing is guessed, and no row of the
audit is silently dropped). ``--list`` shows the entries and fails the same way. Exit
status: 0 when no mutation survived, 1 otherwise, 2 on an entry that does not apply or a
baseline failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutation:
  """``old`` -> ``new`` in ``path`` (``old`` occurs exactly once); ``tests``: pytest arguments."""

  name: str
  path: str
  old: str
  new: str
  tests: tuple[str, ...]
  why: str  # the bug it stands for

  def problem(self, root: str) -> str | None:
    """Why the entry does not apply to the tree at ``root`` (None: it applies)."""
    path = os.path.join(root, self.path)
    if not os.path.isfile(path):
      return f"mutation {self.name!r}: file {self.path} does not exist"
    with open(path) as f:
      count = f.read().count(self.old)
    if count == 1:
      return None
    return (
      f"mutation {self.name!r}: its pattern occurs {count} times in {self.path}, not once;"
      f" re-point the entry in tools/mutation_check.py at today's code. Pattern: {self.old!r}"
    )


SOUND_PROB = (
  "tests/test_certify.py",
  "tests/test_soundness.py",
  "tests/test_lanczos.py",
  "-k",
  "probabilistic or kw or rel_err or power or lanczos",
)
# Test-split images through the training augmentation (pixel space -> [0, 1] -> pixel space).
AUGMENTED = (
  "np.rint(input_pipeline.augment_batch({x}.astype(np.float32) / 255, augment={a},"
  " rng=np.random.default_rng(0)) * 255).astype(np.uint8)"
)
EVAL_SPLIT = ("tests/test_eval_split.py",)
TRAIN_BOUND = (  # the end of the CRM bound in the loss (train_step.training_bound)
  "    scales=None if log_d is None else [jnp.exp(l) for l in log_d],\n  )\n"
)

MUTATIONS = [
  Mutation(
    "lanczos-no-power-step",
    "crmjax/liplt.py",
    "v = _per_row(theta[:, -1], w) * ritz + _per_row(y[:, -1], w) * w",
    "v = _per_row(theta[:, -1], w) * ritz",
    ("tests/test_liplt.py::test_lanczos_iterate_is_the_ritz_vector_of_the_krylov_space",),
    "the Lanczos step drops the power step its last product paid for",
  ),
  Mutation(
    "lanczos-no-reorthogonalisation",
    "crmjax/liplt.py",
    "  for _ in range(2):\n    for q in basis:",
    "  for _ in range(0):\n    for q in basis:",
    ("tests/test_liplt.py::test_lanczos_iterate_is_the_ritz_vector_of_the_krylov_space",),
    "the Lanczos residual is not orthogonalised against the basis",
  ),
  Mutation(
    "ema-not-evaluated",
    "crmjax/train_state.py",
    "return state.params if ema is None else ema",
    "return state.params",
    ("tests/test_train.py::test_a_run_with_ema_evaluates_and_saves_the_average",),
    "a run with a moving average evaluates and certifies the raw weights",
  ),
  Mutation(
    "bound-every-unweighted",
    "crmjax/train_step.py",
    "lip = value + every * (lip - value)",
    "lip = value + (lip - value)",
    (
      "tests/test_train.py::"
      "test_bound_every_n_steps_weights_the_bounds_gradient_and_reuses_its_value",
    ),
    "the step computing the bound every N steps does not weight its gradient by N",
  ),
  Mutation(
    "bound-every-never-reused",
    "crmjax/train.py",
    'if reuse and "pairwise_bound" in carry:',
    'if False and reuse and "pairwise_bound" in carry:',
    (
      "tests/test_train.py::test_a_run_with_the_bound_every_n_steps_alternates_and_resumes_bitwise",
    ),
    "bound_every_steps > 1 computes the bound every step anyway (no speed-up)",
  ),
  Mutation(
    "bound-every-not-checkpointed",
    "crmjax/train.py",
    'carry["pairwise_bound"] = stored',
    "pass",
    (
      "tests/test_train.py::test_a_run_with_the_bound_every_n_steps_alternates_and_resumes_bitwise",
    ),
    "a resumed run forgets the reused bound and recomputes it at an off step",
  ),
  # ------------------------------------------------------------------ the audit table
  Mutation(
    "losses-count-zero",
    "crmjax/losses.py",
    "jnp.maximum(jnp.sum(correct), 1)",
    "jnp.sum(correct)",
    ("tests/test_losses.py::test_crm_loss_all_misclassified_has_zero_penalty",),
    "max(1, #correct) -> #correct (0 / 0 = NaN on an all-wrong batch)",
  ),
  Mutation(
    "soundness-no-kw-inflation",
    "crmjax/soundness.py",
    "sigma / math.sqrt(1.0 - err)",
    "sigma",
    SOUND_PROB,
    "the probabilistic norm not inflated by 1 / sqrt(1 - eps)",
  ),
  Mutation(
    "soundness-kw-constant",
    "crmjax/soundness.py",
    "POWER_CONSTANT = 0.824",
    "POWER_CONSTANT = 0.00824",
    SOUND_PROB,
    "the Kuczynski-Wozniakowski (power method) constant 100x too small",
  ),
  Mutation(
    "train-restore-skipped",
    "crmjax/train.py",
    "  latest = ckpt.latest_step()\n",
    "  latest = None  # print('WARNING: checkpoint ignored')\n",
    (
      "tests/test_train.py::test_resume_after_stop_gives_bitwise_the_same_params",
      "tests/test_faults.py::test_sigkill_then_rerun_finishes_with_bitwise_the_same_params",
    ),
    "the restore branch disabled (the run starts over)",
  ),
  Mutation(
    "data-mnist-labels-rolled",
    "crmjax/dataset_files.py",
    "return images[..., None].astype(np.uint8), labels",
    "return images[..., None].astype(np.uint8), np.roll(labels, 1)",
    ("tests/test_data.py", "-k", "vendored_mnist or mnist_files_directly"),
    "MNIST labels off by one position",
  ),
  Mutation(
    "data-mnist-images-transposed",
    "crmjax/dataset_files.py",
    "return images[..., None].astype(np.uint8), labels",
    "return images.transpose(0, 2, 1)[..., None].astype(np.uint8), labels",
    ("tests/test_data.py", "-k", "vendored_mnist or mnist_files_directly"),
    "MNIST images transposed",
  ),
  Mutation(
    "attacks-restart-at-x",
    "crmjax/attacks.py",
    "delta0 = jnp.where(restart_idx == 0, jnp.zeros_like(x), _uniform_in_ball(k, x, eps))",
    "delta0 = jnp.zeros_like(x)",
    ("tests/test_attacks.py", "-k", "deterministic or restart"),
    "every random restart starts at x",
  ),
  Mutation(
    "train-stop-gradient-bound",
    "crmjax/train_step.py",
    TRAIN_BOUND,
    TRAIN_BOUND + "  lip = jax.lax.stop_gradient(lip)\n",
    ("tests/test_train.py::test_crm_step_gradient_reaches_the_params_through_the_bound",),
    "stop_gradient on the Lipschitz bound inside the CRM loss",
  ),
  Mutation(
    "liplt-bound-x0.9",
    "crmjax/liplt.py",
    "return readout_bound(net, m, mode=mode, norm=norm), state",
    "return 0.9 * readout_bound(net, m, mode=mode, norm=norm), state",
    ("tests/test_liplt.py::test_bounds_exceed_gradient_norms",),
    "the LipLT bound scaled by 0.9",
  ),
  Mutation(
    "soundness-bound-x0.9",
    "crmjax/soundness.py",
    "np.asarray(b, np.float64) * inflate",
    "np.asarray(b, np.float64) * inflate * 0.9",
    ("tests/test_certify.py", "-k", "brute_force or sampled_gradient"),
    "the sound bound scaled by 0.9",
  ),
  Mutation(
    "losses-lip-transposed",
    "crmjax/losses.py",
    "lip_y = lip[labels]",
    "lip_y = lip.T[labels]",
    ("tests/test_losses.py::test_certified_radius_is_zero_on_ties_and_uses_row_of_label",),
    "the radius reads column y of the bound (L_iy) instead of row y",
  ),
  # --------------------------------------------- further plausible bugs, core modules
  Mutation(
    "liplt-readout-drops-radii",
    "crmjax/liplt.py",
    "weights = jnp.concatenate([jnp.ones((1,)), _radii(net) * m])",
    "weights = jnp.concatenate([jnp.ones((1,)), m])",
    ("tests/test_liplt.py", "-k", "match_float64_reference"),
    "eq. 19 readout without the r_j factors",
  ),
  Mutation(
    "liplt-interior-drops-radii",
    "crmjax/liplt.py",
    "jnp.tril(jnp.pad(table[:, 1:], ((0, 0), (0, 1))), k=-1) * radii[None, :]",
    "jnp.tril(jnp.pad(table[:, 1:], ((0, 0), (0, 1))), k=-1)",
    ("tests/test_liplt.py", "-k", "match_float64_reference"),
    "eq. 19 recursion for m without the r_j factors",
  ),
  Mutation(
    "network-hhat-center",
    "crmjax/network.py",
    "return 0.5 * (self.alpha + self.beta)",
    "return 1.0 * (self.alpha + self.beta)",
    ("tests/test_liplt.py", "-k", "match_float64_reference"),
    "loop transformation with c = alpha + beta instead of (alpha + beta) / 2",
  ),
  Mutation(
    "liplt-pairwise-gram",
    "crmjax/liplt.py",
    "sq = d[:, None] + d[None, :] - 2.0 * gram",
    "sq = d[:, None] + d[None, :] - 1.0 * gram",
    ("tests/test_liplt.py", "-k", "match_float64_reference"),
    "pair norms from the Gram matrix with a wrong cross term",
  ),
  Mutation(
    "liplt-as-pairwise-max",
    "crmjax/liplt.py",
    "return jnp.where(eye, 0.0, bound[:, None] + bound[None, :])",
    "return jnp.where(eye, 0.0, jnp.maximum(bound[:, None], bound[None, :]))",
    ("tests/test_liplt.py", "-k", "as_pairwise"),
    "per-class bounds made pairwise by max(L_i, L_j) (unsound) instead of L_i + L_j",
  ),
  Mutation(
    "liplt-no-gradient-into-table",
    "crmjax/liplt.py",
    "outs = table_sweep(net, us)",
    "outs = table_sweep(frozen, us)",
    ("tests/test_liplt.py", "-k", "grad"),
    "the interior norms computed on the stop-gradient network (no training signal)",
  ),
  Mutation(
    "losses-mask-ignores-correct",
    "crmjax/losses.py",
    "mask = correct & (radius < r0)",
    "mask = radius < r0",
    ("tests/test_losses.py",),
    "CRM penalises misclassified points too",
  ),
  Mutation(
    "losses-gloro-half-eps",
    "crmjax/losses.py",
    "logits + eps * lip[labels]",
    "logits + 0.5 * eps * lip[labels]",
    ("tests/test_losses.py",),
    "GloRo's bottom logit at half the radius",
  ),
  Mutation(
    "certify-estimate-certifies",
    "crmjax/certify.py",
    "radii = radii_of(logits, labels, np.asarray(lip))",
    "radii = radii_of(logits, labels, np.asarray(est))",
    ("tests/test_certify.py", "-k", "evaluate"),
    "certificates from the power-iteration estimate instead of the sound bound",
  ),
  Mutation(
    "certify-accuracy-counts-ties",
    "crmjax/certify.py",
    "(radii[None, :] > eps_arr[:, None])",
    "(radii[None, :] >= eps_arr[:, None])",
    ("tests/test_certify.py", "-k", "certified_accuracy"),
    "a radius equal to eps (or 0 at eps = 0) counted as certified",
  ),
  Mutation(
    "train-ramp-ignored",
    "crmjax/train_step.py",
    "lam = optax.linear_schedule(0.0, config.crm.lam, ramp)",
    "lam = optax.constant_schedule(config.crm.lam)",
    ("tests/test_train.py", "-k", "ramp or reaches"),
    "crm.ramp_epochs has no effect on lambda",
  ),
  Mutation(
    "train-warmup-ignored",
    "crmjax/train.py",
    "bounded = regular and epoch >= warm_epochs",
    "bounded = regular",
    ("tests/test_train.py", "-k", "compiles_each"),
    "the CE warm-up epochs run the CRM step",
  ),
  Mutation(
    "soundness-lanczos-constant",
    "crmjax/soundness.py",
    "LANCZOS_CONSTANT = 1.648",
    "LANCZOS_CONSTANT = 0.01648",
    SOUND_PROB,
    "the Kuczynski-Wozniakowski Lanczos constant 100x too small",
  ),
  Mutation(
    "soundness-lanczos-no-reorthogonalisation",
    "crmjax/soundness.py",
    "    w = self._orthogonalise(w, j)\n    b = _norm(w)",
    "    b = _norm(w)",
    ("tests/test_lanczos.py",),
    "Lanczos without full reorthogonalisation (the basis loses orthogonality after ~30 steps)",
  ),
  Mutation(
    "train-eval-augmented-test-split",
    "crmjax/train.py",
    '    test=_load(config, "test"),\n',
    "    test=(lambda t: ("
    + AUGMENTED.format(x="t[0]", a="input_pipeline.Augment(random_crop_padding=2)")
    + ', t[1]))(_load(config, "test")),\n',
    EVAL_SPLIT,
    "the per-epoch and final evaluations fed augmented test images",
  ),
  Mutation(
    "train-epoch-eval-augmented",
    "crmjax/train.py",
    "np.asarray(epoch_logits(params, test_x[i : i + size]))",
    "np.asarray(epoch_logits(params, input_pipeline.augment_batch(test_x[i : i + size]"
    ".astype(np.float32) / 255, augment=input_pipeline.Augment(random_crop_padding=2),"
    " rng=np.random.default_rng(0))))",
    EVAL_SPLIT,
    "the per-epoch evaluation crops its test batches at random",
  ),
  Mutation(
    "reports-certify-augmented",
    "crmjax/runs.py",
    "  return images, np.asarray(labels, np.int32)\n",
    "  from crmjax import input_pipeline\n\n  images = "
    + AUGMENTED.format(x="images", a="input_pipeline.Augment(random_crop_padding=2)")
    + "\n  return images, np.asarray(labels, np.int32)\n",
    EVAL_SPLIT,
    "experiments.certify's report reads an augmented test split",
  ),
  Mutation(
    "soundness-no-float32-margin",
    "crmjax/soundness.py",
    "margin: float = 1e-4",
    "margin: float = 0.0",
    ("tests/test_certify.py", "-k", "linf_sound_bound or margin"),
    "no inflation for float32 rounding (generic: the margin's default)",
  ),
  Mutation(
    "margin-gradients-sum-not-difference",
    "crmjax/certify.py",
    "- 2 * gram  # ||g_i - g_j||^2",
    "+ 2 * gram  # ||g_i - g_j||^2",
    ("tests/test_certify.py", "-k", "margin_gradient_norms"),
    "the margin gradient of a pair is taken as the norm of g_i + g_j",
  ),
  Mutation(
    "margin-gradients-every-test-point",
    "crmjax/reports.py",
    "images[:n], batch_size=config.pgd_batch_size",
    "images, batch_size=config.pgd_batch_size",
    ("tests/test_reports.py", "-k", "margin_gradients"),
    "the report's margin gradients ignore pgd_subset (every test point, minutes more)",
  ),
]


def _copy_repo(dest: str) -> None:
  """Tracked and untracked-but-not-ignored files of the working tree, as they are now."""
  out = subprocess.run(
    ["git", "ls-files", "-co", "--exclude-standard", "-z"],
    cwd=ROOT,
    capture_output=True,
    check=True,
  ).stdout.decode()
  for rel in filter(None, out.split("\0")):
    src = os.path.join(ROOT, rel)
    if os.path.isfile(src):
      os.makedirs(os.path.dirname(os.path.join(dest, rel)) or dest, exist_ok=True)
      shutil.copy2(src, os.path.join(dest, rel))


def _env(copy: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONDONTWRITEBYTECODE="1")
  env["PYTHONPATH"] = copy + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _pytest(
  copy: str, args: tuple[str, ...], timeout: float, log: str, *, keep_going: bool = False
) -> tuple[str, str]:
  """Runs pytest in the copy; returns (outcome, first failure message).

  Test files of ``args`` that the copy lacks are left out (files come and go).
  """
  args = tuple(
    a
    for a in args
    if not a.startswith("tests/") or os.path.isfile(os.path.join(copy, a.split("::")[0]))
  )
  if not any(a.startswith("tests/") for a in args):
    return "not run", "none of the test files exists"
  cmd = [
    sys.executable,
    "-m",
    "pytest",
    "-q",
    "-p",
    "no:cacheprovider",
    "--tb=short",
    *([] if keep_going else ["-x"]),
    *args,
  ]
  t0 = time.time()
  try:
    proc = subprocess.run(
      cmd, cwd=copy, env=_env(copy), capture_output=True, text=True, timeout=timeout
    )
    text, rc = proc.stdout + proc.stderr, proc.returncode
  except subprocess.TimeoutExpired as e:
    text = (
      (e.stdout or b"").decode(errors="replace")
      if isinstance(e.stdout, bytes)
      else (e.stdout or "")
    )
    text, rc = text + f"\n[timeout after {timeout:.0f} s]", None
  with open(log, "w") as f:
    f.write(" ".join(cmd) + f"\n[{time.time() - t0:.0f} s]\n" + text)
  if rc is None:
    return "timeout", f"no result within {timeout:.0f} s"
  if rc == 0:
    return "passed", ""
  if rc in (1, 2):  # 2: interrupted, e.g. a collection error the mutation caused
    failed = [l for l in text.splitlines() if l.startswith("FAILED ")]
    errors = [l.strip() for l in text.splitlines() if l.startswith("E ")][:3]
    more = f" (+{len(failed) - 1} more failed)" if len(failed) > 1 else ""
    return "failed", (failed[0] if failed else "") + more + (" | " if errors else "") + " / ".join(
      errors
    )
  # 3: internal error, 4: usage (a test id that does not exist), 5: nothing collected
  return "not run", f"pytest rc={rc}: " + (text.strip().splitlines()[-1] if text.strip() else "")


def _apply(copy: str, m: Mutation) -> str:
  """The original text of the file, after writing the mutated one (the entry must apply)."""
  path = os.path.join(copy, m.path)
  with open(path) as f:
    text = f.read()
  with open(path, "w") as f:
    f.write(text.replace(m.old, m.new))
  return text


def _problems(root: str, chosen: list[Mutation]) -> list[str]:
  """One line per entry that does not apply to the tree at ``root``."""
  return [p for p in (m.problem(root) for m in chosen) if p is not None]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", default="", help="comma-separated mutation names")
  parser.add_argument("--list", action="store_true", help="list the mutations and exit")
  parser.add_argument("--no-baseline", action="store_true")
  parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per pytest run")
  parser.add_argument("--out", default="", help="folder for logs and the report")
  parser.add_argument(
    "--keep-going",
    action="store_true",
    help="run every selected test (no -x): which tests see each bug",
  )
  args = parser.parse_args(argv)

  chosen = MUTATIONS
  if args.only:
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - {m.name for m in MUTATIONS})
    if unknown:
      parser.error(f"unknown mutation(s) {unknown}; see --list")
    chosen = [m for m in MUTATIONS if m.name in names]
  problems = _problems(ROOT, chosen)
  if args.list:
    for m in chosen:
      ok = m.problem(ROOT) is None
      print(f"{m.name:40s} {'applies' if ok else 'ERROR  '} {m.path:22s} {m.why}")
  for p in problems:
    print(f"ERROR: {p}", file=sys.stderr)
  if problems or args.list:
    return 2 if problems else 0

  # SIGTERM (kill PID): unwind, so the running pytest is killed and the copy removed.
  def terminated(*_):
    print("mutation_check: terminated by SIGTERM", file=sys.stderr, flush=True)
    sys.exit(143)

  signal.signal(signal.SIGTERM, terminated)
  out = args.out or tempfile.mkdtemp(prefix="crmjax_mutation_")
  os.makedirs(out, exist_ok=True)
  work = tempfile.mkdtemp(prefix="crmjax_mutant_repo_")
  try:
    _copy_repo(work)
    where = subprocess.run(
      [sys.executable, "-c", "import crmjax; print(crmjax.__file__)"],
      cwd=work,
      env=_env(work),
      capture_output=True,
      text=True,
    ).stdout
    if not where.startswith(work):
      print(
        f"the copy's tests would import crmjax from {where.strip()!r}, not the copy",
        file=sys.stderr,
      )
      return 2
    print(f"copy: {work}\nlogs: {out}", flush=True)
    if not args.no_baseline:
      for i, sel in enumerate(dict.fromkeys(m.tests for m in chosen)):
        outcome, msg = _pytest(work, sel, args.timeout, os.path.join(out, f"baseline{i}.log"))
        print(f"baseline {' '.join(sel)}: {outcome} {msg}", flush=True)
        if outcome != "passed":
          print(
            "a baseline selection does not pass on the unmutated code: fix it first",
            file=sys.stderr,
          )
          return 2
    rows = []
    for m in chosen:
      t0 = time.time()
      original = _apply(work, m)
      try:
        outcome, msg = _pytest(
          work,
          m.tests,
          args.timeout,
          os.path.join(out, f"{m.name}.log"),
          keep_going=args.keep_going,
        )
      finally:
        with open(os.path.join(work, m.path), "w") as f:
          f.write(original)
      result = {
        "passed": "survived",
        "failed": "killed",
        "timeout": "killed (timeout)",
        "not run": "not run",
      }[outcome]
      rows.append(
        {
          "name": m.name,
          "result": result,
          "why": m.why,
          "message": msg[:400],
          "tests": " ".join(m.tests),
          "seconds": round(time.time() - t0),
        }
      )
      r = rows[-1]
      print(
        f"{r['name']:40s} {r['result']:18s} {r['seconds']:5d} s  {r['message'][:160]}", flush=True
      )
  finally:
    shutil.rmtree(work, ignore_errors=True)

  applied = [r for r in rows if r["result"] != "not run"]
  killed = [r for r in applied if r["result"].startswith("killed")]
  summary = (
    f"killed {len(killed)} of {len(applied)} applicable mutations"
    f" ({100.0 * len(killed) / max(len(applied), 1):.0f}%);"
    f" {len(rows) - len(applied)} not run"
  )
  with open(os.path.join(out, "report.json"), "w") as f:
    json.dump({"summary": summary, "rows": rows}, f, indent=1)
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write(
      f"{summary}\n\n| mutation | result | s | bug | failing assertion |\n"
      "| --- | --- | --- | --- | --- |\n"
    )
    for r in rows:
      msg = re.sub(r"\s+", " ", r["message"]).replace("|", "\\|")[:200]
      f.write(f"| {r['name']} | {r['result']} | {r['seconds']} | {r['why']} | {msg} |\n")
  print(summary + f"\nreport: {os.path.join(out, 'report.md')}")
  return 0 if len(killed) == len(rows) else 1


if __name__ == "__main__":
  sys.exit(main())
