"""Wall-clock timing of jit-compiled functions, shared by the experiments.

``measure`` compiles a jitted function ahead of time (compile time apart), runs untimed
warm-up calls, then times each call to ``jax.block_until_ready`` and reports the median;
``advance`` threads a call's outputs into the next call's arguments (train states, power
vectors), so donated inputs are never reused.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def compile_fn(fn: Callable, args: tuple) -> tuple[Any, float]:
  """``fn.lower(*args).compile()`` (``fn`` jitted) and its wall time in seconds."""
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  return compiled, time.perf_counter() - t0


def xla_memory_bytes(compiled) -> int | None:
  """XLA's estimate of one call's memory: arguments + outputs + temporaries - aliased."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # not every backend implements it  # noqa: BLE001
    return None
  if m is None:
    return None
  return int(
    m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  )


def same_args(args: tuple, out: Any) -> tuple:
  """The ``advance`` of a function whose inputs are not donated: call it on the same args."""
  del out
  return args


def time_steps(
  compiled: Callable,
  args: tuple,
  advance: Callable[[tuple, Any], tuple] = same_args,
  *,
  steps: int,
  warmup: int,
) -> list[float]:
  """Milliseconds of each of ``steps`` calls after ``warmup`` untimed ones.

  ``advance(args, outputs)`` gives the next call's arguments (the train state or the power
  vectors are threaded through, as in training; donated inputs are never reused).
  """
  if steps < 1 or warmup < 0:
    raise ValueError(f"steps={steps} must be >= 1 and warmup={warmup} >= 0")
  times = []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    if i >= warmup:
      times.append(1e3 * (time.perf_counter() - t0))
    args = advance(args, out)
  return times


def measure(
  fn: Callable,
  args: tuple,
  advance: Callable[[tuple, Any], tuple] = same_args,
  *,
  steps: int,
  warmup: int,
) -> dict:
  """Compiles ``fn`` (jitted) for ``args`` and times it.

  Returns:
    ``{'ms': median ms per call, 'compile_s', 'steps_ms': every timed call,
    'xla_memory_bytes': see xla_memory_bytes}``.
  """
  compiled, compile_s = compile_fn(fn, args)
  times = time_steps(compiled, args, advance, steps=steps, warmup=warmup)
  return {
    "ms": statistics.median(times),
    "compile_s": compile_s,
    "steps_ms": times,
    "xla_memory_bytes": xla_memory_bytes(compiled),
  }


def peak_memory_bytes(devices) -> int | None:
  """The largest ``peak_bytes_in_use`` over ``devices`` (process lifetime); None if unknown."""
  peaks = []
  for d in devices:
    stats = d.memory_stats()
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


class Progress:
  """Prints ``[   12 s] message`` lines, seconds since construction, flushed at once."""

  def __init__(self):
    self.start = time.perf_counter()

  def __call__(self, message: str) -> None:
    print(f"  [{time.perf_counter() - self.start:6.0f} s] {message}", flush=True)
