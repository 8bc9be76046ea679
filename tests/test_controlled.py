"""Proposition 3.1 layers: sqrt(rho)-Lipschitz by construction, and their LMI holds."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crmjax import controlled as C
from crmjax import layers as L
from crmjax import liplt, models, network, train_state, train_step
from crmjax import operators as ops
from experiments.configs import mnist
from tests import reference as ref

RHOS = (0.5, 1.0, 2.0)
TOL = 1 + 1e-5


def _init(module, shape, seed, scale, dtype=jnp.float64):
  p = module.init(jax.random.key(seed), jnp.zeros((1, *shape)))["params"]
  keys = iter(jax.random.split(jax.random.key(seed + 100), 8))

  def perturb(path, a):
    name = jax.tree_util.keystr(path)
    if "kernel" in name:
      return (a * scale).astype(dtype)
    return jax.random.normal(next(keys), a.shape, dtype) * 0.5  # bias, log_q: nonzero

  return jax.tree_util.tree_map_with_path(perturb, p)


def _empirical(module, p, shape, seed, n_jac=48, n_pairs=256):
  """(max ||J(x)||_2 over random x, max ||h(x)-h(y)|| / ||x-y|| over random pairs)."""
  f = lambda x: module.apply({"params": p}, x)
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  jmax = 0.0
  if n_jac:
    xs = jax.random.normal(k1, (n_jac, *shape), jnp.float64) * 2.0
    jac = jax.vmap(jax.jacrev(lambda x: f(x[None])[0]))(xs)
    jac = np.asarray(jac).reshape(n_jac, int(np.prod(shape)), -1)
    jmax = float(np.max(np.linalg.norm(jac, 2, axis=(1, 2))))
  x = jax.random.normal(k2, (n_pairs, *shape), jnp.float64) * 2.0
  # near pairs (local slopes) and far pairs
  d = jax.random.normal(k3, (n_pairs, *shape), jnp.float64)
  d = d * jnp.where(jnp.arange(n_pairs) % 2 == 0, 1e-3, 1.0).reshape(-1, *([1] * len(shape)))
  num = np.linalg.norm(np.asarray(f(x) - f(x + d)).reshape(n_pairs, -1), axis=1)
  den = np.linalg.norm(np.asarray(d).reshape(n_pairs, -1), axis=1)
  return jmax, float(np.max(num / den))


@pytest.mark.parametrize("rho", RHOS)
@pytest.mark.parametrize("rescaling", C.RESCALINGS)
def test_dense_is_sqrt_rho_lipschitz(rho, rescaling):
  with jax.enable_x64(True):
    for seed, (scale, act) in enumerate(
      [
        (0.1, L.Act()),
        (1.0, L.Act()),
        (10.0, L.Act()),
        (1.0, L.Act("tanh")),
        (3.0, L.Act("leaky_relu", 0.3)),
      ]
    ):
      module = C.ControlledDense(7, rho=rho, act=act, rescaling=rescaling)
      p = _init(module, (5,), seed, scale)
      jmax, pmax = _empirical(module, p, (5,), seed)
      assert jmax <= np.sqrt(rho) * TOL, (scale, act.name, jmax)
      assert pmax <= np.sqrt(rho) * TOL, (scale, act.name, pmax)
      assert jmax >= 0.3 * np.sqrt(rho)  # sanity: the layer is not trivially contractive


@pytest.mark.parametrize("rho", RHOS)
@pytest.mark.parametrize("stride", [1, 2])
def test_conv_is_sqrt_rho_lipschitz(rho, stride):
  with jax.enable_x64(True):
    for seed, (scale, rescaling) in enumerate([(0.2, "sll"), (5.0, "aol")]):
      module = C.ControlledConv(3, kernel_size=3, stride=stride, rho=rho, rescaling=rescaling)
      p = _init(module, (5, 4, 2), seed, scale)
      n_jac = 8 if stride == 1 and rho == 1.0 else 0  # jacrev of a conv: slow to trace
      jmax, pmax = _empirical(module, p, (5, 4, 2), seed, n_jac=n_jac, n_pairs=256)
      assert jmax <= np.sqrt(rho) * TOL, (scale, jmax)
      # The exact Jacobian sqrt(rho) I - c/sqrt(rho) W^T T diag(phi'(W x + b)) W from the
      # explicit convolution matrix, at many points: its norm is <= sqrt(rho).
      W, _ = ref.conv_matrix(np.asarray(p["kernel"]), (5, 4, 2), stride, 1)
      t = np.asarray(
        C.conv_scaling(
          p["kernel"],
          (5, 4, 2),
          stride=stride,
          padding=1,
          rho=rho,
          q=jnp.exp(p["log_q"]) if "log_q" in p else None,
        )
      )
      b = np.broadcast_to(np.asarray(p["bias"]), t.shape).ravel()
      xs = np.random.default_rng(seed).normal(size=(64, W.shape[1])) * 2.0
      for x in xs:
        lam = (W @ x + b > 0).astype(np.float64)
        D = (t.ravel() * lam)[:, None]
        J = np.sqrt(rho) * np.eye(W.shape[1]) - W.T @ (D * W) / np.sqrt(rho)
        assert np.linalg.norm(J, 2) <= np.sqrt(rho) * TOL
      assert pmax <= np.sqrt(rho) * TOL, (scale, pmax)


@pytest.mark.parametrize("rho", RHOS)
def test_dense_lmi_holds(rho):
  with jax.enable_x64(True):
    for seed, scale in enumerate([0.1, 1.0, 10.0]):
      kernel = scale * jax.random.normal(jax.random.key(seed), (6, 9), jnp.float64)
      q = jnp.exp(jax.random.normal(jax.random.key(seed + 1), (9,), jnp.float64))
      for alpha, beta in [(0.0, 1.0), (0.1, 1.0), (0.0, 0.25)]:
        for qq in (None, q):
          t = np.asarray(C.dense_scaling(kernel, rho=rho, alpha=alpha, beta=beta, q=qq))
          assert np.all(t > 0)
          W = np.asarray(kernel).T
          lmi = np.diag(2 * rho / (alpha + beta) ** 2 / t) - W @ W.T
          assert np.linalg.eigvalsh(lmi).min() >= -1e-6 * max(1.0, scale**2)


@pytest.mark.parametrize("stride,pad", [(1, 1), (2, 1), (1, 0)])
def test_conv_lmi_holds_on_explicit_matrix(stride, pad):
  with jax.enable_x64(True):
    in_shape = (5, 4, 2)
    for seed in range(3):
      kernel = jax.random.normal(jax.random.key(seed), (3, 3, 2, 3), jnp.float64)
      q = jnp.exp(jax.random.normal(jax.random.key(seed + 1), (3,), jnp.float64))
      for qq in (None, q):
        t = C.conv_scaling(kernel, in_shape, stride=stride, padding=pad, rho=2.0, q=qq)
        W, out_shape = ref.conv_matrix(np.asarray(kernel), in_shape, stride, pad)
        assert t.shape == out_shape
        lmi = np.diag(2 * 2.0 / np.asarray(t).ravel()) - W @ W.T
        assert np.linalg.eigvalsh(lmi).min() >= -1e-6


def test_transpose_is_the_adjoint():
  with jax.enable_x64(True):
    kernel = jax.random.normal(jax.random.key(0), (3, 3, 2, 3), jnp.float64)
    op = C.conv_operator(kernel, (5, 4, 2), stride=2, padding=1)
    x = jax.random.normal(jax.random.key(1), (3, 5, 4, 2), jnp.float64)
    y = jax.random.normal(jax.random.key(2), (3, *op.out_shape), jnp.float64)
    np.testing.assert_allclose(jnp.sum(op(x) * y), jnp.sum(x * C.transpose(op)(y)), rtol=1e-10)
    conv = C.ControlledConv(3, rho=0.5)
    y = conv.apply(conv.init(jax.random.key(2), x), x)
    assert y.shape == x.shape


def test_float32_and_errors():
  module = C.ControlledDense(7, rho=1.0, rescaling="sll")
  x = jax.random.normal(jax.random.key(0), (32, 5))
  p = module.init(jax.random.key(1), x)["params"]
  assert set(p) == {"kernel", "bias", "log_q"}
  y = module.apply({"params": p}, x)
  ratio = np.linalg.norm(np.asarray(y[1:] - y[:-1]), axis=1) / np.linalg.norm(
    np.asarray(x[1:] - x[:-1]), axis=1
  )
  assert y.dtype == jnp.float32 and ratio.max() <= TOL
  with pytest.raises(ValueError, match="0 <= alpha"):
    C.ControlledDense(4, act=L.Act("custom", fn=jnp.tanh, slopes=(-0.5, 1.0))).init(
      jax.random.key(0), jnp.zeros((1, 3))
    )
  with pytest.raises(ValueError, match="rescaling"):
    C.ControlledDense(4, rescaling="bjorck").init(jax.random.key(0), jnp.zeros((1, 3)))


# ------------------------------------------------- the adjoint operator and LipNet blocks


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_adjoint_is_the_dense_transpose(kind):
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    if kind == "dense":
      kernel = rng.normal(size=(6, 4))
      op, M = ops.Dense(jnp.asarray(kernel)), kernel.T
    else:  # strided, padded, non-square input
      kernel = rng.normal(size=(3, 3, 2, 3))
      op = ops.Conv(jnp.asarray(kernel), (5, 4, 2), (2, 2), ((1, 1), (1, 1)))
      M, out_shape = ref.conv_matrix(kernel, (5, 4, 2), 2, 1)
      assert out_shape == op.out_shape
    adj = ops.Adjoint(op)
    assert adj.in_shape == op.out_shape and adj.out_shape == op.in_shape
    y = rng.normal(size=(2, 3, *op.out_shape))  # two leading batch axes
    want = y.reshape(6, -1) @ M
    got = np.asarray(adj(jnp.asarray(y))).reshape(6, -1)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    got = np.asarray(adj.abs()(jnp.asarray(y))).reshape(6, -1)
    np.testing.assert_allclose(got, y.reshape(6, -1) @ np.abs(M), rtol=1e-12, atol=1e-12)
    # a pytree: the kernel is its only leaf, and it goes through jit
    assert len(jax.tree.leaves(adj)) == 1
    twice = jax.jit(lambda a, v: a(v))(adj, jnp.asarray(y))
    np.testing.assert_allclose(np.asarray(twice).reshape(6, -1), want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="trailing shape"):
      adj(jnp.zeros((2, *op.in_shape, 7)))


def _spec_params(layers, shape, seed, log_q_scale=0.5, dtype=np.float64):
  """Params of ``Sequential(layers)`` (Flax's names and shapes) from numpy (no threefry to
  compile): kernels ``N(0, 1 / fan_in)``, zero biases (LipNet is the bias-free network),
  ``log_q`` nonzero."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(
    lambda: L.Sequential(layers).init(jax.random.key(0), jnp.zeros((1, *shape)))["params"]
  )

  def fill(path, a):
    name = jax.tree_util.keystr(path)
    if "kernel" in name:
      return rng.normal(size=a.shape) / np.sqrt(np.prod(a.shape[:-1]))
    if "log_q" in name:
      return log_q_scale * rng.normal(size=a.shape)
    return np.zeros(a.shape)

  return jax.tree.map(
    lambda a: jnp.asarray(a.astype(dtype)), jax.tree_util.tree_map_with_path(fill, shapes)
  )


CTRL_NETS = {
  # a lone block (readout: flatten) per kind; m < n, so its exact constant is sqrt(rho)
  "dense": (
    (6,),
    lambda rho, r, act: (C.Controlled("dense", 4, rho=rho, act=act, rescaling=r), L.Flatten()),
  ),
  "conv": (
    (5, 4, 3),
    lambda rho, r, act: (C.Controlled("conv", 2, rho=rho, act=act, rescaling=r), L.Flatten()),
  ),
  "conv_s2": (
    (5, 4, 3),
    lambda rho, r, act: (
      C.Controlled("conv", 2, stride=2, rho=rho, act=act, rescaling=r),
      L.Flatten(),
    ),
  ),
  # pending linear layers before a block (H = sqrt(rho) P), blocks of every kind, readout
  "stack": (
    (6, 6, 1),
    lambda rho, r, act: (
      L.Conv(3, 3, 1, 1),
      C.Controlled("conv", 4, rho=rho, act=act, rescaling=r),
      C.Controlled("conv", 3, stride=2, padding=0, rho=rho, act=act, rescaling=r),
      act,
      L.Flatten(),
      L.Dense(8),
      act,
      C.Controlled("dense", 5, rho=rho, act=act, rescaling=r),
      L.Dense(4),
    ),
  ),
}


@pytest.mark.parametrize("name", sorted(CTRL_NETS))
@pytest.mark.parametrize(
  "rho,rescaling,act",
  [(1.0, "aol", L.Act()), (0.5, "sll", L.Act("leaky_relu", 0.2)), (2.0, "sll", L.Act())],
)
def test_lipnet_block_reproduces_the_flax_layer(name, rho, rescaling, act):
  """from_layers' blocks (H = sqrt(rho) I, G = -c/sqrt(rho) W^T T) run the Flax forward."""
  with jax.enable_x64(True):
    shape, make = CTRL_NETS[name]
    layers = make(rho, rescaling, act)
    p = _spec_params(layers, shape, seed=3)
    assert all(k.startswith("layer_") for k in p)
    x = jax.random.normal(jax.random.key(4), (9, *shape), jnp.float64)
    net = network.from_layers(layers, p, shape)
    assert len(net.blocks) == sum(isinstance(l, (C.Controlled, L.Act)) for l in layers)
    both = jax.jit(
      lambda p, x: (
        L.Sequential(layers).apply({"params": p}, x),
        network.from_layers(layers, p, shape)(x),
      )
    )
    want, got = both(p, x)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def _power_state(net, dtype=np.float32, seed=0):
  """Random start vectors of ``liplt.init_state``'s shapes, from numpy (its threefry is slow
  to compile on this CPU)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda a: jnp.asarray(rng.normal(size=a.shape).astype(dtype)),
    jax.eval_shape(liplt.init_state, net, jax.random.key(0)),
  )


def _bounds(net, mode, num_iters, dtype=np.float64):
  """crmjax's (LipLT, naive) bounds with ``num_iters`` power iterations in ``dtype``."""
  fn = lambda net, state: tuple(
    liplt.lipschitz_bound(net, state, method=m, mode=mode, num_iters=num_iters)[0]
    for m in ("liplt", "naive")
  )
  return jax.jit(fn)(net, _power_state(net, dtype))


def _exact_liplt(layers, p, shape, mode):
  blocks, R = ref.blocks_of(layers, jax.tree.map(np.asarray, p), shape)
  return (ref.liplt_reference(blocks, R, mode=mode)[0], ref.naive_reference(blocks, R, mode=mode))


@pytest.mark.parametrize("name", ["dense", "conv", "conv_s2"])
@pytest.mark.parametrize("rho,rescaling", [(1.0, "aol"), (2.0, "sll")])
def test_single_block_liplt_is_sound_and_above_sqrt_rho(name, rho, rescaling):
  """One Proposition 3.1 block: LipLT (crmjax == float64 reference) >= sqrt(rho), which is
  the block's exact constant here (W has a null space, so J = sqrt(rho) I on it), >= the
  brute-force lower bound; and LipLT <= naive (single block, alpha >= 0)."""
  with jax.enable_x64(True):
    shape, make = CTRL_NETS[name]
    layers = make(rho, rescaling, L.Act())
    p = _spec_params(layers, shape, seed=5)
    net = network.from_layers(layers, p, shape)
    lt, nv = _bounds(net, "global", 300)
    lt_ref, nv_ref = _exact_liplt(layers, p, shape, "global")
    assert lt <= lt_ref * (1 + 1e-6) and nv <= nv_ref * (1 + 1e-6)  # power iteration
    np.testing.assert_allclose([lt, nv], [lt_ref, nv_ref], rtol=2e-3)
    jmax, pmax = _empirical(layers[0].module(), p["layer_0"], shape, seed=5, n_jac=16)
    s = np.sqrt(rho)
    assert max(jmax, pmax) <= s * TOL
    assert jmax >= s * (1 - 1e-9)  # the exact constant is sqrt(rho)
    assert lt_ref >= s * (1 - 1e-9) and lt_ref <= nv_ref * TOL
    print(
      f"{name} rho={rho} {rescaling}: exact {jmax:.4f} = sqrt(rho), LipLT {lt_ref:.4f} "
      f"({lt_ref / s:.3f} sqrt(rho)), naive {nv_ref:.4f} ({nv_ref / s:.3f} sqrt(rho))"
    )


def _matrices(net):
  """Per block, the float64 ``(out, in)`` matrices of W, G, H (``None`` stays ``None``)."""

  def matrix(op, in_shape):
    if op is None:
      return None
    n = int(np.prod(in_shape))
    return op(jnp.eye(n, dtype=jnp.float64).reshape(n, *in_shape)).reshape(n, -1).T

  fn = lambda net: [
    (matrix(b.W, b.W.in_shape), matrix(b.G, b.phi_shape), matrix(b.H, b.W.in_shape))
    for b in net.blocks
  ]
  return jax.tree.map(np.asarray, jax.jit(fn)(net))


def test_stack_blocks_and_bounds_match_float64_reference():
  """from_layers' W, G, H (pending layers folded in, every kind, SLL, rho != 1) equal the
  explicit-matrix reference; pairwise LipLT and naive converge to the exact-norm values."""
  with jax.enable_x64(True):
    shape, make = CTRL_NETS["stack"]
    layers = make(2.0, "sll", L.Act("leaky_relu", 0.1))
    p = _spec_params(layers, shape, seed=7)
    net = network.from_layers(layers, p, shape)
    blocks, R = ref.blocks_of(layers, jax.tree.map(np.asarray, p), shape)
    assert len(net.blocks) == len(blocks) == 5
    for b, got, (*want, alpha, beta) in zip(net.blocks, _matrices(net), blocks):
      assert (b.alpha, b.beta) == (alpha, beta)
      for g, w in zip(got, want):  # W, G, H
        if w is None:
          assert g is None
        else:
          np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)
    lt, nv = _bounds(net, "pairwise", 300)
    lt_ref, nv_ref = _exact_liplt(layers, p, shape, "pairwise")
    for got, want in ((lt, lt_ref), (nv, nv_ref)):  # power iteration: from below
      assert np.all(np.asarray(got) <= want * (1 + 1e-6) + 1e-12)
      np.testing.assert_allclose(got, want, rtol=2e-3)


# ------------------------------------------------------ the registered CtrlConv model


def _jacobian_pairs(model, p, xs):
  """max over points of ``||(e_i - e_j)^T J(x)||_2`` (float64): lower bounds of ``L_ij``."""
  jac = jax.jit(jax.vmap(jax.jacrev(lambda x: model.apply(p, x[None])[0])))(xs)
  J = np.asarray(jac).reshape(len(xs), model.num_classes, -1)
  diff = J[:, :, None, :] - J[:, None, :, :]
  return np.max(np.linalg.norm(diff, axis=-1), axis=0)


def test_ctrlconv_bounds_are_sound_and_lipnet_is_the_model():
  """The registered CtrlConv (28x28x1): LipNet(x) == model.apply (zero biases); pairwise
  LipLT and naive (float32, as in training) >= float64 Jacobian lower bounds; LipLT is the
  tighter of the two."""
  model = models.get_model("CtrlConv", input_shape=(28, 28, 1), num_classes=10)
  with jax.enable_x64(True):
    p = _spec_params(model.layers, model.input_shape, seed=11)
    kinds = [type(l).__name__ for l in model.layers if isinstance(l, (L.Act, C.Controlled))]
    assert len(model.lipnet(p).blocks) == len(kinds) == 7 and kinds.count("Controlled") == 4
    xs = jnp.asarray(np.random.default_rng(0).random((4, *model.input_shape)))
    both = jax.jit(lambda p, x: (model.apply(p, x), model.lipnet(p)(x)))
    np.testing.assert_allclose(*both(p, xs), rtol=1e-10, atol=1e-12)
    lower = _jacobian_pairs(model, p, xs)
  net32 = model.lipnet(_spec_params(model.layers, model.input_shape, 11, dtype=np.float32))
  lt, nv = (np.asarray(b) for b in _bounds(net32, "pairwise", 3, np.float32))
  off = ~np.eye(10, dtype=bool)
  assert np.all(lt[off] >= lower[off]) and np.all(nv[off] >= lower[off])
  assert np.all(lt[off] <= nv[off])
  print(
    f"CtrlConv mean pairwise: LipLT {lt[off].mean():.3f}, naive {nv[off].mean():.3f}, "
    f"Jacobian lower bound {lower[off].mean():.3f}"
  )


def _small_ctrlconv():
  """CtrlConv's layer structure (4 controlled layers, SLL), narrow: quick to compile."""
  return models.get_model(
    "CtrlConv", input_shape=(28, 28, 1), num_classes=10, width=4, dense=16, rescaling="sll"
  )


def test_ctrlconv_crm_train_step_runs_under_jit():
  """A CRM step (LipLT pairwise bound, warm-started power iteration) traces once, stays
  finite, and moves every controlled layer's params (log_q included)."""
  config = mnist.get_config("smoke")
  config.model, config.crm.warmup_epochs, config.train_iters = "CtrlConv", 0, 1
  model = _small_ctrlconv()
  tx = train_state.make_optimizer(config, 100)
  params = _spec_params(model.layers, model.input_shape, 0, dtype=np.float32)
  state = train_state.TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    power=_power_state(model.lipnet(params)),
    key=jax.random.key_data(jax.random.key(0)),
  )
  before = jax.tree.map(np.array, params)  # the step donates the state's buffers
  rep, bat = train_state.make_mesh(jax.devices()[:1])
  state = jax.device_put(state, rep)
  fn = chex.assert_max_traces(
    train_step.make_train_step(model, tx, config, regularized=True, steps_per_epoch=10), n=1
  )
  step = train_step.jit_step(fn, rep, bat)
  rng = np.random.default_rng(0)
  for _ in range(3):
    x = jnp.asarray(rng.random((16, 28, 28, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 16), jnp.int32)
    state, m = step(state, x, y)
    assert all(np.isfinite(float(v)) for v in m.values()), m
  assert float(m["lip"]) > 0 and int(state.step) == 3
  for i, layer in enumerate(model.layers):
    if isinstance(layer, C.Controlled):
      for name in ("kernel", "log_q"):
        assert not np.allclose(state.params[f"layer_{i}"][name], before[f"layer_{i}"][name])


@pytest.mark.optimized  # 50 power iterations per call: 72 CPU-s unoptimised, 23 optimised
def test_ctrlconv_liplt_bound_is_differentiable():
  """d(mean pairwise LipLT)/d(params): finite, nonzero in every controlled kernel and log_q
  (T is not stop-gradient-ed), and a small step against it lowers the bound."""
  model = _small_ctrlconv()
  params = _spec_params(model.layers, model.input_shape, 1, dtype=np.float32)
  power = _power_state(model.lipnet(params))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def value_and_grad(params, power):
    def mean_bound(params):
      lip, power_ = liplt.liplt_bound(model.lipnet(params), power, num_iters=50)
      return jnp.mean(lip), power_

    return jax.value_and_grad(mean_bound, has_aux=True)(params)

  (_, power), _ = value_and_grad(params, power)  # warm start: near-converged vectors
  (value, _), grads = value_and_grad(params, power)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  for i, layer in enumerate(model.layers):
    if isinstance(layer, C.Controlled):
      for name in ("kernel", "log_q"):
        assert np.abs(grads[f"layer_{i}"][name]).max() > 0, (i, name)
  norm = np.sqrt(sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(grads)))
  moved = jax.tree.map(lambda p, g: p - 1e-2 / norm * g, params, grads)
  (lower, _), _ = value_and_grad(moved, power)
  assert float(lower) < float(value)


def test_controlled_spec_errors():
  for bad, match in [
    (dict(kind="conv1d"), "kind"),
    (dict(rescaling="bjorck"), "rescaling"),
    (dict(rho=0.0), "rho"),
    (dict(act=L.Act("leaky_relu", -0.5)), "0 <= alpha"),
  ]:
    with pytest.raises(ValueError, match=match):
      C.Controlled(**{"kind": "dense", "features": 3, **bad})
  p = {"layer_0": {"kernel": jnp.ones((3, 3, 2, 4))}}
  with pytest.raises(ValueError, match="flat input"):
    network.from_layers((C.Controlled("dense", 4), L.Flatten()), p, (5, 5, 2))
  with pytest.raises(ValueError, match=r"\(H, W, C\)"):
    network.from_layers((C.Controlled("conv", 4), L.Flatten()), p, (50,))
