"""One call on a GPU machine that measures every GPU target (step times, depth, MNIST run).

  # once, with internet: the wheels a bare GPU image lacks, into .whl/ (git-ignored)
  python3 -m experiments.gpu_check --prepare
  # on the GPU machine, from the repository root (with .whl/ copied beside the code)
  python3 -m experiments.gpu_check --out results/gpu_check
  # the same steps, tiny, on a CPU (what tests/test_gpu_check.py runs)
  python3 -m experiments.gpu_check --smoke --out /tmp/gpu_check

Steps, each a subprocess with its own time limit inside one overall budget (``--budget``,
540 s by default, so that a job limited to 10 minutes always reaches the copy):

* ``install``: the prepared wheels (``--wheels``, default ``.whl/``) into ``<work>/site``
  (``pip install --no-index --no-deps --target``), put first on ``PYTHONPATH`` with the
  repository root (crmjax runs from the tree, nothing is built);
* ``env``: Python, jax, devices, package versions, ``nvidia-smi``; imports crmjax and the
  experiments, so a missing package fails here, by name;
* ``bench``: ``experiments.benchmark`` on 4C3F, 6C2F and 8C2F at batch 512 (cross-entropy and
  CRM steps, CRM/CE ratios, compile times, peak memory);
* ``depth``: ``experiments.benchmark``'s depth sweep of the bounds alone (L = 4 ... 32);
* ``train``: the main MNIST command (``experiments/configs/mnist.py``, 20 epochs at batch 16:
  3,750 steps per epoch, the bound on each; the vendored data, no download); ``--train-config``
  and ``--train-arg`` run another recipe instead, e.g. the 60-epoch recipe: ``--steps
  install,env,train,certify --train-config experiments/configs/mnist_60.py``;
* ``certify``: ``experiments.certify`` on that run (its latest checkpoint, also when the
  training step ran out of time).

A step that outlives its limit is stopped (SIGTERM, then SIGKILL) and the next one starts;
whatever happens, the outputs are copied to ``--out``, at most 8 files of at most 16 MiB (a
larger one is gzipped): ``gpu_check.log`` (everything printed),
``summary.md`` (each step's status and the key figures, printed last), ``benchmark.json``,
``depth.json``, ``metrics.jsonl``, ``results.json`` (training), ``certify.json`` and
``figure1.png``. ``--steps`` runs a subset (e.g. a rerun of ``train,certify``).

Standard library only: it runs before the wheels are installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("install", "env", "bench", "depth", "train", "certify")
# A bare GPU image with jax, flax, optax and orbax may lack these: pure-Python wheels, pinned to the
# versions the CPU suite runs with.
WHEELS = ("ml-collections==1.1.0", "tensorboardX==2.6.5")
PIP_DOWNLOAD = [
  "-m",
  "pip",
  "download",
  "--no-deps",
  "--only-binary=:all:",
  "--python-version",
  "3.12",
  "--implementation",
  "cp",
  "--platform",
  "manylinux_2_28_x86_64",
  "--platform",
  "manylinux_2_17_x86_64",
  "--platform",
  "manylinux2014_x86_64",
]
MAX_FILES = 8
MAX_FILE_BYTES = 16 * 2**20
# The reference PyTorch implementation's step times on an H100 at batch 512 (ms per step), as
# reported to us: the figures the CRM/CE targets compare with.
REFERENCE_H100_MS = {"4C3F": {"ce": 3.35, "crm": 37.4}, "6C2F": {"ce": 3.12, "crm": 25.3}}

ENV_CODE = r"""
import importlib.metadata as md, platform, sys
print("python", sys.version.split()[0], platform.machine(), sys.executable)
import jax
print("jax", jax.__version__, "backend", jax.default_backend())
for d in jax.devices():
  stats = d.memory_stats() or {}
  print(" ", d, d.device_kind, f"{stats.get('bytes_limit', 0) / 2**30:.1f} GiB usable")
for name in ("jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "ml-collections",
             "tensorboardX", "numpy", "matplotlib", "tqdm", "absl-py"):
  try:
    print(" ", name, md.version(name))
  except md.PackageNotFoundError:
    print(" ", name, "MISSING")
import crmjax.train, crmjax.reports, experiments.benchmark, experiments.certify  # noqa
print("crmjax imports: ok")
"""


@dataclasses.dataclass
class Step:
  """One step's command line, the limits on its time and what it did."""

  name: str
  argv: list[str]
  cap_s: float  # at most this long
  min_s: float  # the time kept back for it while earlier steps run
  status: str = "not run"  # ok | failed (rc N) | timeout | skipped (...) | not run
  seconds: float = 0.0


class Tee:
  """Writes to the console and to the log file."""

  def __init__(self, log: TextIO):
    self.log = log
    self.lock = threading.Lock()

  def __call__(self, text: str) -> None:
    with self.lock:
      sys.stdout.write(text)
      sys.stdout.flush()
      self.log.write(text)
      self.log.flush()


def run_command(
  argv: list[str],
  *,
  timeout: float,
  env: dict,
  out: Callable[[str], None],
  cwd: Path = ROOT,
  grace_s: float = 10.0,
) -> tuple[int | None, float]:
  """Runs ``argv`` in its own process group, streaming its output to ``out``.

  Returns:
    ``(returncode, seconds)``; returncode None if it ran past ``timeout`` and was stopped
    (SIGTERM to its group, SIGKILL ``grace_s`` later).
  """
  t0 = time.monotonic()
  proc = subprocess.Popen(
    argv,
    cwd=cwd,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    errors="replace",
    start_new_session=True,
  )

  def pump():
    for line in proc.stdout:
      out(line)

  reader = threading.Thread(target=pump, daemon=True)
  reader.start()
  try:
    rc = proc.wait(timeout=max(timeout, 0.1))
  except subprocess.TimeoutExpired:
    rc = None
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
      try:
        os.killpg(proc.pid, sig)
      except ProcessLookupError:
        break
      try:
        proc.wait(timeout=wait)
        break
      except subprocess.TimeoutExpired:
        continue
  reader.join(timeout=5)
  return rc, time.monotonic() - t0


def plan(args, work: Path, out_dir: Path) -> list[Step]:
  """The steps' command lines (full size, or tiny with ``--smoke``) and time limits."""
  py = sys.executable
  bench = [
    py,
    "-m",
    "experiments.benchmark",
    "--config=experiments/configs/benchmark.py" + (":smoke" if args.smoke else ""),
  ]
  run_dir = work / "mnist"
  train = [
    py,
    "-m",
    "experiments.mnist",
    f"--config={args.train_config}" + (":smoke" if args.smoke else ""),
    f"--workdir={run_dir}",
    "--config.progress_bar=False",
    "--config.download=False",
    *args.train_arg,
  ]
  certify = [
    py,
    "-m",
    "experiments.certify",
    "--config=experiments/configs/certify.py" + (":smoke" if args.smoke else ""),
    f"--workdir={run_dir}",
  ]
  if args.smoke:  # seconds each on a CPU: the MLP, a few images, a few steps
    tiny = ["--config.batch_size=8", "--config.steps=2", "--config.warmup_steps=1"]
    models = (
      bench
      + [
        "--config.models=('MLP',)",
        "--config.train_iters.MLP=1",
        "--config.skip.MLP=('crm_liplt_1it', 'crm_naive')",
        "--config.depth_sweep=False",
      ]
      + tiny
    )
    depth = (
      bench
      + [
        "--config.models=()",
        "--config.depth_sweep=True",
        "--config.sweep.depths=(2,)",
        "--config.sweep.width=4",
        "--config.sweep.input_shape=(8, 8, 1)",
      ]
      + tiny
    )
    # the :smoke variants, with as few overrides as possible (field names change)
    train += ["--config.model=MLP", "--config.train_subset=256"]
    certify += ["--config.pgd_subset=16", "--config.pgd_steps=2"]
  else:
    models = bench + ["--config.depth_sweep=False"]
    depth = bench + ["--config.models=()", "--config.depth_sweep=True"]
  models.append(f"--config.output={out_dir / 'benchmark.json'}")
  depth.append(f"--config.output={out_dir / 'depth.json'}")
  wheels = sorted(str(p) for p in Path(args.wheels).glob("*.whl"))
  install = [
    py,
    "-m",
    "pip",
    "install",
    "-q",
    "--no-index",
    "--no-deps",
    "--no-compile",
    "--no-cache-dir",
    "--upgrade",
    "--target",
    str(work / "site"),
    *wheels,
  ]
  return [
    Step("install", install if wheels else [], cap_s=60, min_s=5),
    Step("env", [py, "-c", ENV_CODE], cap_s=90, min_s=10),
    Step("bench", models, cap_s=180, min_s=30),
    Step("depth", depth, cap_s=60, min_s=15),
    Step("train", train, cap_s=1e9, min_s=150),
    Step("certify", certify, cap_s=1e9, min_s=90),
  ]


def copy_outputs(
  files: dict[str, Path],
  out_dir: Path,
  *,
  max_bytes: int = MAX_FILE_BYTES,
  log: Callable[[str], None] = print,
) -> list[Path]:
  """Copies ``{name: source}`` into ``out_dir`` (missing sources are skipped).

  A file over ``max_bytes`` is written gzipped as ``name.gz``; one still over it is left out.
  """
  written = []
  for name, src in files.items():
    if not src.is_file():
      continue
    dst = out_dir / name
    if src.resolve() != dst.resolve():
      shutil.copyfile(src, dst)
    if dst.stat().st_size > max_bytes:
      with open(dst, "rb") as f_in, gzip.open(f"{dst}.gz", "wb") as f_out:
        shutil.copyfileobj(f_in, f_out)
      dst.unlink()
      dst = dst.with_name(name + ".gz")
      if dst.stat().st_size > max_bytes:
        log(f"left out {name}: over {max_bytes} bytes even gzipped\n")
        dst.unlink()
        continue
    written.append(dst)
  return written


def _load_json(path: Path):
  with open(path) as f:
    return json.load(f)


def _ms(v) -> str:
  return "-" if v is None else f"{v:.2f}"


def _ratio(a, b) -> str:
  return f"{a / b:.2f}x" if a and b else "-"


HIDDEN_FLAGS = ("--config.progress_bar", "--config.download")  # not part of the recipe


def summarize(steps: list[Step], out_dir: Path, work: Path, wall_s: float) -> str:
  """Markdown: each step's status, then the target figures (those whose files exist)."""
  lines = [
    "## gpu_check summary",
    "",
    f"total {wall_s:.0f} s",
    "",
    "| step | status | seconds |",
    "| --- | --- | --- |",
  ]
  lines += [f"| {s.name} | {s.status} | {s.seconds:.0f} |" for s in steps]

  def section(title: str, fn: Callable[[], list[str]]) -> None:
    lines.extend(["", f"### {title}", ""])
    try:
      lines.extend(fn())
    except FileNotFoundError as e:
      lines.append(f"n/a ({Path(e.filename).name} not written)")
    except Exception as e:  # a partial or changed file: say so, keep summarising  # noqa: BLE001
      lines.append(f"n/a ({type(e).__name__}: {e})")

  def bench() -> list[str]:
    b = _load_json(out_dir / "benchmark.json")
    rows = [
      f"{b['device_kind']} x {b['num_devices']}, jax {b['jax_version']}, median of "
      f"{b['steps']} steps after {b['warmup_steps']} warm-up"
      + ("" if b.get("complete") else " (INCOMPLETE: stopped by its time limit)"),
      "",
      "| model | batch | it | CE ms | CRM ms | CRM/CE (target <= 2) | CRM 1 it ms | "
      "1 it / CE (target <= 1.3) | naive ms | bound ms | peak MiB | CRM compile s | "
      "reference H100 CE / CRM ms |",
      "|" + " --- |" * 13,
    ]
    for r in b["models"]:
      ms, ref = r["ms"], REFERENCE_H100_MS.get(r["model"])
      peak = r.get("peak_memory_bytes")
      ref = f"{ref['ce']} / {ref['crm']}" if ref else "-"
      rows.append(
        f"| {r['model']} | {r['batch_size']} | {r['train_iters']} | {_ms(ms['ce'])} | "
        f"{_ms(ms['crm_liplt'])} | {_ratio(ms['crm_liplt'], ms['ce'])} | "
        f"{_ms(ms['crm_liplt_1it'])} | {_ratio(ms['crm_liplt_1it'], ms['ce'])} | "
        f"{_ms(ms['crm_naive'])} | {_ms(ms['liplt_bound'])} | "
        f"{'-' if peak is None else f'{peak / 2**20:.0f}'} | "
        f"{_ms(r['compile_s']['crm_liplt'])} | {ref} |"
      )
    return rows

  def depth() -> list[str]:
    b = _load_json(out_dir / "depth.json")
    rows = [
      "bounds alone (pairwise, forward)" + ("" if b.get("complete") else " (INCOMPLETE)"),
      "",
      "| L | LipLT ms | LipLT ms / L | naive ms | naive ms / L | compile s LipLT |",
      "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in b["depth_sweep"]:
      a, n = r["liplt"], r["naive"]
      rows.append(
        f"| {r['depth']} | {_ms(a['ms'])} | {_ms(a['ms_per_layer'])} | "
        f"{_ms(n['ms'])} | {_ms(n['ms_per_layer'])} | {_ms(a['compile_s'])} |"
      )
    return rows

  def train() -> list[str]:
    records = [
      json.loads(x) for x in (work / "mnist" / "metrics.jsonl").read_text().split("\n") if x.strip()
    ]
    epochs = [r for r in records if "epoch_time_s" in r]
    times = [r["epoch_time_s"] for r in epochs]
    rows = [
      f"{len(epochs)} epochs logged; epoch 1 (with compilation) {times[0]:.1f} s"
      if times
      else "no epoch finished"
    ]
    if len(times) > 1:
      rows.append(
        f"epochs 2-{len(times)}: median {statistics.median(times[1:]):.2f} s, "
        f"min {min(times[1:]):.2f} s at {epochs[0]['step']} steps per epoch "
        "(target <= 2 s; reference ~25 s on an H100)"
      )
    final = [r["final"] for r in records if "final" in r]
    if final:
      f = final[-1]
      rows.append(
        f"final: clean {f['clean_accuracy']:.2%}, certified "
        f"{f['certified_accuracy']:.2%} at eps {f['eps']:.4g} ({f['bound_kind']}), "
        f"mean pairwise L {f['mean_pairwise_lipschitz']:.4g}"
      )
    return rows

  def certify() -> list[str]:
    t = _load_json(out_dir / "certify.json")["table1"]
    return [
      f"clean {t['clean_accuracy']:.2%}, PGD {t['pgd_accuracy']:.2%}, certified "
      f"{t['certified_accuracy']:.2%} at eps {t['eps']:.4g} ({t['bound_kind']}); "
      "reference: 90.83% clean, 41.85% certified"
    ]

  section("benchmark (experiments.benchmark, batch 512 on the GPU)", bench)
  section("depth sweep", depth)
  (train_argv,) = [s.argv for s in steps if s.name == "train"]
  recipe = [a for a in train_argv if a.startswith("--config") and not a.startswith(HIDDEN_FLAGS)]
  section(f"MNIST training ({' '.join(recipe)})", train)
  section("certification (experiments.certify)", certify)
  return "\n".join(lines) + "\n"


def prepare(wheels: Path) -> int:
  """Downloads ``WHEELS`` for the GPU image's Python (3.12, x86-64) into ``wheels``."""
  wheels.mkdir(parents=True, exist_ok=True)
  argv = [sys.executable, *PIP_DOWNLOAD, "-d", str(wheels), *WHEELS]
  print(" ".join(argv), flush=True)
  return subprocess.call(argv)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """The command line (``--prepare``, or ``--out`` with ``--steps`` known)."""
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--out", metavar="DIR", help="output folder (created if missing; required)")
  p.add_argument("--smoke", action="store_true", help="the same steps, tiny, on a CPU")
  p.add_argument(
    "--budget",
    type=float,
    default=540.0,
    help="seconds for all steps together (default 540: fits a 10-minute job)",
  )
  p.add_argument(
    "--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}"
  )
  p.add_argument(
    "--wheels", default=str(ROOT / ".whl"), help="folder of prepared wheels (default: .whl/)"
  )
  p.add_argument(
    "--train-config",
    default="experiments/configs/mnist.py",
    help="the MNIST config the train step runs (default: the main command's)",
  )
  p.add_argument(
    "--train-arg",
    action="append",
    default=[],
    metavar="FLAG",
    help="an override for the train step, e.g. --train-arg=--config.batch_size=32 (repeatable)",
  )
  p.add_argument(
    "--prepare",
    action="store_true",
    help=f"download {', '.join(WHEELS)} into --wheels (needs internet)",
  )
  p.add_argument("--keep-work", action="store_true", help="keep the scratch folder")
  args = p.parse_args(argv)
  if args.prepare:
    return args
  if not args.out:
    p.error("give --out DIR: the folder for the outputs")
  unknown = set(args.steps.split(",")) - set(STEPS)
  if unknown:
    p.error(f"--steps: unknown {sorted(unknown)}; use some of {list(STEPS)}")
  return args


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  if args.prepare:
    return prepare(Path(args.wheels))
  selected = args.steps.split(",")

  t_start = time.monotonic()
  deadline = t_start + args.budget
  out_dir = Path(args.out).resolve()
  out_dir.mkdir(parents=True, exist_ok=True)
  work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
  env = {
    **os.environ,
    "PYTHONUNBUFFERED": "1",
    "PYTHONPATH": os.pathsep.join(
      [str(work / "site"), str(ROOT)]
      + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    ),
  }
  if args.smoke:
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="")
  steps = plan(args, work, out_dir)
  with open(out_dir / "gpu_check.log", "w") as log:
    tee = Tee(log)
    tee(
      f"gpu_check {'--smoke ' if args.smoke else ''}in {ROOT}, scratch {work}, output "
      f"{out_dir}, budget {args.budget:.0f} s\n"
    )
    if shutil.which("nvidia-smi"):
      run_command(
        [
          "nvidia-smi",
          "--query-gpu=name,driver_version,memory.total,clocks.sm,"
          "clocks.max.sm,temperature.gpu,power.draw",
          "--format=csv",
        ],
        timeout=30,
        env=env,
        out=tee,
      )
    for i, step in enumerate(steps):
      if step.name not in selected:
        step.status = "skipped (--steps)"
        continue
      if not step.argv:  # the install step without wheels
        step.status = f"skipped (no wheels in {args.wheels})"
        continue
      later = sum(s.min_s for s in steps[i + 1 :] if s.name in selected)
      limit = min(step.cap_s, deadline - time.monotonic() - later)
      if limit < min(step.min_s, 10):
        step.status = f"skipped (budget: {limit:.0f} s left for it)"
        tee(f"\n=== {step.name}: {step.status}\n")
        continue
      shown = " ".join("<probe>" if "\n" in a else a for a in step.argv)
      tee(f"\n=== {step.name} (limit {limit:.0f} s): {shown}\n")
      rc, step.seconds = run_command(step.argv, timeout=limit, env=env, out=tee)
      step.status = (
        "ok" if rc == 0 else f"timeout after {limit:.0f} s" if rc is None else f"failed (rc {rc})"
      )
      tee(f"=== {step.name}: {step.status} in {step.seconds:.0f} s\n")

    run_dir = work / "mnist"
    copy_outputs(
      {
        "metrics.jsonl": run_dir / "metrics.jsonl",
        "results.json": run_dir / "results.json",
        "certify.json": run_dir / "certify" / "results.json",
        "figure1.png": run_dir / "certify" / "figure1.png",
      },
      out_dir,
      log=tee,
    )
    summary = summarize(steps, out_dir, work, time.monotonic() - t_start)
    (out_dir / "summary.md").write_text(summary)
    tee("\n" + summary)
  copy_outputs({"gpu_check.log": out_dir / "gpu_check.log"}, out_dir)  # gzip if too large
  files = sorted(p.name for p in out_dir.iterdir())
  print(f"{len(files)} files in {out_dir}: {', '.join(files)}")
  if len(files) > MAX_FILES:
    print(f"warning: more than {MAX_FILES} files in {out_dir} (was it empty?)")
  if not args.keep_work:
    shutil.rmtree(work, ignore_errors=True)
  fine = ("ok", "skipped (--steps)", "skipped (no wheels")
  return 0 if all(s.status.startswith(fine) for s in steps) else 1


if __name__ == "__main__":
  sys.exit(main())
