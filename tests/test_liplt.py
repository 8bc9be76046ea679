"""crmjax.liplt against float64 numpy references (explicit matrices, exact SVD)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crmjax import layers as L
from crmjax import liplt, models, network
from crmjax import operators as ops
from tests import reference as ref

K = 4
ITERS = 3000  # power iterations where a test needs the exact norm (1e-4 relative)

# The bounds jitted once for the whole file: tests that bound the same net with the same
# mode share one compile (shapes are the cache key; seeds and scales change only values).
_static = ("mode", "norm", "num_iters")
_liplt = functools.partial(jax.jit(liplt.liplt_bound, static_argnames=_static), num_iters=ITERS)
_naive = functools.partial(jax.jit(liplt.naive_bound, static_argnames=_static), num_iters=ITERS)


def _conv_net(act):
  return (
    L.Conv(3, 3, 1, 1),
    act,
    L.Conv(4, 3, 2, 1),
    act,
    L.Conv(3, 2, 1, 0),
    act,
    L.Flatten(),
    L.Dense(10),
    act,
    L.Dense(K),
  )


NETS = {
  "dense2_relu": ((5,), (L.Dense(7), L.Act(), L.Dense(K))),
  "dense4_leaky": (
    (6,),
    (
      L.Dense(8),
      L.Act("leaky_relu", 0.1),
      L.Dense(9),
      L.Act("leaky_relu", 0.1),
      L.Dense(7),
      L.Act("leaky_relu", 0.1),
      L.Dense(K),
    ),
  ),
  "dense3_tanh": ((5,), (L.Dense(6), L.Act("tanh"), L.Dense(6), L.Act("tanh"), L.Dense(K))),
  "conv_relu": ((6, 6, 2), _conv_net(L.Act())),
  "conv_norm_leaky": (
    (5, 5, 2),
    (L.Normalize((0.5, 0.4), (0.3, 0.2)),) + _conv_net(L.Act("leaky_relu", 0.2)),
  ),
  "residual_dense": (
    (6,),
    (
      L.Dense(6),
      L.Act(),
      L.Residual((L.Dense(5), L.Act(), L.Dense(6))),
      L.Residual((L.Dense(4), L.Act("tanh"), L.Dense(6))),
      L.Dense(K),
    ),
  ),
  "residual_conv": (
    (5, 5, 2),
    (
      L.Conv(3, 3, 1, 1),
      L.Act(),
      L.Residual((L.Conv(3, 3, 1, 1), L.Act(), L.Conv(3, 3, 1, 1))),
      L.Flatten(),
      L.Dense(K),
    ),
  ),
}


def _names(names):
  """``names`` as parameters; the conv nets' 3,000 power iterations run fully optimised
  (XLA:CPU's quick-compile code runs them 20x slower: 2.5 s against 0.1 s a call)."""
  return [
    pytest.param(n, marks=[pytest.mark.optimized] if "conv" in n else []) for n in sorted(names)
  ]


def _build(name, seed=0, scale=1.0):
  shape, layers = NETS[name]
  p = L.Sequential(layers).init(jax.random.key(seed), jnp.zeros((1, *shape)))["params"]
  p = jax.tree.map(lambda a: a * scale, p)
  return shape, layers, p


def _reference(name, p):
  shape, layers = NETS[name]
  blocks, R = ref.blocks_of(layers, jax.tree.map(np.asarray, p), shape)
  return blocks, R


@pytest.mark.parametrize("name", _names(NETS))
@pytest.mark.parametrize("mode", liplt.MODES)
def test_l2_bounds_match_float64_reference(name, mode):
  shape, layers, p = _build(name)
  net = network.from_layers(layers, p, shape)
  blocks, R = _reference(name, p)
  state = liplt.init_state(net, jax.random.key(1))
  got, _ = _liplt(net, state, mode=mode)
  want, _ = ref.liplt_reference(blocks, R, mode=mode)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)
  got_n, _ = _naive(net, state, mode=mode)
  np.testing.assert_allclose(got_n, ref.naive_reference(blocks, R, mode=mode), rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(NETS))
@pytest.mark.parametrize("mode", liplt.MODES)
def test_linf_bounds_sound_and_exact_on_single_operators(name, mode):
  shape, layers, p = _build(name)
  net = network.from_layers(layers, p, shape)
  blocks, R = _reference(name, p)
  got, _ = liplt.liplt_bound(net, mode=mode, norm="linf")
  exact, _ = ref.liplt_reference(blocks, R, mode=mode, norm="linf")
  # Upper bound of the recursion with exact interior infinity norms ...
  assert np.all(np.asarray(got) >= exact * (1 - 1e-5) - 1e-6)
  # ... and below the naive bound, which is exact for single operators.
  naive, _ = liplt.naive_bound(net, mode=mode, norm="linf")
  np.testing.assert_allclose(
    naive, ref.naive_reference(blocks, R, mode=mode, norm="linf"), rtol=1e-5, atol=1e-6
  )
  assert np.all(np.asarray(got) <= np.asarray(naive) * (1 + 1e-5) + 1e-6)


def test_linf_interior_table_exact_for_single_operators():
  shape, layers, p = _build("dense2_relu")
  net = network.from_layers(layers, p, shape)
  table, _ = liplt.interior_table(net, norm="linf")
  W0 = np.asarray(p["layer_0"]["kernel"], np.float64).T
  np.testing.assert_allclose(table[0, 0], np.abs(W0).sum(1).max(), rtol=1e-6)


@pytest.mark.parametrize("name", _names(NETS))
@pytest.mark.parametrize("norm", liplt.NORMS)
def test_liplt_never_above_naive(name, norm):
  for seed, scale in [(0, 1.0), (3, 2.0)]:
    shape, layers, p = _build(name, seed, scale)
    net = network.from_layers(layers, p, shape)
    state = liplt.init_state(net, jax.random.key(1))
    for mode in ("pairwise", "global"):
      a, _ = _liplt(net, state, mode=mode, norm=norm)
      b, _ = _naive(net, state, mode=mode, norm=norm)
      assert np.all(np.asarray(a) <= np.asarray(b) * (1 + 1e-4) + 1e-6), (mode, seed)


# Width-1 bottlenecks: every interior operator of eq. 19 is a product of a scalar chain and
# one row, so the LipLT recursion collapses to the product of the norms and is EXACT: the
# bound equals the largest gradient norm, reached wherever every activation has slope 1.
TIGHT_NETS = {
  "bottleneck_relu": ((5,), (L.Dense(1), L.Act(), L.Dense(K))),
  "bottleneck2_leaky": (
    (5,),
    (L.Dense(1), L.Act("leaky_relu", 0.1), L.Dense(1), L.Act("leaky_relu", 0.1), L.Dense(K)),
  ),
}


def _tight_params(name):
  """Params whose all-slopes-1 region is reachable: the scalar layers' weights positive."""
  shape, layers = TIGHT_NETS[name]
  p = L.Sequential(layers).init(jax.random.key(5), jnp.zeros((1, *shape)))["params"]
  if "layer_2" in p and p["layer_2"]["kernel"].shape == (1, 1):
    p["layer_2"]["kernel"] = jnp.abs(p["layer_2"]["kernel"]) + 0.5
  return shape, layers, p


def _gradient_norms(model, p, xs):
  """Per input: the Jacobian rows' pairwise differences, rows and the Jacobian (float64)."""
  jac = jax.vmap(jax.jacrev(lambda x: model.apply({"params": p}, x[None])[0]))(xs)
  jac = np.asarray(jac, np.float64).reshape(len(xs), K, -1)
  return jac[:, :, None] - jac[:, None, :], jac


@pytest.mark.parametrize("name", _names(NETS) + _names(TIGHT_NETS))
def test_bounds_exceed_gradient_norms(name):
  """Every bound >= ||c^T J(x)|| at many random inputs (the model with its biases); the l2
  bounds equal the float64 eq. 19 reference, and on the bottleneck nets, where LipLT is
  exact, the largest sampled gradient norm reaches the bound (a bound 1% low fails)."""
  if name in TIGHT_NETS:
    shape, layers, p = _tight_params(name)
  else:
    shape, layers, p = _build(name, seed=2)
    p = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(9), a.shape), p)
  model = L.Sequential(layers)
  net = network.from_layers(layers, p, shape)
  blocks, R = ref.blocks_of(layers, jax.tree.map(np.asarray, p), shape)
  xs = 3.0 * jax.random.normal(jax.random.key(4), (256, *shape))
  pair, jac = _gradient_norms(model, p, xs)
  state = liplt.init_state(net, jax.random.key(1))
  for norm, vec in (
    ("l2", lambda a: np.linalg.norm(a, axis=-1)),
    ("linf", lambda a: np.abs(a).sum(-1)),
  ):
    pw, _ = _liplt(net, state, mode="pairwise", norm=norm)
    pc, _ = _liplt(net, state, mode="per_class", norm=norm)
    gl, _ = _liplt(net, state, mode="global", norm=norm)
    tol = 1 + 1e-4
    assert np.all(vec(pair).max(0) <= np.asarray(pw) * tol + 1e-6)
    assert np.all(vec(jac).max(0) <= np.asarray(pc) * tol + 1e-6)
    op = np.linalg.norm(jac, 2, axis=(1, 2)) if norm == "l2" else np.abs(jac).sum(-1).max(-1)
    assert op.max() <= float(gl) * tol
    if norm == "l2":  # the values themselves: Theorem 3.3 in float64, exact norms
      for mode, got in (("pairwise", pw), ("per_class", pc), ("global", gl)):
        want, _ = ref.liplt_reference(blocks, R, mode=mode)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6, err_msg=mode)
    if name in TIGHT_NETS:  # exact: the sampled maximum attains the bound
      off = ~np.eye(K, dtype=bool)
      np.testing.assert_allclose(
        vec(pair).max(0)[off],
        np.asarray(pw)[off],
        rtol=1e-4,
        err_msg=f"{norm} pairwise bound is not the exact constant",
      )
      np.testing.assert_allclose(vec(jac).max(0), pc, rtol=1e-4)
      if norm == "linf":
        np.testing.assert_allclose(op.max(), gl, rtol=1e-4)
    # Relations between the modes.
    pc, pw = np.asarray(pc), np.asarray(pw)
    assert np.all(pw <= pc[:, None] + pc[None, :] + 1e-5)
    if norm == "l2":
      assert np.all(pw <= np.sqrt(2) * float(gl) * tol)


def test_as_pairwise_of_per_class_and_global_bounds():
  """Per-class bounds give ``L_i + L_j`` (triangle inequality), a global one ``sqrt(2) L``
  in l2 (``||e_i - e_j|| = sqrt(2)``) and ``2 L`` in linf; zero diagonal. Each is a valid
  pairwise bound: not below the exact pairwise constants of a linear map."""
  pc = jnp.asarray([1.0, 2.0, 4.0])
  np.testing.assert_allclose(
    liplt.as_pairwise(pc, mode="per_class"), [[0, 3, 5], [3, 0, 6], [5, 6, 0]], rtol=1e-7
  )
  np.testing.assert_allclose(
    liplt.as_pairwise(jnp.float32(2.0), mode="global", num_classes=3),
    2.0 * np.sqrt(2) * (1 - np.eye(3)),
    rtol=1e-6,
  )
  np.testing.assert_allclose(
    liplt.as_pairwise(jnp.float32(2.0), mode="global", num_classes=3, norm="linf"),
    4.0 * (1 - np.eye(3)),
    rtol=1e-7,
  )
  pw = jnp.asarray([[0.0, 1.0], [1.0, 0.0]])
  assert liplt.as_pairwise(pw, mode="pairwise") is pw
  with pytest.raises(ValueError, match="num_classes"):
    liplt.as_pairwise(jnp.float32(1.0), mode="global")
  A = np.random.default_rng(0).normal(size=(K, 6))  # logits = A x: exact constants known
  exact = np.linalg.norm(A[:, None] - A[None, :], axis=-1)
  for mode, b in (("per_class", np.linalg.norm(A, axis=1)), ("global", np.linalg.norm(A, 2))):
    got = np.asarray(liplt.as_pairwise(jnp.asarray(b, jnp.float32), mode=mode, num_classes=K))
    assert np.all(got >= exact * (1 - 1e-6)), mode


@pytest.mark.parametrize("name", _names(["conv_relu", "residual_conv", "dense4_leaky"]))
def test_power_iteration_converges_to_exact_svd(name):
  shape, layers, p = _build(name)
  net = network.from_layers(layers, p, shape)
  blocks, _ = _reference(name, p)
  table, _ = liplt.interior_table(net, liplt.init_state(net, jax.random.key(0)), num_iters=ITERS)
  hh = [ref._hhat(*b) for b in blocks]
  for e in range(len(blocks)):
    for t in range(e + 1):
      A = blocks[e][0]
      for k in range(e - 1, t - 1, -1):
        A = A @ hh[k][0]
      if t > 0:
        A = A @ hh[t - 1][1]
      np.testing.assert_allclose(table[e, t], np.linalg.norm(A, 2), rtol=1e-4)


def test_grad_matches_finite_differences():
  shape, layers = NETS["conv_relu"]
  with jax.enable_x64(True):
    p = L.Sequential(layers).init(jax.random.key(0), jnp.zeros((1, *shape), jnp.float64))
    p = jax.tree.map(lambda a: a.astype(jnp.float64), p["params"])
    state = liplt.init_state(network.from_layers(layers, p, shape), jax.random.key(1))
    state = jax.tree.map(lambda a: a.astype(jnp.float64), state)
    _, state = jax.jit(lambda n, s: liplt.liplt_bound(n, s, num_iters=ITERS))(
      network.from_layers(layers, p, shape), state
    )

    def f(params):  # the state is converged: a few more iterations keep it there
      b, _ = liplt.liplt_bound(network.from_layers(layers, params, shape), state, num_iters=4)
      return jnp.sum(b * jnp.arange(K * K).reshape(K, K) / K)

    g = jax.jit(jax.grad(f))(p)
    d = jax.tree.map(lambda a: jax.random.normal(jax.random.key(a.size), a.shape, a.dtype), p)
    h = 1e-5
    f = jax.jit(f)
    fd = (
      f(jax.tree.map(lambda a, b: a + h * b, p, d)) - f(jax.tree.map(lambda a, b: a - h * b, p, d))
    ) / (2 * h)
    an = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(d)))
    np.testing.assert_allclose(an, fd, rtol=1e-4)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(g))


def test_grad_in_float32_is_finite_and_nonzero_for_every_param():
  for name in ("conv_norm_leaky", "residual_conv"):
    shape, layers, p = _build(name)
    state = liplt.init_state(network.from_layers(layers, p, shape), jax.random.key(1))
    g = jax.jit(  # one compile: op-by-op, the gradient takes twice the CPU time
      jax.grad(
        lambda q: jnp.mean(
          liplt.liplt_bound(network.from_layers(layers, q, shape), state, num_iters=2)[0]
        )
      )
    )(p)
    _check_grads(g)


def _check_grads(g):
  for path, leaf in jax.tree_util.tree_leaves_with_path(g):
    assert np.all(np.isfinite(leaf)), path
    if "kernel" in jax.tree_util.keystr(path):
      assert np.any(leaf != 0), path


@pytest.mark.parametrize("name", ["conv_norm_leaky", "residual_dense"])
def test_init_state_is_unit_random_rows_of_the_documented_shapes(name):
  shape, layers, p = _build(name)
  net = network.from_layers(layers, p, shape)
  n = len(net.blocks)
  state = liplt.init_state(net, jax.random.key(1))
  starts = [shape] + [b.phi_shape for b in net.blocks]
  assert [v.shape for v in state.liplt] == [(n - t, *starts[t]) for t in range(n)]
  naive = [u for b, us in zip(net.blocks, state.naive) for op, u in zip((b.W, b.G, b.H), us)]
  ops_ = [op for b in net.blocks for op in (b.W, b.G, b.H)]
  for op, u in zip(ops_, naive):
    assert (u is None) == (op is None or ops.is_isometry(op) or isinstance(op, ops.Scale))
    if u is not None:
      assert u.shape == (1, *op.in_shape)
  rows = [np.asarray(r, np.float64).reshape(-1) for v in state.liplt for r in v]
  rows += [np.asarray(u, np.float64).reshape(-1) for u in naive if u is not None]
  np.testing.assert_allclose([np.linalg.norm(r) for r in rows], 1.0, rtol=1e-6)
  # independent draws: no two rows of one shape alike, another key other rows
  for a, b in zip(rows, rows[1:]):
    if a.shape == b.shape:
      assert abs(a @ b) < 0.95
  other = liplt.init_state(net, jax.random.key(2))
  assert not np.allclose(other.liplt[0], state.liplt[0])
  jitted = jax.jit(liplt.init_state)(net, jax.random.key(1))  # the same draw under jit
  chex.assert_trees_all_close(jitted, state, rtol=1e-6, atol=1e-7)


def test_jit_vmap_and_warm_start():
  shape, layers = NETS["conv_relu"]
  keys = jax.random.split(jax.random.key(0), 3)
  params = jax.vmap(lambda k: L.Sequential(layers).init(k, jnp.zeros((1, *shape))))(keys)
  params = params["params"]
  net0 = network.from_layers(layers, jax.tree.map(lambda a: a[0], params), shape)
  state = liplt.init_state(net0, jax.random.key(1))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def bound(p, s):
    return liplt.liplt_bound(network.from_layers(layers, p, shape), s, num_iters=1)

  batched = jax.jit(jax.vmap(bound, in_axes=(0, None)))
  b_all, _ = batched(params, state)
  assert b_all.shape == (3, K, K)
  for i in range(3):
    p_i = jax.tree.map(lambda a: a[i], params)
    exact, _ = _liplt(network.from_layers(layers, p_i, shape), state, mode="pairwise")
    # warm start: repeated single iterations converge to the many-iteration value
    s = state
    for _ in range(150):
      b, s = bound(p_i, s)
    np.testing.assert_allclose(b, exact, rtol=1e-4, atol=1e-6)
    # vmapped one-iteration bound equals the unbatched one
    np.testing.assert_allclose(b_all[i], bound(p_i, state)[0], rtol=1e-5, atol=1e-6)


def test_model_forward_matches_explicit_matrices():
  """The LipNet operators are the Flax model's linear maps (flatten order, conv padding)."""
  for name in ["dense2_relu", "dense4_leaky", "conv_relu", "residual_conv"]:  # ReLU family
    shape, layers, p = _build(name)
    p0 = jax.tree_util.tree_map_with_path(
      lambda path, a: jnp.zeros_like(a) if "bias" in jax.tree_util.keystr(path) else a, p
    )
    x = jax.random.normal(jax.random.key(3), (5, *shape))
    net = network.from_layers(layers, p0, shape)
    np.testing.assert_allclose(
      net(x), L.Sequential(layers).apply({"params": p0}, x), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("stride,pad", [(1, 1), (2, 1), (2, 0), (1, 0)])
def test_conv_operator_matches_numpy_matrix(stride, pad):
  kernel = jax.random.normal(jax.random.key(0), (3, 3, 2, 4))
  op = ops.Conv(kernel, (7, 6, 2), (stride, stride), ((pad, pad), (pad, pad)))
  M, out_shape = ref.conv_matrix(np.asarray(kernel), (7, 6, 2), stride, pad)
  x = np.random.default_rng(0).normal(size=(3, 7, 6, 2))
  assert op.out_shape == out_shape
  np.testing.assert_allclose(
    op(jnp.asarray(x, jnp.float32)).reshape(3, -1), x.reshape(3, -1) @ M.T, rtol=1e-5, atol=1e-5
  )


def test_errors_are_clear():
  with pytest.raises(ValueError, match="mode must be one of"):
    liplt.liplt_bound(
      network.from_layers(*_build("dense2_relu")[1:2], _build("dense2_relu")[2], (5,)), mode="pair"
    )
  with pytest.raises(ValueError, match="exactly one Act"):
    L.Residual((L.Dense(3), L.Dense(3)))
  with pytest.raises(ValueError, match="unknown architecture"):
    models.get_model("VGG", input_shape=(28, 28, 1), num_classes=10)
  with pytest.raises(ValueError, match="end with a linear layer"):
    network.from_layers((L.Dense(3), L.Act()), {"layer_0": {"kernel": jnp.ones((2, 3))}}, (2,))


# ------------------------------------------------------------ the Lanczos iteration


def _matrices(seed, rows=3, m=12, n=9, gap=0.02):
  """Random ``(rows, m, n)`` matrices whose two top singular values are ``1`` and ``1 - gap``."""
  rng = np.random.default_rng(seed)
  mats = []
  for _ in range(rows):
    u, _ = np.linalg.qr(rng.normal(size=(m, m)))
    v, _ = np.linalg.qr(rng.normal(size=(n, n)))
    s = np.concatenate([[1.0, 1.0 - gap], rng.uniform(0.1, 0.9, n - 2)])
    mats.append(u[:, :n] * s @ v.T)
  return np.stack(mats)


def _krylov_reference(M, u, k):
  """float64: the top Ritz vector of span(u .. (M^T M)^{k-1} u), then one power step."""
  A = M.T @ M
  basis = [u / np.linalg.norm(u)]
  for _ in range(k - 1):
    basis.append(A @ basis[-1])
  Q, _ = np.linalg.qr(np.stack(basis, 1))
  w, V = np.linalg.eigh(Q.T @ A @ Q)
  v = A @ (Q @ V[:, -1])
  return v / np.linalg.norm(v)


def _rows_fn(M):
  return lambda us: (jnp.einsum("rij,rj->ri", jnp.asarray(M, jnp.float32), us[0]),)


@pytest.mark.parametrize("k", [1, 2, 4, 6])
def test_lanczos_iterate_is_the_ritz_vector_of_the_krylov_space(k):
  M = _matrices(0)
  u = np.random.default_rng(1).normal(size=(3, 9))
  (got,) = jax.jit(liplt.lanczos_iterate, static_argnums=(0, 2))(
    _rows_fn(M), (jnp.asarray(u, jnp.float32),), k
  )
  for r in range(3):
    want = _krylov_reference(M[r], u[r], k)
    assert abs(np.dot(np.asarray(got[r], np.float64), want)) > 1 - 1e-5, (k, r)
  if k == 1:  # one power iteration
    (power,) = liplt.power_iterate(_rows_fn(M), (jnp.asarray(u, jnp.float32),), 1)
    np.testing.assert_allclose(got, power, rtol=1e-5, atol=1e-6)


def test_lanczos_estimate_between_power_and_the_exact_norm():
  M = _matrices(2, rows=4, m=30, n=25, gap=0.01)
  exact = np.linalg.norm(M, 2, axis=(1, 2))
  u = jnp.asarray(np.random.default_rng(3).normal(size=(4, 25)), jnp.float32)
  fn = _rows_fn(M)

  def estimate(v):
    return np.linalg.norm(np.einsum("rij,rj->ri", M, np.asarray(v, np.float64)), axis=1)

  for k in (2, 3, 5, 8):
    (lz,) = liplt.lanczos_iterate(fn, (u,), k)
    (pw,) = liplt.power_iterate(fn, (u,), k)
    assert np.all(estimate(lz) <= exact * (1 + 1e-6))
    assert np.all(estimate(lz) >= estimate(pw) * (1 - 1e-6)), k
  # and strictly closer: k Lanczos steps beat 2k power iterations here
  (lz,) = liplt.lanczos_iterate(fn, (u,), 8)
  (pw,) = liplt.power_iterate(fn, (u,), 16)
  err_lz, err_pw = exact - estimate(lz), exact - estimate(pw)
  assert np.all(err_lz <= err_pw + 1e-6) and np.sum(err_lz) < 0.5 * np.sum(err_pw)


def test_lanczos_iterate_on_an_exhausted_krylov_space():
  # Operators of input dimension 2 and of rank 1, with 6 steps: the space ends early.
  rng = np.random.default_rng(4)
  M = np.stack([rng.normal(size=(5, 2)), np.outer(rng.normal(size=5), rng.normal(size=2))])
  u = jnp.asarray(rng.normal(size=(2, 2)), jnp.float32)
  (got,) = liplt.lanczos_iterate(_rows_fn(M), (u,), 6)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
  est = np.linalg.norm(np.einsum("rij,rj->ri", M, np.asarray(got, np.float64)), axis=1)
  np.testing.assert_allclose(est, np.linalg.norm(M, 2, axis=(1, 2)), rtol=1e-5)
  # a converged start stays put
  (again,) = liplt.lanczos_iterate(_rows_fn(M), (got,), 3)
  np.testing.assert_allclose(np.abs(np.sum(again * got, axis=1)), 1.0, rtol=1e-5)


@pytest.mark.optimized
def test_lanczos_table_converges_to_exact_svd_warm_started():
  shape, layers, p = _build("conv_relu")
  net = network.from_layers(layers, p, shape)
  exact, _ = _liplt(net, liplt.init_state(net, jax.random.key(0)), mode="pairwise")

  @jax.jit
  @chex.assert_max_traces(n=1)
  def bound(s):
    return liplt.liplt_bound(net, s, num_iters=4, solver="lanczos")

  s = liplt.init_state(net, jax.random.key(1))
  for _ in range(25):
    b, s = bound(s)
  np.testing.assert_allclose(b, exact, rtol=1e-4, atol=1e-6)
  naive, _ = liplt.naive_bound(net, s, num_iters=30, solver="lanczos")
  want, _ = _naive(net, liplt.init_state(net, jax.random.key(0)), mode="pairwise")
  np.testing.assert_allclose(naive, want, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="solver must be one of"):
    liplt.lipschitz_bound(net, s, solver="arnoldi")
