"""The experiments' shared command line (experiments/cli.py): help, errors, exit codes."""

import os
import subprocess
import sys

import pytest

from tests.conftest import QUICK_COMPILE
from tests.test_train import ROOT

ENV = {**os.environ, **QUICK_COMPILE, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def _run(*args, timeout=120):
  return subprocess.run(
    [sys.executable, "-m", *args],
    cwd=ROOT,
    env=ENV,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


@pytest.mark.parametrize(
  "experiment, default_workdir", [("mnist", "runs/mnist"), ("certify", None)]
)
def test_help_lists_the_experiments_own_flags(experiment, default_workdir):
  out = _run(f"experiments.{experiment}", "--help")
  # absl lists only the main module's key flags: these are defined in experiments/cli.py
  assert "--config:" in out.stdout and "--workdir:" in out.stdout, out.stdout + out.stderr
  if default_workdir:
    assert f"(default: '{default_workdir}')" in out.stdout


def test_a_fixable_error_is_one_line_and_exit_status_2():
  out = _run(
    "experiments.benchmark", "--config=experiments/configs/benchmark.py", "--config.models=('VGG',)"
  )
  assert out.returncode == 2
  assert (
    out.stderr.strip().splitlines()[-1].startswith("error: --config.models: unknown model 'VGG'")
  )
  assert "Traceback" not in out.stderr


def test_stray_arguments_and_a_missing_required_flag_are_usage_errors():
  out = _run("experiments.residual", "--config=experiments/configs/residual.py", "extra")
  assert out.returncode == 1 and "unexpected arguments: ['extra']" in out.stderr
  out = _run("experiments.certify", "--config=experiments/configs/certify.py")
  assert out.returncode == 1 and "--workdir" in out.stderr


@pytest.mark.parametrize(
  "override, message",
  [
    ("--config.power_iters=3", "'power_iters': it was renamed: use --config.train_iters"),
    (
      "--config.crm.temperatur=3",
      '\'crm.temperatur\': Did you mean "temperature" instead of "temperatur"?',
    ),
    ("--config.no_such_field=3", "'no_such_field': check its spelling"),
  ],
)
def test_an_unknown_or_renamed_config_field_is_one_line_and_exit_status_2(override, message):
  out = _run("experiments.mnist", "--config=experiments/configs/mnist.py:smoke", override)
  assert out.returncode == 2, out.stderr
  assert out.stderr.strip().splitlines() == [f"error: the config has no field {message}"]


def test_a_renamed_field_of_the_certify_config_names_its_own_new_field():
  out = _run(
    "experiments.certify",
    "--config=experiments/configs/certify.py",
    "--workdir=x",
    "--config.power_sound_iters=5",
  )
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
    "error: the config has no field 'power_sound_iters': it was renamed: use "
    "--config.baseline_sound_iters"
  ]
