"""The one-call GPU check (experiments/gpu_check.py): its smoke mode end to end, its limits."""

import gzip
import json
import os
import sys
import time

import pytest

from experiments import gpu_check
from tests.conftest import QUICK_COMPILE

OUTPUTS = {
  "gpu_check.log",
  "summary.md",
  "benchmark.json",
  "depth.json",
  "metrics.jsonl",
  "results.json",
  "certify.json",
  "figure1.png",
}


@pytest.mark.slow
def test_smoke_mode_runs_every_step_and_writes_the_eight_outputs(tmp_path, capsys, monkeypatch):
  """Every step of the GPU call, tiny on the CPU: the commands and flags cannot rot.

  ~1 min on an idle 2-core CPU (3 min 20 s measured under load average 15).
  """
  for k, v in QUICK_COMPILE.items():  # its MLP steps are compile-bound (tests/conftest.py)
    monkeypatch.setenv(k, v)
  out = tmp_path / "out"
  rc = gpu_check.main(
    ["--smoke", "--out", str(out), "--wheels", str(tmp_path / "none"), "--budget", "1500"]
  )
  summary = (out / "summary.md").read_text() if (out / "summary.md").exists() else ""
  assert rc == 0, summary or capsys.readouterr().out[-3000:]
  assert {p.name for p in out.iterdir()} == OUTPUTS
  assert len(OUTPUTS) <= gpu_check.MAX_FILES
  assert all(p.stat().st_size <= gpu_check.MAX_FILE_BYTES for p in out.iterdir())
  for step in ("env", "bench", "depth", "train", "certify"):
    assert f"| {step} | ok |" in summary, step
  assert "| install | skipped (no wheels" in summary
  assert "### MNIST training (--config=experiments/configs/mnist.py:smoke --config.model=MLP" in (
    summary
  )

  bench = json.loads((out / "benchmark.json").read_text())
  assert bench["complete"] and [r["model"] for r in bench["models"]] == ["MLP"]
  (row,) = bench["models"]
  assert row["ms"]["ce"] > 0 and row["ms"]["crm_liplt"] > 0
  assert f"{row['ms']['crm_liplt'] / row['ms']['ce']:.2f}x" in summary  # the CRM/CE ratio
  depth = json.loads((out / "depth.json").read_text())
  assert depth["complete"] and [r["depth"] for r in depth["depth_sweep"]] == [2]
  epochs = [
    json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "epoch_time_s" in x
  ]
  assert len(epochs) >= 2 and all(e["epoch_time_s"] > 0 for e in epochs)
  assert f"s at {epochs[0]['step']} steps per epoch (target <= 2 s" in summary
  trained = json.loads((out / "results.json").read_text())
  certified = json.loads((out / "certify.json").read_text())["table1"]
  assert certified["clean_accuracy"] == pytest.approx(trained["clean_accuracy"])
  assert f"clean {certified['clean_accuracy']:.2%}" in summary
  assert (out / "figure1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  log = (out / "gpu_check.log").read_text()
  assert "crmjax imports: ok" in log and "experiments.mnist" in log
  assert log.rstrip().endswith(summary.rstrip())  # printed last: the call's output tail


def test_train_config_and_overrides_reach_the_train_command(tmp_path):
  def train_command(*flags):
    args = gpu_check.parse_args(["--out", str(tmp_path), *flags])
    (step,) = [s for s in gpu_check.plan(args, tmp_path, tmp_path) if s.name == "train"]
    return step.argv

  default = train_command()
  assert "--config=experiments/configs/mnist.py" in default
  other = train_command(
    "--train-config",
    "experiments/configs/mnist_60.py",
    "--train-arg=--config.batch_size=32",
    "--train-arg=--config.seed=1",
  )
  assert "--config=experiments/configs/mnist_60.py" in other
  assert other[-2:] == ["--config.batch_size=32", "--config.seed=1"]
  assert (
    other[: other.index("--config=experiments/configs/mnist_60.py")]
    == default[: default.index("--config=experiments/configs/mnist.py")]
  )
  smoke = train_command("--smoke", "--train-config", "experiments/configs/mnist_60.py")
  assert "--config=experiments/configs/mnist_60.py:smoke" in smoke


def test_the_output_folder_is_named_on_the_command_line(tmp_path, monkeypatch, capsys):
  """``--out DIR`` is required; no environment variable stands in for it."""
  monkeypatch.setenv("OUT", str(tmp_path))
  with pytest.raises(SystemExit) as e:
    gpu_check.parse_args([])
  assert e.value.code == 2
  assert "--out DIR" in capsys.readouterr().err
  assert gpu_check.parse_args(["--out", str(tmp_path)]).out == str(tmp_path)
  assert gpu_check.parse_args(["--prepare"]).prepare  # downloads only: no output folder


def test_a_step_past_its_limit_is_stopped_even_if_it_ignores_sigterm():
  code = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('started', flush=True); time.sleep(60)"
  )
  lines = []
  t0 = time.monotonic()
  rc, seconds = gpu_check.run_command(
    [sys.executable, "-c", code], timeout=2, env=dict(os.environ), out=lines.append, grace_s=1
  )
  assert rc is None  # stopped, not finished
  assert seconds < 15 and time.monotonic() - t0 < 20
  assert lines == ["started\n"]
  rc, _ = gpu_check.run_command(
    [sys.executable, "-c", "import sys; sys.exit(3)"],
    timeout=30,
    env=dict(os.environ),
    out=lines.append,
  )
  assert rc == 3


def test_steps_without_budget_left_are_skipped_and_the_outputs_still_written(tmp_path):
  out = tmp_path / "out"
  rc = gpu_check.main(["--smoke", "--out", str(out), "--steps", "env,train", "--budget", "3"])
  assert rc == 1  # nothing measured is a failure
  summary = (out / "summary.md").read_text()
  assert "| env | skipped (budget" in summary and "| train | skipped (budget" in summary
  assert "| bench | skipped (--steps) |" in summary
  assert "benchmark.json not written" in summary
  assert {p.name for p in out.iterdir()} == {"gpu_check.log", "summary.md"}


def test_copy_outputs_gzips_a_file_over_the_limit_and_leaves_out_what_still_is(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  (src / "big.jsonl").write_text("0" * 5000)  # compresses far under the limit
  (src / "noise.bin").write_bytes(os.urandom(5000))  # does not compress
  (src / "small.json").write_text("{}")
  out = tmp_path / "out"
  out.mkdir()
  logged = []
  written = gpu_check.copy_outputs(
    {
      "big.jsonl": src / "big.jsonl",
      "noise.bin": src / "noise.bin",
      "small.json": src / "small.json",
      "missing.json": src / "missing.json",
    },
    out,
    max_bytes=1000,
    log=logged.append,
  )
  assert sorted(p.name for p in written) == ["big.jsonl.gz", "small.json"]
  assert sorted(p.name for p in out.iterdir()) == ["big.jsonl.gz", "small.json"]
  assert gzip.decompress((out / "big.jsonl.gz").read_bytes()) == b"0" * 5000
  assert any("noise.bin" in x for x in logged)
