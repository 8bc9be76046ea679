"""Writes the crmjax notebooks from the cell lists below (outputs cleared).

    python notebooks/build.py            # rewrites notebooks/*.ipynb

Edit the cells here, not in the .ipynb files; ``tests/test_notebooks.py`` runs every notebook
(small CPU setting) and checks that the stored files carry no outputs.
"""

from __future__ import annotations

import pathlib

import nbformat
from nbformat import v4

HERE = pathlib.Path(__file__).resolve().parent

# ----------------------------------------------------------------------------- shared cells

INSTALL = """\
# Colab / fresh machine: install crmjax (with the CUDA build of JAX) if it is not importable.
# Locally (crmjax installed, e.g. `pip install -e .`) this cell does nothing.
import importlib, importlib.util, os, subprocess, sys

REPO = "https://github.com/<your-org>/crmjax"  # PLACEHOLDER: set to the crmjax repository URL

if importlib.util.find_spec("crmjax") is None:
    src = os.path.abspath("crmjax_src")
    if not os.path.isdir(src):  # a clone (not just `pip install git+...`): it has the MNIST copy in data/
        subprocess.run(["git", "clone", "--depth", "1", REPO, src], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"{src}[cuda]"], check=True)
    os.environ.setdefault("CRMJAX_DATA_DIR", os.path.join(src, "data"))  # vendored MNIST
    importlib.invalidate_caches()
    # If pip replaced an already imported JAX, restart the runtime and run the notebook again.
"""

SMALL_SWITCH = """\
SMALL = os.environ.get("CRMJAX_NOTEBOOK_SMALL", "0") == "1" or jax.default_backend() == "cpu"
print(f"JAX {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s), SMALL = {SMALL}")
"""

QUICK_SWITCH = """\
TINY = os.environ.get("CRMJAX_NOTEBOOK_SMALL", "0") == "1"  # CI: every cell runs in seconds
CPU = jax.default_backend() == "cpu"
SMALL = TINY or CPU
print(f"JAX {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s), "
      f"setting: {'tiny (CI)' if TINY else 'CPU' if CPU else 'GPU'}")
"""

# ----------------------------------------------------------------------------- quickstart

QUICKSTART = [
  (
    "md",
    """\
# crmjax quickstart: train 4C3F on MNIST with CRM, then certify it

This notebook trains the paper's 4C3F network on MNIST with the CRM objective (cross-entropy
plus a penalty on small certified radii, with the differentiable LipLT bound inside the loss),
reloads the final parameters from the Orbax checkpoint, computes a **guaranteed** pairwise
Lipschitz bound with `crmjax.soundness.sound_bound`, and plots the certified-radius curve.

* On a GPU: 5 epochs on the full training set, CRM from the first step, a few minutes.
* On a CPU (a laptop): 4C3F on 6,000 training images for 6 epochs at batch 128, a few
  minutes; it learns visibly (roughly 90% clean accuracy, radii of a few tenths).
* With `CRMJAX_NOTEBOOK_SMALL=1` (the repository's CI): 256 images, one epoch, seconds. The
  accuracies are then meaningless; the point is that every cell runs.

Training writes TensorBoard event files next to `metrics.jsonl`; the `%tensorboard` cell below
shows the curves (loss, accuracy, mean radius, mean pairwise bound, learning rate, lambda).
""",
  ),
  ("code", INSTALL),
  (
    "code",
    """\
import os, shutil, tempfile, time

import jax
import matplotlib.pyplot as plt
import numpy as np

from crmjax import certify, checkpoint, data, soundness, train, train_state
from experiments.configs import mnist_fast as mnist_config

"""
    + QUICK_SWITCH,
  ),
  (
    "md",
    """\
## The configuration

`experiments/configs/mnist_fast.py` holds the fast recipe: the paper's r0 = 2.2, lambda = 30
and eps = 1.58 with a sharper soft-min (t = 20 instead of 5), the reference implementation's
penalty g(r) = -r, batch 32, a one-cycle learning rate, 4 warm-started Lanczos products on one
step in 5 and a moving average of the weights (20 epochs on a 2-core CPU: 96.29% clean, 60.55%
certified at eps = 1.58). The main command's `mnist.py` trains it at batch 16 with the bound
on every step (62% certified, 2-3x the time per epoch). The cell below shortens the fast recipe
to fit the machine; any field can be changed here.
""",
  ),
  (
    "code",
    """\
if TINY:  # seconds on a CPU (CI)
    config = mnist_config.get_config("smoke")
    config.train_subset, config.test_subset = 256, 128
    config.num_epochs = 1
    config.crm.warmup_epochs = 0  # CRM from the first step
    config.sound_iters = 100  # Lanczos steps of the sound bound's large operators
    config.sound_eval = False  # the notebook certifies with the sound bound below; skip the duplicate
    config.progress_bar = False
    EXACT_MAX_DIM = 512  # materialise only the small operators (float64 Grams of the 784-wide ones are slow on a CPU)
elif CPU:  # a few minutes on a laptop CPU: enough images and steps to learn visibly
    config = mnist_config.get_config()
    config.train_subset, config.test_subset = 6000, 1000
    config.batch_size, config.num_epochs = 128, 6
    config.train_iters = 2  # warm-started: a couple per step track the bound
    config.sound_eval = False  # certified below with the sound bound
    config.progress_bar = False
    EXACT_MAX_DIM = 512
else:  # a GPU: the full training set
    config = mnist_config.get_config()
    config.num_epochs = 5  # at the fast recipe's batch 32: 1,875 steps per epoch
    EXACT_MAX_DIM = 1024  # the default of soundness.sound_bound (and of train_and_evaluate)

WORKDIR = tempfile.mkdtemp(prefix="crmjax_quickstart_")  # a fixed path resumes an interrupted run
print(f"model {config.model}, loss {config.loss}, bound {config.bound} ({config.bound_mode}), "
      f"{config.num_epochs} epoch(s), batch {config.batch_size}, eps {config.eps}")
print("workdir:", WORKDIR)
""",
  ),
  (
    "md",
    """\
## Train

`train_and_evaluate` runs the jit-compiled, data-parallel train step, writes
`checkpoints/`, `metrics.jsonl` and `results.json` to the workdir, and ends with a test
evaluation that certifies with the sound bound.
""",
  ),
  (
    "code",
    """\
t0 = time.time()
result = train.train_and_evaluate(config, WORKDIR)
print(f"\\ntrained and evaluated in {time.time() - t0:.0f} s")
for k in ("clean_accuracy", "certified_accuracy", "mean_pairwise_lipschitz", "bound_kind"):
    print(f"  {k}: {result[k]}")  # with sound_eval=False: the power-iteration estimate
""",
  ),
  (
    "md",
    """\
## The curves in TensorBoard

Training wrote TensorBoard event files into the workdir (with `tensorboardX`, no TensorFlow
needed): per log step `train/loss`, `train/accuracy`, `train/radius` (mean certified radius),
`train/lip` (mean pairwise bound), `train/learning_rate`, `train/lambda`; per epoch the same
under `epoch/` plus the test curves `test/clean_accuracy` and
`test/certified_accuracy_estimate`; at the end `final/certified_accuracy`. In Colab or Jupyter
the next cell opens TensorBoard inline (from a shell: `tensorboard --logdir <workdir>`).
""",
  ),
  (
    "code",
    """\
if not TINY:  # needs the tensorboard package (pip install tensorboard); CI skips it
    %load_ext tensorboard
    %tensorboard --logdir $WORKDIR
print(sorted(f for f in os.listdir(WORKDIR) if f.startswith("events.out.tfevents")))
""",
  ),
  (
    "md",
    """\
## Reload the final parameters from the checkpoint

The checkpoint holds the whole `TrainState` (params, optimizer state, power-iteration state,
step, PRNG key). The restore target fixes the tree structure, shapes, dtypes and shardings:
`train_state.abstract_state` (`jax.eval_shape` of `train_state.create_state`) gives them without
initialising (or compiling) anything. (`crmjax.runs.load_run(WORKDIR)` does the same from the config stored in the
checkpoint.)
""",
  ),
  (
    "code",
    """\
model = train_state.make_model(config)
tx = train_state.make_optimizer(config, total_steps=1)  # the state's structure does not depend on the schedule
replicated, _ = train_state.make_mesh()
target = train_state.abstract_state(model, tx, config.seed, replicated)
with checkpoint.Checkpointer(os.path.join(WORKDIR, "checkpoints")) as ckpt:
    state, meta = ckpt.restore(target)  # the latest step
print(f"restored step {int(state.step)} (epoch {meta['epoch']}) of {meta['architecture']} on {meta['dataset']}")
""",
  ),
  (
    "md",
    """\
## Certify

Training uses warm-started power iteration, which may underestimate an operator norm.
`sound_bound` replaces every norm of the LipLT recursion by a guaranteed upper bound (exact
float64 norms for small operators, Lanczos from a random start with a stated failure probability
for large ones). The certified radius of a point is `min_{i != y} (z_y - z_i) / L_yi` (paper eq. 5).
""",
  ),
  (
    "code",
    """\
test_x, test_y = data.load_split("mnist", "test")  # vendored copy, no internet needed
if config.test_subset:
    test_x, test_y = test_x[:config.test_subset], test_y[:config.test_subset]

logits = certify.batched_logits(model, state.params, test_x, batch_size=config.eval_batch_size)
lip, info = soundness.sound_bound(model.lipnet(state.params), warm=state.power,
                                  num_iters=config.sound_iters, exact_max_dim=EXACT_MAX_DIM)
radii = certify.radii_of(logits, test_y, lip)

print(f"bound: {info['kind']} ({info['exact_norms']} exact norms, {info['probabilistic_norms']} "
      f"probabilistic, inflated by at most {info.get('max_relative_inflation', 0.0):.1%} each)")
print(f"mean pairwise Lipschitz bound: {certify.mean_pairwise(lip):.3f}")
print(f"clean accuracy:               {(logits.argmax(1) == test_y).mean():.4f}")
print(f"certified accuracy at {config.eps}: {certify.certified_accuracy(radii, config.eps):.4f}"
      f"  (train_and_evaluate: {result['certified_accuracy']:.4f}, {result['bound_kind']})")
""",
  ),
  (
    "code",
    """\
eps_grid = np.linspace(0.0, max(float(radii.max()), config.eps) * 1.1, 200)
curve = certify.certified_accuracy(radii, eps_grid)  # share of points with radius > eps

fig, ax = plt.subplots(figsize=(5.5, 3.5))
ax.plot(eps_grid, curve, label="CRM, sound LipLT bound")
ax.axvline(config.eps, color="gray", ls="--", lw=1, label=f"eps = {config.eps}")
ax.set_xlabel("l2 radius eps (pixels in [0, 1])")
ax.set_ylabel("share of test points certified")
ax.set_ylim(0, 1.02)
ax.legend()
plt.show()
""",
  ),
  (
    "code",
    """\
preds = logits.argmax(1)
fig, axes = plt.subplots(1, 8, figsize=(13, 2.2))
for ax, i in zip(axes, range(8)):
    ax.imshow(test_x[i, ..., 0], cmap="gray")
    ax.set_title(f"label {test_y[i]}, pred {preds[i]}\\nradius {radii[i]:.3f}", fontsize=8)
    ax.axis("off")
plt.show()
""",
  ),
  (
    "md",
    """\
## Next

* `python -m experiments.certify --config=experiments/configs/certify.py --workdir=<workdir>`
  reproduces Table 1 (clean / PGD / certified), Table 2 (naive vs LipLT bounds) and Figure 1 from
  a checkpoint, and attacks every certified point with l2 PGD.
* The full paper run: `python -m experiments.mnist --config=experiments/configs/mnist.py`.
""",
  ),
  (
    "code",
    """\
if TINY:  # the CI run is throwaway; keep the others' workdirs (TensorBoard reads them)
    shutil.rmtree(WORKDIR, ignore_errors=True)
""",
  ),
]

# ----------------------------------------------------------------------------- bounds

BOUNDS = [
  (
    "md",
    """\
# Lipschitz bounds with `crmjax.liplt`

`crmjax.liplt` computes upper bounds on the Lipschitz constant of a network's logits, as
ordinary pure JAX functions of the parameters: jit them, differentiate them, use them in your
own loss. This notebook compares

* the **naive** bound (product of layer norms),
* the **LipLT** bound (the loop transformation of Fazlyab et al., 2023, eq. 19),
* a **lower estimate** of the true constant: the largest Jacobian norm over random inputs,

in the three modes (pairwise `L_ij` for the margin `z_i - z_j`, per class, global), shows how
the gap grows with depth, trains a small network with the bound inside an optax loss, and does the
same for a Flax NNX model (`crmjax.nnx_bridge`).
""",
  ),
  ("code", INSTALL),
  (
    "code",
    """\
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

from crmjax import certify, liplt, losses, network, soundness
from crmjax import layers as L

"""
    + SMALL_SWITCH,
  ),
  (
    "md",
    """\
## Small random networks

A network is a tuple of layer specs; `L.Sequential(layers)` is the Flax module and
`network.from_layers(layers, params, input_shape)` the eq. 17 form the bounds read.
""",
  ),
  (
    "code",
    '''\
K = 10

def mlp(depth, width=32):
    """`depth` dense layers: depth - 1 hidden ReLU layers of `width`, then K logits."""
    return tuple(x for _ in range(depth - 1) for x in (L.Dense(width), L.Act())) + (L.Dense(K),)

NETS = {
    "MLP 16-32-32-10": (mlp(3), (16,)),
    "conv 8x8x1": ((L.Conv(4, 3, 1, 1), L.Act(), L.Conv(8, 4, 2, 1), L.Act(), L.Flatten(),
                    L.Dense(32), L.Act(), L.Dense(K)), (8, 8, 1)),
}

def build(layers, input_shape, seed=0):
    module = L.Sequential(layers)
    params = module.init(jax.random.key(seed), jnp.zeros((1, *input_shape)))["params"]
    return module, params, network.from_layers(layers, params, input_shape)

@jax.jit
def lower_estimates(jac):
    """Largest norms over sampled Jacobians jac (n, K, D): pairwise (K, K), per class (K,), global ()."""
    pair = jnp.linalg.norm(jac[:, :, None] - jac[:, None, :], axis=-1).max(0)
    per_class = jnp.linalg.norm(jac, axis=-1).max(0)
    glob = jnp.linalg.norm(jac, ord=2, axis=(1, 2)).max()
    return {"pairwise": pair, "per_class": per_class, "global": glob}

def jacobians(module, params, input_shape, n, seed=1):
    f = lambda x: module.apply({"params": params}, x[None])[0]
    xs = jax.random.normal(jax.random.key(seed), (n, *input_shape))
    return jax.jit(jax.vmap(jax.jacrev(f)))(xs).reshape(n, K, -1)
''',
  ),
  (
    "code",
    '''\
N_SAMPLES = 256 if SMALL else 4096
ITERS = 100  # power iterations (from a fixed random start) for the interior norms

@jax.jit
def all_bounds(net):
    """LipLT and naive bounds of `net` in every mode (the l2 power-iteration estimates)."""
    return {(method, mode): liplt.lipschitz_bound(net, method=method, mode=mode, num_iters=ITERS)[0]
            for method in liplt.METHODS for mode in liplt.MODES}

def summary(x):  # one number per mode: the mean over pairs i < j, the mean over classes, the value
    x = np.asarray(x)
    return certify.mean_pairwise(x) if x.ndim == 2 else float(x.mean())

for name, (layers, shape) in NETS.items():
    module, params, net = build(layers, shape)
    low = lower_estimates(jacobians(module, params, shape, N_SAMPLES))
    bounds = all_bounds(net)
    sound, info = soundness.sound_bound(net, mode="pairwise")  # guaranteed; every norm is exact here
    assert np.all(np.asarray(low["pairwise"]) <= sound), "a lower estimate exceeds the sound bound"
    print(f"{name}  ({info['kind']} pairwise: mean {certify.mean_pairwise(sound):.3f})")
    print(f"  {'mode':10s} {'lower est.':>10s} {'LipLT':>9s} {'naive':>9s}")
    for mode in liplt.MODES:
        print(f"  {mode:10s} {summary(low[mode]):10.3f} {summary(bounds['liplt', mode]):9.3f} "
              f"{summary(bounds['naive', mode]):9.3f}")
''',
  ),
  (
    "md",
    """\
## Pairwise vs per-class vs global

A certificate needs a pairwise matrix. `liplt.as_pairwise` turns any mode into one
(`L_ij = L_i + L_j` for per-class bounds, `sqrt(2) L` for a global l2 bound). The direct
pairwise bound is the smallest, so it certifies the largest radii.
""",
  ),
  (
    "code",
    """\
layers, shape = NETS["conv 8x8x1"]
module, params, net = build(layers, shape)
bounds = all_bounds(net)  # compiled already (same shapes as above)
pairwise = {}
for mode in liplt.MODES:
    b = bounds["liplt", mode]
    pairwise[mode] = np.asarray(liplt.as_pairwise(b, mode=mode, num_classes=K))
    print(f"{mode:10s} bound shape {str(b.shape):8s} -> mean pairwise L_ij = {certify.mean_pairwise(pairwise[mode]):.3f}")

vmax = max(p.max() for p in pairwise.values())
fig, axes = plt.subplots(1, 3, figsize=(11, 3.3), layout="constrained")
for ax, (mode, p) in zip(axes, pairwise.items()):
    im = ax.imshow(p, vmin=0, vmax=vmax, cmap="viridis")
    ax.set_title(f"{mode} -> pairwise")
    ax.set_xticks(range(K)); ax.set_yticks(range(K))
    ax.set_xlabel("class j"); ax.set_ylabel("class i")
fig.colorbar(im, ax=axes, shrink=0.8, label="L_ij")
plt.show()
""",
  ),
  (
    "md",
    """\
## The gap grows with depth

Dense ReLU networks of width 32 and depth 2 to 8 (every other depth in the small setting) at their random initialisation: the naive
bound multiplies the layer norms, LipLT accounts for the activations' slope range layer by
layer. (Global mode; the lower estimate is the largest sampled Jacobian norm.)
""",
  ),
  (
    "code",
    """\
depths = [2, 4, 6, 8] if SMALL else list(range(2, 9))  # one compilation per depth
both = jax.jit(lambda n: (liplt.liplt_bound(n, mode="global", num_iters=ITERS)[0],
                          liplt.naive_bound(n, mode="global", num_iters=ITERS)[0]))
rows = []
for d in depths:
    module, params, net = build(mlp(d), (16,), seed=d)
    lt, nv = both(net)
    low = float(lower_estimates(jacobians(module, params, (16,), N_SAMPLES))["global"])
    rows.append((float(lt), float(nv), low))
    print(f"depth {d}: lower {low:8.3f}   LipLT {float(lt):8.3f}   naive {float(nv):8.3f}   naive/LipLT {float(nv / lt):5.2f}")
lt, nv, low = map(np.array, zip(*rows))

fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.3))
a1.semilogy(depths, nv, "o-", label="naive")
a1.semilogy(depths, lt, "o-", label="LipLT")
a1.semilogy(depths, low, "o-", label="lower estimate")
a1.set_xlabel("depth (dense layers)"); a1.set_ylabel("global Lipschitz constant"); a1.legend()
a2.plot(depths, nv / lt, "o-")
a2.set_xlabel("depth (dense layers)"); a2.set_ylabel("naive / LipLT")
plt.tight_layout()
plt.show()
""",
  ),
  (
    "md",
    """\
## The bound inside your own loss

Everything is a pure function of the params, so `jax.grad` flows through the bound. The
power-iteration vectors (`liplt.PowerState`) are state: thread them through the steps (warm
start) and 1 to 10 iterations per step suffice. Here: cross-entropy plus `lam` times the mean
pairwise bound, on a synthetic 10-class problem. (`losses.crm_loss(logits, labels, lip, ...)`
is the paper's CRM objective with the same `lip`.)
""",
  ),
  (
    "code",
    """\
kc, ky, kn = jax.random.split(jax.random.key(0), 3)
centers = 2.0 * jax.random.normal(kc, (K, 16))
y_train = jax.random.randint(ky, (512,), 0, K)
x_train = centers[y_train] + jax.random.normal(kn, (512, 16))

layers = mlp(3)
module = L.Sequential(layers)
tx = optax.adam(1e-2)

def loss_fn(params, power, x, y, lam):
    logits = module.apply({"params": params}, x)
    net = network.from_layers(layers, params, (16,))
    lip, power = liplt.liplt_bound(net, power, mode="pairwise", num_iters=2)
    mean_lip = jnp.sum(lip) / (K * (K - 1))  # the mean of L_ij over i != j (the diagonal is 0)
    return losses.cross_entropy(logits, y) + lam * mean_lip, (power, mean_lip)

@jax.jit
def train_step(params, opt_state, power, x, y, lam):
    (loss, (power, mean_lip)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, power, x, y, lam)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, power, loss, mean_lip
""",
  ),
  (
    "code",
    """\
STEPS = 100 if SMALL else 500
history = {}
for lam in (0.0, 0.1):
    params = module.init(jax.random.key(1), jnp.zeros((1, 16)))["params"]
    net0 = network.from_layers(layers, params, (16,))
    opt_state, power = tx.init(params), liplt.init_state(net0, jax.random.key(2))
    trace = []
    for _ in range(STEPS):
        params, opt_state, power, loss, mean_lip = train_step(params, opt_state, power, x_train, y_train, lam)
        trace.append(float(mean_lip))
    logits = module.apply({"params": params}, x_train)
    lip, _ = soundness.sound_bound(network.from_layers(layers, params, (16,)))
    radii = certify.radii_of(logits, y_train, lip)
    history[lam] = trace
    print(f"lam = {lam}: train accuracy {float((logits.argmax(1) == y_train).mean()):.3f}, "
          f"mean pairwise bound {certify.mean_pairwise(lip):.3f} (sound), "
          f"mean certified radius {radii.mean():.3f}")

fig, ax = plt.subplots(figsize=(5.5, 3.3))
for lam, trace in history.items():
    ax.plot(trace, label=f"lam = {lam}")
ax.set_xlabel("step"); ax.set_ylabel("mean pairwise L_ij (training estimate)"); ax.legend()
plt.show()
""",
  ),
  (
    "md",
    """\
## Flax NNX models

`crmjax.nnx_bridge` reads an [NNX](https://flax.readthedocs.io/en/latest/nnx_basics.html)
`nnx.Sequential` into the same layer specs (`to_layers`) and eq. 17 form (`to_lipnet`):
`nnx.Conv` (2-D; `'SAME'`, `'VALID'` or explicit zero padding; any strides), `nnx.Linear`, a
flatten (`nnx_bridge.Flatten()` or `lambda x: x.reshape(x.shape[0], -1)`), the activations
`nnx.relu`, `nnx.leaky_relu` (`functools.partial(nnx.leaky_relu, negative_slope=s)`), `nnx.tanh`,
`nnx.sigmoid` (`nnx_bridge.Activation(fn, slopes=(alpha, beta))` for any other slope-restricted
function), and residual blocks `nnx_bridge.Residual(*fns)`, `x + fns(x)` with one activation
inside. Anything else (BatchNorm, Dropout, a custom module's `__call__`) raises an error that says
what to do.
""",
  ),
  (
    "code",
    """\
import functools

from flax import nnx

from crmjax import nnx_bridge

rngs = nnx.Rngs(0)
nnx_model = nnx.Sequential(
    nnx.Conv(1, 4, (3, 3), strides=2, rngs=rngs), nnx.relu,  # 'SAME' with stride 2: asymmetric padding
    nnx_bridge.Residual(nnx.Conv(4, 4, (3, 3), rngs=rngs),
                        functools.partial(nnx.leaky_relu, negative_slope=0.1),
                        nnx.Conv(4, 4, (3, 3), rngs=rngs)),
    lambda x: x.reshape(x.shape[0], -1),
    nnx.Linear(4 * 4 * 4, 32, rngs=rngs), nnx.tanh,
    nnx.Linear(32, K, rngs=rngs))

nnx_layers, nnx_params = nnx_bridge.to_layers(nnx_model, (8, 8, 1))
for layer in nnx_layers:
    print(layer)

# The layer specs with the NNX arrays compute the NNX model's logits.
x = jax.random.normal(jax.random.key(3), (4, 8, 8, 1))
diff = jnp.abs(L.Sequential(nnx_layers).apply({"params": nnx_params}, x) - nnx_model(x)).max()
print(f"max |specs - nnx| logit difference: {float(diff):.1e}")

nnx_net = nnx_bridge.to_lipnet(nnx_model, (8, 8, 1))
xs = jax.random.normal(jax.random.key(1), (N_SAMPLES, 8, 8, 1))
jac = jax.jit(jax.vmap(jax.jacrev(lambda x: nnx_model(x[None])[0])))(xs).reshape(N_SAMPLES, K, -1)
low = lower_estimates(jac)
bounds = all_bounds(nnx_net)
sound, info = soundness.sound_bound(nnx_net, mode="pairwise")
assert np.all(np.asarray(low["pairwise"]) <= sound), "a lower estimate exceeds the sound bound"
print(f"\\n{'mode':10s} {'lower est.':>10s} {'LipLT':>9s} {'naive':>9s}")
for mode in liplt.MODES:
    print(f"{mode:10s} {summary(low[mode]):10.3f} {summary(bounds['liplt', mode]):9.3f} "
          f"{summary(bounds['naive', mode]):9.3f}")
print(f"sound pairwise ({info['kind']}): mean {certify.mean_pairwise(sound):.3f}")
""",
  ),
  (
    "md",
    """\
### The bound inside an NNX train step

`to_lipnet` reads the NNX variables' values, so under `nnx.value_and_grad` the bound is
differentiable in the model's `nnx.Param`s, and `nnx.jit` compiles the whole step. The
power-iteration state is an ordinary pytree passed in and out. The synthetic problem and loss are
the ones above; the model is a residual NNX MLP.
""",
  ),
  (
    "code",
    """\
def make_nnx_mlp(seed):
    r = nnx.Rngs(seed)
    return nnx.Sequential(
        nnx.Linear(16, 32, rngs=r), nnx.relu,
        nnx_bridge.Residual(nnx.Linear(32, 32, rngs=r), nnx.relu, nnx.Linear(32, 32, rngs=r)),
        nnx.Linear(32, K, rngs=r))

@nnx.jit
def nnx_train_step(model, optimizer, power, x, y, lam):
    def loss_fn(model):
        lip, new_power = liplt.liplt_bound(nnx_bridge.to_lipnet(model, (16,)), power,
                                           mode="pairwise", num_iters=2)
        mean_lip = jnp.sum(lip) / (K * (K - 1))
        return losses.cross_entropy(model(x), y) + lam * mean_lip, (new_power, mean_lip)
    (loss, (power, mean_lip)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)  # Adam on every nnx.Param
    return power, loss, mean_lip

nnx_history = {}
for lam in (0.0, 0.1):
    nnx_mlp = make_nnx_mlp(1)
    optimizer = nnx.Optimizer(nnx_mlp, optax.adam(1e-2), wrt=nnx.Param)
    power = liplt.init_state(nnx_bridge.to_lipnet(nnx_mlp, (16,)), jax.random.key(2))
    trace = []
    for _ in range(STEPS):
        power, loss, mean_lip = nnx_train_step(nnx_mlp, optimizer, power, x_train, y_train, lam)
        trace.append(float(mean_lip))
    logits = nnx_mlp(x_train)
    lip, _ = soundness.sound_bound(nnx_bridge.to_lipnet(nnx_mlp, (16,)))
    radii = certify.radii_of(logits, y_train, lip)
    nnx_history[lam] = trace
    print(f"lam = {lam}: train accuracy {float((logits.argmax(1) == y_train).mean()):.3f}, "
          f"mean pairwise bound {certify.mean_pairwise(lip):.3f} (sound), "
          f"mean certified radius {radii.mean():.3f}")

fig, ax = plt.subplots(figsize=(5.5, 3.3))
for lam, trace in nnx_history.items():
    ax.plot(trace, label=f"lam = {lam}")
ax.set_xlabel("step"); ax.set_ylabel("mean pairwise L_ij (NNX model, training estimate)"); ax.legend()
plt.show()
""",
  ),
]

# ----------------------------------------------------------------------------- importers

BYOM_FLAX = [
  (
    "md",
    """\
## A Flax CNN with BatchNorm, average pooling and Dropout

Most trained models were not trained to be Lipschitz, and many use BatchNorm, pooling and
Dropout. At evaluation these are of the eq. 17 form exactly: BatchNorm with its running
statistics is a per-channel affine map (`crmjax.layers.BatchNorm`, a diagonal operator
`gamma / sqrt(var + eps)`; its shift does not change a Lipschitz constant), average pooling a
fixed linear map (`crmjax.layers.AvgPool`, norm `1/k` for non-overlapping `k x k` windows),
Dropout the identity. Max pooling, LayerNorm and attention are not, and the converters say so.

The model below is a plain linen module trained with cross-entropy (BatchNorm on batch
statistics, Dropout on) on a subset of MNIST.
""",
  ),
  (
    "code",
    """\
import functools

import flax.linen as nn
import jax.numpy as jnp
import optax

from crmjax import attacks, linen_bridge, liplt, losses

class CNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(16, (3, 3), strides=2)(x)                     # 28x28x1 -> 14x14x16
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))                 # -> 7x7x16
        x = nn.Dropout(0.1, deterministic=not train)(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(64)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(x)
        return nn.Dense(10)(x)

N_TRAIN, CE_STEPS, CRM_STEPS, N_CERT = (512, 30, 20, 128) if TINY else (6000, 600, 600, 1000)
x_tr = train_x[:N_TRAIN].astype(np.float32) / 255.0
y_tr = train_y[:N_TRAIN]
cnn = CNN()
variables = jax.jit(cnn.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))  # one compiled program
ce_tx = optax.adam(1e-3)
ce_opt = ce_tx.init(variables["params"])

@jax.jit
def ce_step(variables, opt_state, x, y, key):
    def loss_fn(p):
        logits, new = cnn.apply({**variables, "params": p}, x, train=True,
                                mutable=["batch_stats"], rngs={"dropout": key})
        return losses.cross_entropy(logits, y), new
    (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    updates, opt_state = ce_tx.update(grads, opt_state, variables["params"])
    return {"params": optax.apply_updates(variables["params"], updates), **new}, opt_state, loss

batch_rng = np.random.default_rng(0)
t0 = time.time()
for step in range(CE_STEPS):
    idx = batch_rng.integers(0, N_TRAIN, 128)
    variables, ce_opt, loss = ce_step(variables, ce_opt, x_tr[idx], y_tr[idx], jax.random.key(step))
print(f"{CE_STEPS} cross-entropy steps on {N_TRAIN} images in {time.time() - t0:.0f} s, "
      f"last batch loss {float(loss):.3f}")
""",
  ),
  (
    "md",
    """\
### Convert it

A custom module's `__call__` cannot be read, so it is described once as the list of what it
does: `(path, layer)` for layers with variables (the names `model.init` gave them) and plain
functions for the rest. (An `nn.Sequential` needs no description:
`linen_bridge.to_model(seq, variables, shape)`.) The converted model computes the linen
model's evaluation-mode logits (`train=False`); that check is worth running once.
""",
  ),
  (
    "code",
    """\
steps = [
    ("Conv_0", nn.Conv(16, (3, 3), strides=2)),
    ("BatchNorm_0", nn.BatchNorm(use_running_average=True)),
    nn.relu,
    functools.partial(nn.avg_pool, window_shape=(2, 2), strides=(2, 2)),
    nn.Dropout(0.1),                       # the identity at evaluation: left out
    linen_bridge.Flatten(),
    ("Dense_0", nn.Dense(64)),
    ("BatchNorm_1", nn.BatchNorm(use_running_average=True)),
    nn.relu,
    ("Dense_1", nn.Dense(10)),
]
cnn_model, cnn_params = linen_bridge.to_model(steps, variables, (28, 28, 1))
for layer in cnn_model.layers:
    print(layer)
x = test_x[:16].astype(np.float32) / 255.0
diff = np.abs(np.asarray(cnn_model.apply(cnn_params, x)) - np.asarray(cnn.apply(variables, x))).max()
print(f"max |converted - linen| logit difference: {diff:.1e}")
assert diff < 1e-4
""",
  ),
  (
    "md",
    """\
### Certify it: naive vs LipLT, estimate vs guaranteed

`certify.certified_radii(model, params, images, labels)` is the one call: logits and a
guaranteed pairwise bound (`soundness.sound_bound`), both from the converted network. The
power-iteration estimate is what training uses; it can lie below the true constant, so it
is printed for comparison only. A model trained with cross-entropy alone has large Lipschitz
bounds, so its certified radii are small: that is the honest starting point.
""",
  ),
  (
    "code",
    """\
EPS = (0.1, 0.3, 0.5, 1.0)
cert_x, cert_y = test_x[:N_CERT], test_y[:N_CERT]

estimate = jax.jit(lambda net, power: liplt.lipschitz_bound(net, power, num_iters=100)[0])

def certify_table(params, title):
    print(title)
    net = cnn_model.lipnet(params)
    est = estimate(net, liplt.init_state(net, jax.random.key(0)))
    print(f"  LipLT power-iteration estimate (not guaranteed): mean L_ij {certify.mean_pairwise(est):.2f}")
    out = {}
    for method in ("naive", "liplt"):
        radii, lip, info = certify.certified_radii(cnn_model, params, cert_x, cert_y, method=method)
        clean = (info["logits"].argmax(1) == cert_y).mean()
        accs = ", ".join(f"{e}: {certify.certified_accuracy(radii, e):.3f}" for e in EPS)
        print(f"  {method:5s} sound: mean L_ij {certify.mean_pairwise(lip):7.2f}, clean {clean:.3f}, "
              f"median radius {np.median(radii):.3f}, certified accuracy at eps {{{accs}}}")
        out[method] = radii
    return out

before = certify_table(cnn_params, f"cross-entropy model, {N_CERT} test images:")
""",
  ),
  (
    "md",
    """\
A certificate is a promise about every perturbation in the ball: l2 PGD (multi-targeted,
restarts) on the linen model itself, at 0.999 times each point's certified radius, must find
nothing.
""",
  ),
  (
    "code",
    """\
n_att = 64 if TINY else 256
radii = before["liplt"][:n_att]
keep = radii > 0
xa = cert_x[:n_att][keep].astype(np.float32) / 255.0
ya = cert_y[:n_att][keep]
linen_logits = lambda u: cnn.apply(variables, u)  # train=False: the evaluation-mode network
res = attacks.pgd_l2(linen_logits, xa, ya, key=jax.random.key(1), eps=0.999 * radii[keep],
                     num_steps=10 if TINY else 50, num_restarts=1 if TINY else 3, loss="multitarget")
attacks.raise_on_violation(np.ones(len(ya), bool), np.asarray(res.success))
print(f"PGD broke none of the {len(ya)} certified points inside their radii")
""",
  ),
  (
    "md",
    """\
### Fine-tune with CRM from those weights

The converted model is an ordinary crmjax model: the CRM loss (paper eq. 8: cross-entropy
plus a penalty on small soft certified radii, with the pairwise LipLT bound from warm-started
power iteration) trains it further. The BatchNorm layers are now fixed affine maps whose scale
and bias train like any other parameter (the bound sees them); no batch statistics remain.
""",
  ),
  (
    "code",
    """\
crm_tx = optax.adam(1e-3)
crm_opt = crm_tx.init(cnn_params)
power = liplt.init_state(cnn_model.lipnet(cnn_params), jax.random.key(2))

@jax.jit
def crm_step(params, opt_state, power, x, y):
    def loss_fn(p, power):
        lip, power = liplt.liplt_bound(cnn_model.lipnet(p), power, mode="pairwise", num_iters=2)
        loss, aux = losses.crm_loss(cnn_model.apply(p, x), y, lip, lam=30.0, temperature=5.0, r0=2.2)
        return loss, (aux, power)
    (loss, (aux, power)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, power)
    updates, opt_state = crm_tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, power, aux

tuned = cnn_params
t0 = time.time()
for step in range(CRM_STEPS):
    idx = batch_rng.integers(0, N_TRAIN, 128)
    tuned, crm_opt, power, aux = crm_step(tuned, crm_opt, power, x_tr[idx], y_tr[idx])
print(f"{CRM_STEPS} CRM steps in {time.time() - t0:.0f} s")
after = certify_table(tuned, "after CRM fine-tuning:")

fig, ax = plt.subplots(figsize=(5.5, 3.3))
grid = np.linspace(0, 1.2, 121)
for name, r in (("cross-entropy", before["liplt"]), ("+ CRM fine-tuning", after["liplt"])):
    ax.plot(grid, certify.certified_accuracy(r, grid), label=name)
ax.set_xlabel("eps (l2, [0, 1] pixels)"); ax.set_ylabel("certified accuracy (LipLT, sound)"); ax.legend()
plt.show()
""",
  ),
  (
    "md",
    """\
### The same call for NNX and PyTorch models

```python
from crmjax import certify, importers, nnx_bridge
from crmjax import layers as L

# Flax NNX: an nnx.Sequential with nnx.BatchNorm, functools.partial(nnx.avg_pool, ...), nnx.Dropout
model.eval()                                        # BatchNorm on its running statistics
radii, bound, info = certify.certified_radii(*nnx_bridge.to_model(model, (28, 28, 1)), images, labels)

# PyTorch: an nn.Sequential of Conv2d, BatchNorm2d, ReLU, AvgPool2d, Dropout, Flatten, Linear ...
model, params = importers.import_torch_module(torch_model, input_shape=(28, 28, 1))
radii, bound, info = certify.certified_radii(model, params, images, labels)
# ... or a saved state dict plus the architecture as crmjax layer specs
layers = (L.Conv(16, 3, stride=1, padding=1), L.BatchNorm(), L.Act(), L.AvgPool(2), L.Dropout(),
          L.Flatten(), L.Dense(10))
model, params = importers.import_torch_sequential(importers.load_state_dict("model.pth"),
                                                  input_shape=(28, 28, 1), layers=layers)
radii, bound, info = certify.certified_radii(model, params, images, labels)
```
""",
  ),
]

BYOM = [
  (
    "md",
    """\
# Bring your own model: import PyTorch weights or a Flax model, check them, certify them

Two parts:

1. `crmjax.importers.import_torch_sequential` turns the `state_dict` of a sequential PyTorch
   conv/linear network into a crmjax `Model` and params. A state dict is just a mapping of
   names to arrays, so this notebook builds one in numpy (no torch needed) in PyTorch's
   layouts: conv weights `(O, I, kh, kw)`, linear weights `(O, I)`, and a flatten in
   `(C, H, W)` order. With torch installed, `crmjax.importers.load_state_dict("model.pth")`
   reads a saved `model.state_dict()` (and `.npz` files without torch).
2. An ordinary Flax linen CNN with BatchNorm, average pooling and Dropout, trained with plain
   cross-entropy, converted with `crmjax.linen_bridge`, certified (naive vs LipLT, estimate
   vs guaranteed bound), and then fine-tuned with the CRM loss from those weights.
""",
  ),
  ("code", INSTALL),
  (
    "code",
    """\
import os, tempfile, time

import jax
import matplotlib.pyplot as plt
import numpy as np

from crmjax import certify, data, importers, soundness
from crmjax import layers as L

"""
    + QUICK_SWITCH,
  ),
  (
    "md",
    """\
## A "PyTorch" model in numpy

The network is

```python
nn.Sequential(nn.Conv2d(1, 8, 3, stride=1, padding=1), nn.ReLU(),
              nn.Conv2d(8, 16, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
              nn.Linear(16 * 14 * 14, 256), nn.ReLU(), nn.Linear(256, 10))
```

so its state dict has keys `0.*`, `2.*`, `5.*`, `7.*`. To get a model worth certifying without
any training loop, the first three layers are random and the last one is fitted by ridge
regression on MNIST (a random-features classifier), with a plain numpy forward pass that
follows PyTorch's conventions (NCHW, `(C, H, W)` flatten).
""",
  ),
  (
    "code",
    '''\
rng = np.random.default_rng(0)

def he(shape, fan_in):
    return (rng.normal(size=shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

sd = {
    "0.weight": he((8, 1, 3, 3), 9), "0.bias": np.zeros(8, np.float32),
    "2.weight": he((16, 8, 4, 4), 128), "2.bias": np.zeros(16, np.float32),
    "5.weight": he((256, 16 * 14 * 14), 16 * 14 * 14), "5.bias": np.zeros(256, np.float32),
    "7.weight": np.zeros((10, 256), np.float32), "7.bias": np.zeros(10, np.float32),
}

def conv2d(x, w, b, stride, padding):
    """PyTorch's Conv2d on NCHW input with OIHW weights."""
    x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    k = w.shape[-1]
    win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    return np.einsum("nchwij,ocij->nohw", win, w, optimize=True) + b[None, :, None, None]

def torch_forward(sd, x_nchw, features=False, chunk=256):
    """The network above in numpy; `features=True` stops before the last linear layer."""
    relu = lambda a: np.maximum(a, 0)
    outs = []
    for i in range(0, len(x_nchw), chunk):
        h = relu(conv2d(x_nchw[i:i + chunk], sd["0.weight"], sd["0.bias"], 1, 1))
        h = relu(conv2d(h, sd["2.weight"], sd["2.bias"], 2, 1))
        h = h.reshape(len(h), -1)  # nn.Flatten: (C, H, W) order
        h = relu(h @ sd["5.weight"].T + sd["5.bias"])
        outs.append(h if features else h @ sd["7.weight"].T + sd["7.bias"])
    return np.concatenate(outs)

train_x, train_y = data.load_split("mnist", "train")  # uint8 NHWC; the vendored copy
test_x, test_y = data.load_split("mnist", "test")
n_fit = 1000 if SMALL else 10000
to_nchw = lambda imgs: (imgs.astype(np.float32) / 255.0).transpose(0, 3, 1, 2)

feats = torch_forward(sd, to_nchw(train_x[:n_fit]), features=True)
h = np.concatenate([feats, np.ones((n_fit, 1), np.float32)], axis=1)
targets = np.eye(10, dtype=np.float32)[train_y[:n_fit]]
w = np.linalg.solve(h.T @ h + 1.0 * np.eye(h.shape[1]), h.T @ targets)  # ridge regression
sd["7.weight"], sd["7.bias"] = w[:-1].T.astype(np.float32), w[-1].astype(np.float32)
print({k: v.shape for k, v in sd.items()})
''',
  ),
  (
    "md",
    """\
## Import it

Strides and paddings are not stored in a state dict, so the architecture is given as crmjax
layer specs. The importer checks every array's shape against them, transposes conv kernels to
HWIO and linear weights to `(I, O)`, and permutes the rows of the first linear layer after
the flatten from PyTorch's `(C, H, W)` order to crmjax's `(H, W, C)` order.
""",
  ),
  (
    "code",
    """\
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "model.npz")
    np.savez(path, **sd)                      # what you would do once where torch is installed
    loaded = importers.load_state_dict(path)  # or importers.load_state_dict("model.pth") with torch

layers = (L.Conv(8, 3, stride=1, padding=1), L.Act(),
          L.Conv(16, 4, stride=2, padding=1), L.Act(), L.Flatten(),
          L.Dense(256), L.Act(), L.Dense(10))
model, params = importers.import_torch_sequential(loaded, input_shape=(28, 28, 1), layers=layers)
print(model.name, model.input_shape, model.num_classes)
print(jax.tree.map(lambda a: a.shape, params))
""",
  ),
  (
    "code",
    """\
x = test_x[:16]
ours = np.asarray(model.apply(params, x.astype(np.float32) / 255.0))   # NHWC
ref = torch_forward(sd, to_nchw(x))                                    # NCHW, PyTorch conventions
err = np.abs(ours - ref).max() / np.abs(ref).max()
print(f"max relative logit difference: {err:.2e}")
assert err < 1e-4
""",
  ),
  (
    "md",
    """\
## Certify it

The imported model is an ordinary crmjax model: `model.lipnet(params)` is its eq. 17 form,
`sound_bound` gives guaranteed pairwise bounds, `certify.radii_of` the certified radii. A
random-features network was not trained for robustness, so its radii are small; fine-tune it
with the CRM loss (`crmjax.train_step.make_train_step` accepts any `Model`) to grow them.
""",
  ),
  (
    "code",
    """\
n_test = 200 if SMALL else 2000
images, labels = test_x[:n_test], test_y[:n_test]
logits = certify.batched_logits(model, params, images, batch_size=500)
net = model.lipnet(params)
radii = {}
for method in ("naive", "liplt"):
    lip, info = soundness.sound_bound(net, method=method, num_iters=500)
    radii[method] = certify.radii_of(logits, labels, lip)
    print(f"{method:6s} mean pairwise bound {certify.mean_pairwise(lip):9.3f}  ({info['kind']})")
print(f"clean accuracy {(logits.argmax(1) == labels).mean():.3f} on {n_test} test images")
print(f"median certified radius (LipLT): {np.median(radii['liplt']):.4f}")
for eps in (0.005, 0.01, 0.02):
    print(f"certified accuracy at eps = {eps}: naive {certify.certified_accuracy(radii['naive'], eps):.3f}, "
          f"LipLT {certify.certified_accuracy(radii['liplt'], eps):.3f}")
""",
  ),
  (
    "code",
    """\
preds = logits.argmax(1)
fig, axes = plt.subplots(1, 8, figsize=(13, 2.2))
for ax, i in zip(axes, range(8)):
    ax.imshow(images[i, ..., 0], cmap="gray")
    ax.set_title(f"label {labels[i]}, pred {preds[i]}\\nradius {radii['liplt'][i]:.3f}", fontsize=8)
    ax.axis("off")
plt.show()
""",
  ),
] + BYOM_FLAX

NOTEBOOKS = {
  "quickstart.ipynb": QUICKSTART,
  "lipschitz_bounds.ipynb": BOUNDS,
  "bring_your_own_model.ipynb": BYOM,
}


def make(cells) -> nbformat.NotebookNode:
  nb = v4.new_notebook()
  nb.metadata = {
    "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
    "language_info": {"name": "python"},
    "accelerator": "GPU",  # Colab: ask for a GPU runtime
  }
  nb.cells = [
    v4.new_markdown_cell(src) if kind == "md" else v4.new_code_cell(src) for kind, src in cells
  ]
  for i, cell in enumerate(nb.cells):
    cell.id = f"cell-{i}"  # stable ids: rebuilding gives the same files
  nbformat.validate(nb)
  return nb


def main():
  for name, cells in NOTEBOOKS.items():
    nbformat.write(make(cells), HERE / name)
    print("wrote", HERE / name)


if __name__ == "__main__":
  main()
