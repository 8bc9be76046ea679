"""Speed of CRM training: ms per jit-compiled step, cross-entropy vs CRM, and LipLT's depth.

  python -m experiments.benchmark --config=experiments/configs/benchmark.py
  python -m experiments.benchmark --config=experiments/configs/benchmark.py:smoke
  python -m experiments.benchmark --config=experiments/configs/benchmark.py \
      --config.depth_sweep=True --config.models="()"

For each model, on random images and labels, with the real training step
(``crmjax.train_step.make_train_step`` + ``jit_step``, data parallel over every device): the median
ms per step after warm-up of the cross-entropy step, the CRM step with the pairwise LipLT
bound at the paper's power iterations and at 1 warm-started iteration, the CRM step with the
naive bound, and the LipLT bound alone (forward); compile time apart. Where the recipe
computes the bound on one step in N (``bound_every_steps``), its CRM column is the mean step
of such an N-step cycle. ``depth_sweep`` adds
the bounds alone on equal-width conv nets of growing depth; ``breakdown`` the model's
forward and the bound's forward+backward (what the CRM step adds to cross-entropy). Prints
markdown tables and writes JSON (``--config.output``): per model ``ms``, ``compile_s``,
``steps_ms`` and ``xla_memory_bytes`` by column, ``crm_ce_ratio``, ``samples_per_s_crm``,
``peak_memory_bytes`` (None where the backend does not report it, e.g. CPU); the JSON is
rewritten after each model and depth (``"complete": false`` until the end).

Params and power vectors are random (numpy; the speed does not depend on their values), the
batch is random and fixed. Power vectors are threaded from step to step as in training.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from crmjax import data, liplt, models, train_state, train_step
from crmjax import layers as L
from experiments import cli, timing
from experiments.configs import benchmark as benchmark_config
from experiments.configs import default

COLUMNS = ("ce", "crm_liplt", "crm_liplt_1it", "crm_naive", "liplt_bound")
BREAKDOWN = (
  "ce_forward",
  "liplt_bound_grad",
  "liplt_bound_grad_0it",
  "table_grad",
  "rows_grad",
  "power_iters",
)
HEADERS = {
  "ce": "cross-entropy step",
  "crm_liplt": "CRM step, LipLT",
  "crm_liplt_1it": "CRM step, LipLT 1 it",
  "crm_naive": "CRM step, naive",
  "liplt_bound": "LipLT bound alone",
  "ce_forward": "model forward",
  "liplt_bound_grad": "LipLT bound fwd+bwd",
  "liplt_bound_grad_0it": "LipLT bound fwd+bwd, 0 it",
  "table_grad": "eq. 19 table fwd+bwd",
  "rows_grad": "class rows fwd+bwd",
  "power_iters": "power iterations alone",
}


def measure(fn: Callable, args: tuple, advance: Callable, config) -> dict:
  """``timing.measure`` with the config's timed and warm-up steps."""
  return timing.measure(fn, args, advance, steps=config.steps, warmup=config.warmup_steps)


# ------------------------------------------------------------------- the model table


def train_config(
  config: ml_collections.ConfigDict,
  *,
  bound: str,
  train_iters: int,
  batch_size: int,
  solver: str = "power",
  bound_every: int = 1,
) -> ml_collections.ConfigDict:
  """The training config of one CRM column (the paper's CRM settings, no warm-up)."""
  c = default.get_config()
  c.loss, c.bound, c.bound_mode = "crm", bound, "pairwise"
  c.train_iters, c.batch_size, c.train_solver = train_iters, batch_size, solver
  c.bound_every_steps = bound_every
  c.crm = config.crm
  return c


def paper_model(name: str, dataset: str | None = None) -> models.Model:
  """A registered architecture on the input shape and classes of ``dataset`` (default: its
  paper dataset, ``experiments.configs.benchmark.MODELS``; shapes from ``data.dataset_info``)."""
  if dataset is None:
    if name not in benchmark_config.MODELS:
      raise ValueError(f"unknown model {name!r}; use one of {sorted(benchmark_config.MODELS)}")
    dataset = benchmark_config.MODELS[name][0]
  info = data.dataset_info(dataset)
  return models.get_model(name, input_shape=info.image_shape, num_classes=info.num_classes)


def random_batch(
  model: models.Model, batch_size: int, seed: int, sharding
) -> tuple[jax.Array, jax.Array]:
  rng = np.random.default_rng(seed)
  x = rng.random((batch_size, *model.input_shape), dtype=np.float32)
  y = rng.integers(0, model.num_classes, batch_size).astype(np.int32)
  return jax.device_put(x, sharding), jax.device_put(y, sharding)


@dataclasses.dataclass(frozen=True)
class Setup:
  """One model's inputs, shared by its columns: an initial train state and a batch."""

  model: models.Model
  tx: optax.GradientTransformation
  state: train_state.TrainState  # replicated; copied per column (the step donates it)
  images: jax.Array
  labels: jax.Array
  replicated: Any
  batch_sharding: Any


def random_params(shapes, rng: np.random.Generator):
  """LeCun-normal kernels and zero biases of the given shapes (numpy: no PRNG compiles).

  The step's speed does not depend on the values; ``jax.random`` initialisation would
  spend seconds compiling on a CPU (``train_state.create_state`` of 4C3F: ~15 CPU-seconds on two
  cores, mostly threefry's compile for the kernels' shapes; this: under 1 s).
  """

  def leaf(s):
    if len(s.shape) < 2:
      return np.zeros(s.shape, s.dtype)
    fan_in = int(np.prod(s.shape[:-1]))
    return (rng.standard_normal(s.shape) / np.sqrt(fan_in)).astype(s.dtype)

  return jax.tree.map(leaf, shapes)


def random_power(shapes, rng: np.random.Generator) -> liplt.PowerState:
  """Random unit rows shaped like ``liplt.init_state`` (numpy)."""

  def leaf(s):
    v = rng.standard_normal(s.shape)
    return (
      v / np.linalg.norm(v.reshape(len(v), -1), axis=1).reshape((-1,) + (1,) * (v.ndim - 1))
    ).astype(s.dtype)

  return jax.tree.map(leaf, shapes)


def random_state(
  model: models.Model, tx: optax.GradientTransformation, seed: int
) -> train_state.TrainState:
  """A state shaped like ``train_state.create_state``'s, made in numpy (nothing is compiled).

  The structure is ``train_state.abstract_state``'s; params and power vectors
  are random (``random_params``, ``random_power``), every other leaf is zero, as in a fresh
  state (step 0, Adam's zero moments and count).
  """
  shapes = train_state.abstract_state(model, tx, seed)
  rng = np.random.default_rng(seed)
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  return zeros.replace(
    params=random_params(shapes.params, rng), power=random_power(shapes.power, rng)
  )


def make_setup(model: models.Model, config, devices, *, batch_size: int) -> Setup:
  """A replicated ``random_state`` and a sharded random batch."""
  tx = train_state.make_optimizer(
    train_config(config, bound="liplt", train_iters=1, batch_size=batch_size), 1000
  )
  replicated, batch_sharding = train_state.make_mesh(devices)
  state = jax.device_put(random_state(model, tx, config.seed), replicated)
  x, y = random_batch(model, batch_size, config.seed, batch_sharding)
  return Setup(model, tx, state, x, y, replicated, batch_sharding)


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def _advance_state(args, out):
  return (out[0],) + tuple(args[1:])


def _advance_power(args, out):
  return (args[0], out[1])


def bound_cycle(full: Callable, stale: Callable, every: int) -> Callable:
  """``every`` train steps as training runs them with ``bound_every_steps = every``: the
  step that computes the bound, then ``every - 1`` steps reusing it; the last metrics."""

  def cycle(state, images, labels):
    state, metrics = full(state, images, labels)
    bound = metrics.pop("pairwise_bound")
    for _ in range(every - 1):
      state, metrics = stale(state, images, labels, bound)
    return state, metrics

  return cycle


def step_column(
  setup: Setup,
  config,
  *,
  regularized: bool,
  bound: str,
  train_iters: int,
  solver: str = "power",
  bound_every: int = 1,
) -> dict:
  """Times ``jit_step(make_train_step(...))`` from the initial state on the fixed batch.

  ``bound_every > 1``: one ``bound_cycle`` of that many steps is jitted and timed, and the
  times are per step (the cycle's divided by ``bound_every``).
  """
  batch = setup.images.shape[0]
  tc = train_config(
    config,
    bound=bound,
    train_iters=train_iters,
    batch_size=batch,
    solver=solver,
    bound_every=bound_every if regularized else 1,
  )
  make = lambda **kw: train_step.make_train_step(
    setup.model, setup.tx, tc, regularized=regularized, steps_per_epoch=1000, **kw
  )
  fn, every = make(), tc.bound_every_steps
  if every > 1:
    fn = bound_cycle(fn, make(stale=True), every)
  step = train_step.jit_step(fn, setup.replicated, setup.batch_sharding)
  result = measure(step, (_copy(setup.state), setup.images, setup.labels), _advance_state, config)
  if every > 1:
    result["ms"] /= every
    result["steps_ms"] = [t / every for t in result["steps_ms"]]
  return result


def bound_column(setup: Setup, config, *, train_iters: int, solver: str = "power") -> dict:
  """Times the pairwise LipLT bound alone (forward, power vectors threaded)."""
  model = setup.model

  @jax.jit
  def fn(params, power):
    net = model.lipnet(params)
    return liplt.liplt_bound(net, power, num_iters=train_iters, solver=solver)

  return measure(fn, (setup.state.params, _copy(setup.state.power)), _advance_power, config)


def bound_grad_column(setup: Setup, config, *, train_iters: int, solver: str = "power") -> dict:
  """The bound's forward + backward as inside the CRM step (``sum(L_ij)`` wrt params).

  With ``train_iters=0`` it is the table sweep, the class rows and their backward alone.
  """
  model = setup.model

  def loss(params, power):
    net = model.lipnet(params)
    bound, power = liplt.liplt_bound(net, power, num_iters=train_iters, solver=solver)
    return jnp.sum(bound), power

  fn = jax.jit(jax.grad(loss, has_aux=True))
  return measure(fn, (setup.state.params, _copy(setup.state.power)), _advance_power, config)


def part_column(
  setup: Setup, config, *, part: str, train_iters: int, solver: str = "power"
) -> dict:
  """One part of the bound, jitted alone: ``'table_grad'``, the eq. 19 table (one sweep of
  every interior operator, ``liplt.table_sweep``) forward + backward; ``'rows_grad'``, the exact
  class rows and their norms (``liplt.readout_bound``) forward + backward; ``'power_iters'``,
  ``train_iters`` iterations of ``solver`` (no gradient)."""
  model = setup.model

  def table(params, power):
    outs = liplt.table_sweep(model.lipnet(params), power.liplt)
    return sum(jnp.sum(jnp.linalg.norm(o.reshape(len(o), -1), axis=1)) for o in outs)

  def rows(params, power):
    net = model.lipnet(params)
    return jnp.sum(liplt.readout_bound(net, jnp.ones(len(net.blocks))))

  def iterate(params, power):
    fn = lambda u: liplt.table_sweep(model.lipnet(params), u)
    return liplt.SOLVERS[solver](fn, power.liplt, train_iters)

  fn = {"table_grad": jax.grad(table), "rows_grad": jax.grad(rows), "power_iters": iterate}[part]
  args = (setup.state.params, _copy(setup.state.power))
  return measure(jax.jit(fn), args, timing.same_args, config)


def forward_column(setup: Setup, config) -> dict:
  fn = jax.jit(setup.model.apply)
  return measure(fn, (setup.state.params, setup.images), timing.same_args, config)


def row_label(row: dict) -> str:
  """``4C3F (batch 32), 10 it`` (power iteration), ``..., 4 Lanczos it``, or with the bound
  on one step in N, ``..., 4 Lanczos it, bound every 4 steps``."""
  solver = " Lanczos" if row.get("train_solver") == "lanczos" else ""
  every = row.get("bound_every_steps", 1)
  cadence = f", bound every {every} steps" if every > 1 else ""
  return f"{row['model']} (batch {row['batch_size']}), {row['train_iters']}{solver} it{cadence}"


def model_batches(name: str, config) -> list[int]:
  """The batches a model is timed at: its batch (``batch_sizes`` or ``batch_size``), then
  ``small_batch_size`` where set and different."""
  batch = config.batch_sizes[name] or config.batch_size
  small = config.small_batch_size
  return [batch] + ([small] if small and small != batch else [])


def benchmark_model(
  name: str, config, devices, *, batch: int, progress: Callable[[str], None] = print
) -> dict:
  """Every column of one model's row at one batch (``None`` where skipped)."""
  model = paper_model(name, config.datasets[name])
  iters, solver = config.train_iters[name], config.train_solvers[name]
  every = config.bound_every[name]
  if batch % len(devices):
    raise ValueError(
      f"--config.batch_size={batch} ({name}) must be divisible by the {len(devices)} devices"
    )
  skip = set(config.skip[name])
  setup = make_setup(model, config, devices, batch_size=batch)
  runs = {
    "ce": lambda: step_column(setup, config, regularized=False, bound="liplt", train_iters=iters),
    "crm_liplt": lambda: step_column(
      setup,
      config,
      regularized=True,
      bound="liplt",
      train_iters=iters,
      solver=solver,
      bound_every=every,
    ),
    "crm_liplt_1it": lambda: step_column(
      setup, config, regularized=True, bound="liplt", train_iters=1
    ),
    "crm_naive": lambda: step_column(
      setup, config, regularized=True, bound="naive", train_iters=iters, solver=solver
    ),
    "liplt_bound": lambda: bound_column(setup, config, train_iters=iters, solver=solver),
  }
  if config.breakdown:
    runs.update(
      {
        "ce_forward": lambda: forward_column(setup, config),
        "liplt_bound_grad": lambda: bound_grad_column(
          setup, config, train_iters=iters, solver=solver
        ),
        "liplt_bound_grad_0it": lambda: bound_grad_column(setup, config, train_iters=0),
      }
    )
  for part in ("table_grad", "rows_grad", "power_iters") if config.breakdown else ():
    runs[part] = lambda part=part: part_column(
      setup, config, part=part, train_iters=iters, solver=solver
    )
  results = {}
  for column, run in runs.items():
    results[column] = None if column in skip else run()
    if results[column] is not None:
      progress(
        f"{name} (batch {batch}) {column}: {results[column]['ms']:.1f} ms "
        f"(compile {results[column]['compile_s']:.1f} s)"
      )
  ms = {k: (v["ms"] if v else None) for k, v in results.items()}
  ratio = ms["crm_liplt"] / ms["ce"] if ms["crm_liplt"] and ms["ce"] else None
  return {
    "model": name,
    "input_shape": list(model.input_shape),
    "num_classes": model.num_classes,
    "batch_size": batch,
    "train_iters": iters,
    "train_solver": solver,
    "bound_every_steps": every,
    "ms": ms,
    "compile_s": {k: (v["compile_s"] if v else None) for k, v in results.items()},
    "steps_ms": {k: (v["steps_ms"] if v else None) for k, v in results.items()},
    "xla_memory_bytes": {k: (v["xla_memory_bytes"] if v else None) for k, v in results.items()},
    "crm_ce_ratio": ratio,
    "samples_per_s_crm": batch / (ms["crm_liplt"] / 1e3) if ms["crm_liplt"] else None,
    "peak_memory_bytes": timing.peak_memory_bytes(devices),
  }


# --------------------------------------------------------------------- depth sweep


def sweep_layers(depth: int, width: int, num_classes: int) -> tuple:
  """``depth`` x (conv ``width`` 3x3 s1 p1, ReLU), then flatten and dense ``num_classes``."""
  body = tuple(x for _ in range(depth) for x in (L.Conv(width, 3, 1, 1), L.Act()))
  return body + (L.Flatten(), L.Dense(num_classes))


def table_products(depth: int) -> int:
  """Vector-layer products of one LipLT table sweep: ``sum_i (L - i)(i + 1)`` (O(L^3))."""
  return sum((depth - i) * (i + 1) for i in range(depth))


def sweep_depth(depth: int, config, *, progress: Callable[[str], None] = print) -> dict:
  """The pairwise LipLT and naive bounds alone (forward) of one depth."""
  sc = config.sweep
  model = models.Model(
    f"conv{depth}", sweep_layers(depth, sc.width, sc.num_classes), tuple(sc.input_shape)
  )
  state = random_state(model, optax.identity(), config.seed)
  params, power = state.params, state.power
  row = {"depth": depth, "table_products": table_products(depth)}
  for method, bound_fn in (("liplt", liplt.liplt_bound), ("naive", liplt.naive_bound)):
    fn = jax.jit(
      lambda p, s, bound_fn=bound_fn: bound_fn(
        model.lipnet(p), s, mode="pairwise", num_iters=sc.train_iters
      )
    )
    convs = fn.lower(params, power).as_text().count("stablehlo.convolution")
    r = measure(fn, (params, power), _advance_power, config)
    row[method] = {
      "ms": r["ms"],
      "ms_per_layer": r["ms"] / depth,
      "compile_s": r["compile_s"],
      "steps_ms": r["steps_ms"],
      "hlo_convolutions": convs,
    }
    progress(f"depth {depth} {method}: {r['ms']:.1f} ms (compile {r['compile_s']:.1f} s)")
  return row


# --------------------------------------------------------------------------- tables


def _ms(v: float | None) -> str:
  return "skipped" if v is None else f"{v:.1f} ms"


def _bytes(v: int | None) -> str:
  return "n/a" if v is None else f"{v / 2**20:.0f} MiB"


def format_model_table(rows: list[dict]) -> str:
  head = (
    ["model, iterations per step"]
    + [HEADERS[c] for c in COLUMNS]
    + ["CRM/CE", "samples/s (CRM)", "peak mem"]
  )
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [row_label(r)]
    cells += [_ms(r["ms"][c]) for c in COLUMNS]
    cells.append("n/a" if r["crm_ce_ratio"] is None else f"{r['crm_ce_ratio']:.2f}x")
    cells.append("n/a" if r["samples_per_s_crm"] is None else f"{r['samples_per_s_crm']:.0f}")
    cells.append(_bytes(r["peak_memory_bytes"]))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def format_compile_table(rows: list[dict]) -> str:
  head = ["model"] + [f"compile s: {HEADERS[c]}" for c in COLUMNS] + ["XLA mem estimate, CRM step"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [f"{r['model']} (batch {r['batch_size']})"] + [
      "skipped" if r["compile_s"][c] is None else f"{r['compile_s'][c]:.1f}" for c in COLUMNS
    ]
    cells.append(_bytes(r["xla_memory_bytes"]["crm_liplt"]))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def format_breakdown_table(rows: list[dict]) -> str:
  cols = ("ce", "ce_forward", "crm_liplt", "liplt_bound") + BREAKDOWN[1:]
  head = ["model, iterations per step"] + [HEADERS[c] for c in cols]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [row_label(r)]
    cells += [_ms(r["ms"].get(c)) for c in cols]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def format_sweep_table(rows: list[dict]) -> str:
  head = [
    "layers L",
    "LipLT bound",
    "LipLT ms/L",
    "naive bound",
    "naive ms/L",
    "LipLT HLO convolutions",
    "naive HLO convolutions",
    "LipLT table vector-layer products",
  ]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    a, n = r["liplt"], r["naive"]
    lines.append(
      "| "
      + " | ".join(
        [
          str(r["depth"]),
          _ms(a["ms"]),
          f"{a['ms_per_layer']:.2f}",
          _ms(n["ms"]),
          f"{n['ms_per_layer']:.2f}",
          str(a["hlo_convolutions"]),
          str(n["hlo_convolutions"]),
          str(r["table_products"]),
        ]
      )
      + " |"
    )
  return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def validate(config) -> None:
  for name in config.models:
    if name not in config.datasets or name not in models.ARCHITECTURES:
      raise ValueError(
        f"--config.models: unknown model {name!r}; use some of {sorted(config.datasets)}"
      )
    if config.datasets[name] not in data.KNOWN_DATASETS:
      raise ValueError(
        f"--config.datasets.{name}={config.datasets[name]!r}: use one of "
        f"{list(data.KNOWN_DATASETS)}"
      )
    unknown = set(config.skip[name]) - set(COLUMNS)
    if unknown:
      raise ValueError(
        f"--config.skip.{name}: unknown columns {sorted(unknown)}; use some of {list(COLUMNS)}"
      )
  if config.steps < 1 or config.warmup_steps < 0:
    raise ValueError("--config.steps must be >= 1 and --config.warmup_steps >= 0")


def _write(result: dict, path: str) -> None:
  """Writes the JSON atomically (a run stopped mid-way leaves the rows measured so far)."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=2)
  os.replace(tmp, path)


def run_benchmark(config: ml_collections.ConfigDict) -> dict:
  """Runs every measurement, prints the tables, writes ``config.output``; returns the JSON.

  The JSON is rewritten after every model and every depth, with ``"complete": false``
  until the last one, so a run stopped by a time limit keeps what it measured.
  """
  validate(config)
  progress = timing.Progress()
  devices = jax.devices()[: config.num_devices] if config.num_devices else jax.devices()
  result = {
    "backend": jax.default_backend(),
    "device_kind": devices[0].device_kind,
    "num_devices": len(devices),
    "jax_version": jax.__version__,
    "steps": config.steps,
    "warmup_steps": config.warmup_steps,
    "columns": list(COLUMNS),
    "models": [],
    "depth_sweep": [],
    "complete": False,
  }
  print(
    f"backend {result['backend']} ({result['device_kind']}) x {len(devices)}, "
    f"{config.steps} timed steps after {config.warmup_steps} warm-up",
    flush=True,
  )
  for name in config.models:
    for batch in model_batches(name, config):
      row = benchmark_model(name, config, devices, batch=batch, progress=progress)
      result["models"].append(row)
      _write(result, config.output)
  for depth in config.sweep.depths if config.depth_sweep else ():
    result["depth_sweep"].append(sweep_depth(depth, config, progress=progress))
    _write(result, config.output)
  result["complete"] = True
  _write(result, config.output)

  if result["models"]:
    print("\nmedian ms per jit-compiled step after warm-up (pairwise bounds)\n")
    print(format_model_table(result["models"]))
    print()
    print(format_compile_table(result["models"]))
    if config.breakdown:
      print()
      print(format_breakdown_table(result["models"]))
  if result["depth_sweep"]:
    sc = config.sweep
    print(
      f"\nbounds alone (pairwise, {sc.train_iters} power iteration, forward): "
      f"conv {sc.width} channels 3x3 on {tuple(sc.input_shape)}, dense "
      f"{sc.num_classes}\n"
    )
    print(format_sweep_table(result["depth_sweep"]))
  print(f"\nwrote {config.output}")
  return result


def main(config: ml_collections.ConfigDict) -> None:
  run_benchmark(config)


if __name__ == "__main__":
  cli.run(
    main,
    config_help="Benchmark config: experiments/configs/benchmark.py[:smoke]; "
    "override fields with --config.<field>=<value>.",
  )
