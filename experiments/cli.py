"""The command-line entry shared by every experiment: flags, help, logging, clear errors.

Each experiment is ``python -m experiments.<name> --config=<file>.py[:variant]
[--config.<field>=<value> ...] [--workdir=<dir>]``. Its module ends with

  if __name__ == "__main__":
    cli.run(main, workdir_help="...")

and ``run`` defines ``--config`` (and ``--workdir`` where the experiment has one) when the
command starts, so tests can import any number of experiments (absl refuses a flag defined
twice); lists them under the experiment's own ``--help`` (absl lists only the main module's
flags, and these are defined here); quiets absl's INFO logging (Orbax's per-save lines); and
turns the errors a user can fix (bad settings, missing data or checkpoints, a diverged run)
into ``error: <message>`` on stderr and exit status 2, with no traceback.
"""

from __future__ import annotations

import functools
import logging as std_logging
import sys
from collections.abc import Callable, Mapping
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

from crmjax import checkpoint, config_schema, train

# What a user can fix from the message alone (the messages name the fix).
ERRORS: tuple[type[BaseException], ...] = (
  ValueError,
  FileNotFoundError,
  OSError,
  checkpoint.CheckpointError,
  train.TrainingDiverged,
)
CONFIG_HELP = (
  "Experiment config: a .py file with get_config(variant); '<file>.py:smoke' is "
  "its short CPU variant. Override fields with --config.<field>=<value>."
)


def _define(name: str, definer: Callable[..., Any], *args, **kwargs):
  """Defines flag ``name`` (again, if a test already did) as a key flag of the main module."""
  if name in flags.FLAGS:
    delattr(flags.FLAGS, name)
  holder = definer(name, *args, **kwargs)
  # absl's --help lists the key flags of the module named by sys.argv[0] (the main module);
  # flags defined here are otherwise this module's.
  flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
  return holder


def run(
  main: Callable[..., Any],
  *,
  config_help: str = CONFIG_HELP,
  config_default: str | None = None,
  workdir_help: str | None = None,
  workdir_default: str | None = None,
  errors: tuple[type[BaseException], ...] = ERRORS,
  renamed: Mapping[str, str] = config_schema.RENAMED_CONFIG_KEYS,
) -> None:
  """Parses the command line and calls ``main(config)`` or ``main(config, workdir)``.

  Args:
    main: the experiment; it gets the parsed ``ml_collections.ConfigDict`` and, if
      ``workdir_help`` is given, the ``--workdir`` value.
    config_help: ``--config``'s help text.
    config_default: a config file used when ``--config`` is absent; None makes the flag
      required.
    workdir_help: ``--workdir``'s help text; None: the experiment has no ``--workdir``.
    workdir_default: used when ``--workdir`` is absent; None makes the flag required.
    errors: exception types reported as ``error: <message>`` with exit status 2.
    renamed: config fields renamed since (old name -> new name), named in the error of an
      override that uses the old name (default: the training config's renames).
  """
  config = _define(
    "config", config_flags.DEFINE_config_file, config_default, config_help, lock_config=True
  )
  required = [] if config_default else ["config"]
  workdir = None
  if workdir_help is not None:
    workdir = _define("workdir", flags.DEFINE_string, workdir_default, workdir_help)
    required += [] if workdir_default else ["workdir"]
  if required:
    flags.mark_flags_as_required(required)

  def entry(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]} (flags are --name=value)")
    logging.set_verbosity(logging.WARNING)  # keep Orbax's per-save INFO lines out of the log
    std_logging.getLogger("crmjax").setLevel(std_logging.INFO)  # but crmjax's progress lines
    try:
      if workdir is None:
        main(config.value)
      else:
        main(config.value, workdir.value)
    except errors as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  app.run(entry, flags_parser=functools.partial(_parse_flags, renamed=renamed))


def _parse_flags(argv: list[str], renamed: Mapping[str, str]) -> list[str]:
  """absl's parsing (usage errors: exit status 1), with an override of a config field that does
  not exist reported in one line with exit status 2 instead of ml_collections' traceback: a
  field renamed since (``renamed``, old name -> new name) names its new flag, a typo gets
  ml_collections' suggestion. Other errors (e.g. a bug in the config file) propagate."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    cause = e
    while cause.args and isinstance(cause.args[0], BaseException):  # AttributeError(KeyError)
      cause = cause.args[0]
    name, _, suggestion = str(cause.args[0] if cause.args else cause).partition("\n")
    name = name.strip("\"'")
    paths = [a[len("--config.") :].partition("=")[0] for a in argv[1:] if a.startswith("--config.")]
    path = next((p for p in paths if name in p.split(".")), None)
    if path is None:
      raise
    if name in renamed:
      new = ".".join(renamed[name] if part == name else part for part in path.split("."))
      hint = f"it was renamed: use --config.{new}"
    else:
      hint = suggestion or "check its spelling"
    print(f"error: the config has no field {path!r}: {hint}", file=sys.stderr)
    sys.exit(2)
