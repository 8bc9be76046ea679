"""Property-based soundness tests: every Lipschitz bound is an upper bound, certificates hold.

Hypothesis draws small random networks (dense and conv, ReLU / leaky ReLU / tanh /
sigmoid, sequential and residual) and checks, against lower estimates computed
independently of crmjax's bound code:

1a. every bound (naive and LipLT; global, per-class, pairwise; l2 and linf) is >= a lower
    estimate of the true Lipschitz constant found by gradient ascent, and LipLT <= naive;
1b. on one-hidden-layer ReLU networks, every bound is >= the exact constant, the max over
    the activation patterns realised in the input space (2-D inputs: all of them, found
    from the vertices of the hyperplane arrangement; 3-D inputs: those hit by sampling);
1c. on networks whose linear part cancels (``z = P (phi(u) + phi(-u))``, leaky slopes
    ``alpha > 0``: the first term of eq. 19 vanishes and the bound rests on the ``m_j``
    terms), every sound bound (LipLT, naive, LipLT-AOL, LipLT of a random rescaling; l2 and
    l_inf; every mode) and the l_inf training bound is >= the float64 lower estimate, and a
    1-D counterexample whose constant comes from the m_j terms alone is certified correctly;
2.  a point certified at radius R (``soundness.sound_bound``, pairwise LipLT, l2) keeps its
    label under l2 PGD (``crmjax.attacks.pgd_l2``, multi-targeted, restarts) at eps = R and
    under an exhaustive search of the 2-D disc of radius R, while the same attack at 2R
    (else 4R, 8R: the smallest multiple at which the search finds an adversary) breaks at
    least half of the certified points the search breaks there (the attack has power);
3.  radii computed in float32 are not larger than the same radii computed in float64.

The lower estimates use a float64 numpy copy of each network built from explicit matrices
(``tests.reference``), checked against the Flax model's outputs in every example.

Set ``CRMJAX_SOUNDNESS_REPORT=1`` to append per-example counts (networks, points,
violations) as JSON lines to ``$CRMJAX_SOUNDNESS_REPORT_PATH`` (default
``/tmp/crmjax_soundness_report.jsonl``); the tests print nothing.
"""

from __future__ import annotations

import functools
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crmjax import attacks, certify, liplt, network, soundness
from crmjax import layers as L
from tests import reference as ref

ITERS = 1000  # power iterations: plenty for these tiny operators
# A bound B passes against a lower estimate / exact value E when E <= B * (1 + RTOL) + ATOL:
# the bounds are float32 and power iteration converges from below.
RTOL, ATOL = 1e-4, 1e-6

_REPORT = os.environ.get("CRMJAX_SOUNDNESS_REPORT", "") not in ("", "0")
_REPORT_PATH = os.environ.get(
  "CRMJAX_SOUNDNESS_REPORT_PATH",  # one file per pytest-xdist worker
  f"/tmp/crmjax_soundness_report{os.environ.get('PYTEST_XDIST_WORKER', '')}.jsonl",
)


def _report(prop, **fields):
  if _REPORT:
    with open(_REPORT_PATH, "a") as f:
      f.write(json.dumps({"property": prop, **fields}) + "\n")


def _settings(n):
  return settings(
    max_examples=n,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
  )


# --------------------------------------------------------------------- random networks

ACTS = st.one_of(
  st.just(L.Act("relu")),
  st.builds(lambda s: L.Act("leaky_relu", negative_slope=round(s, 3)), st.floats(0.0, 0.5)),
  st.just(L.Act("tanh")),
  st.just(L.Act("sigmoid")),
)

# (kernel, stride, padding) of the plain conv layers; residual convs are (3, 1, 1).
CONVS = [(3, 1, 1), (2, 1, 0), (3, 2, 1), (2, 2, 0), (1, 1, 0)]


@st.composite
def networks(
  draw,
  kinds=("dense", "conv"),
  acts=ACTS,
  max_layers=6,
  max_conv_layers=4,
  residual=True,
  classes=(2, 4),
):
  """(layers, input_shape, params-seed, weight scale): 2..max_layers linear layers.

  Residual blocks count as one layer; conv networks have at most ``max_conv_layers``
  (XLA's compile time of the power iteration grows quickly with the number of convs).
  Occasionally: a layer without activation (so that linear layers chain, e.g. into a
  residual's H), an extra activation (W = identity), an input normalisation.
  """
  kind = draw(st.sampled_from(kinds))
  n_layers = draw(
    st.integers(2, max_layers if kind == "dense" else min(max_layers, max_conv_layers))
  )
  k = draw(st.integers(*classes))
  layers = []
  if kind == "dense":
    shape = (draw(st.integers(2, 6)),)
    dim = shape[0]
    for _ in range(n_layers - 1):
      if residual and draw(st.integers(0, 2)) == 0:
        layers.append(L.Residual((L.Dense(draw(st.integers(2, 8))), draw(acts), L.Dense(dim))))
        continue
      dim = draw(st.integers(2, 8))
      layers.append(L.Dense(dim))
      if draw(st.integers(0, 5)) > 0:
        layers.append(draw(acts))
        if draw(st.integers(0, 7)) == 0:
          layers.append(draw(acts))
  else:
    shape = draw(st.sampled_from([(4, 4, 1), (5, 5, 2)]))
    if draw(st.integers(0, 3)) == 0:
      c = shape[2]
      layers.append(
        L.Normalize(
          tuple(draw(st.floats(-1, 1)) for _ in range(c)),
          tuple(draw(st.floats(0.25, 2.0)) for _ in range(c)),
        )
      )
    h, ch = shape[0], shape[2]
    dense_hidden = n_layers > 2 and draw(st.booleans())
    for _ in range(n_layers - 1 - dense_hidden):
      if residual and draw(st.integers(0, 2)) == 0:
        layers.append(
          L.Residual((L.Conv(draw(st.integers(2, 4)), 3, 1, 1), draw(acts), L.Conv(ch, 3, 1, 1)))
        )
        continue
      kern, stride, pad = draw(
        st.sampled_from([c for c in CONVS if (h + 2 * c[2] - c[0]) // c[1] + 1 >= 1])
      )
      ch = draw(st.integers(2, 8))
      h = (h + 2 * pad - kern) // stride + 1
      layers.append(L.Conv(ch, kern, stride, pad))
      layers.append(draw(acts))
    layers.append(L.Flatten())
    if dense_hidden:
      layers += [L.Dense(draw(st.integers(2, 8))), draw(acts)]
  layers.append(L.Dense(k))
  seed = draw(st.integers(0, 2**31 - 1))
  scale = draw(st.floats(0.3, 3.0))
  return tuple(layers), tuple(shape), seed, scale


def make_params(layers, shape, seed, scale, bias_scale=0.5):
  """Random params: kernels N(0, 1/fan_in) * scale, biases N(0, bias_scale^2)."""
  tree = jax.eval_shape(L.Sequential(layers).init, jax.random.key(0), jnp.zeros((1, *shape)))[
    "params"
  ]
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if jax.tree_util.keystr(path).endswith("['kernel']"):
      fan_in = int(np.prod(leaf.shape[:-1]))
      return (rng.normal(size=leaf.shape) * scale / np.sqrt(fan_in)).astype(np.float32)
    return (rng.normal(size=leaf.shape) * bias_scale).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, tree)


# ------------------------------------------------- float64 numpy copy of the network


def _np_act(act):
  if act.name == "relu":
    return lambda u: np.maximum(u, 0.0), lambda u: (u > 0).astype(u.dtype)
  if act.name == "leaky_relu":
    s = act.negative_slope
    return lambda u: np.where(u >= 0, u, s * u), lambda u: np.where(u >= 0, 1.0, s)
  if act.name == "tanh":
    return np.tanh, lambda u: 1.0 - np.tanh(u) ** 2

  def sig(u):
    return 0.5 * (1.0 + np.tanh(0.5 * u))

  return sig, lambda u: sig(u) * (1.0 - sig(u))


def np_ops(layers, params, shape):
  """The network as float64 ops: ('lin', M, b), ('act', f, df), ('res', ops)."""
  out = []
  for i, layer in enumerate(layers):
    p = params.get(f"layer_{i}", {})
    if isinstance(layer, L.Act):
      out.append(("act",) + _np_act(layer))
    elif isinstance(layer, L.Residual):
      sub, _ = np_ops(layer.layers, p, shape)
      out.append(("res", sub))
    else:
      M, new_shape = ref.layer_matrix(layer, p, shape)
      n_out = M.shape[0]
      if isinstance(layer, L.Normalize):
        b = np.broadcast_to(-np.asarray(layer.mean) / np.asarray(layer.std), shape).ravel()
      elif "bias" in p:
        b = np.tile(np.asarray(p["bias"], np.float64), n_out // p["bias"].shape[0])
      else:
        b = np.zeros(n_out)
      out.append(("lin", M, b.astype(np.float64)))
      shape = tuple(new_shape)
  return out, shape


def np_forward(ops, x, tape=None):
  for op in ops:
    if op[0] == "lin":
      x = x @ op[1].T + op[2]
    elif op[0] == "act":
      if tape is not None:
        tape.append(x)
      x = op[1](x)
    else:
      sub_tape = [] if tape is not None else None
      x = x + np_forward(op[1], x, sub_tape)
      if tape is not None:
        tape.append(sub_tape)
  return x


def np_vjp(ops, tape, g):
  """Cotangent ``g`` of the output -> cotangent of the input (tape from np_forward)."""
  tape = list(tape)
  for op in reversed(ops):
    if op[0] == "lin":
      g = g @ op[1]
    elif op[0] == "act":
      g = g * op[2](tape.pop())
    else:
      g = g + np_vjp(op[1], tape.pop(), g)
  return g


def np_jacobian(ops, x):
  """(B, n) -> (B, K, n), forward mode."""
  jac = np.broadcast_to(np.eye(x.shape[1]), (x.shape[0], x.shape[1], x.shape[1]))

  def go(ops, x, jac):
    for op in ops:
      if op[0] == "lin":
        x, jac = x @ op[1].T + op[2], np.einsum("oi,bin->bon", op[1], jac)
      elif op[0] == "act":
        x, jac = op[1](x), op[2](x)[:, :, None] * jac
      else:
        y, j = go(op[1], x, jac)
        x, jac = x + y, jac + j
    return x, jac

  return go(ops, x, jac)[1]


# ------------------------------------------------------------ lower estimates, exact


def objectives(k):
  """Rows c of the pairwise (i < j) and per-class objectives; the global one is separate."""
  pairs = list(itertools.combinations(range(k), 2))
  c = np.zeros((len(pairs) + k, k))
  for r, (i, j) in enumerate(pairs):
    c[r, i], c[r, j] = 1.0, -1.0
  c[len(pairs) :] = np.eye(k)
  return pairs, c


def jacobian_values(jac, c):
  """Lipschitz lower bounds from Jacobians (B, K, n): {norm: (B, n_c + 1)}, last = global."""
  cj = np.einsum("ck,bkn->bcn", c, jac)
  return {
    "l2": np.concatenate(
      [np.linalg.norm(cj, axis=-1), np.linalg.norm(jac, 2, axis=(1, 2))[:, None]], axis=1
    ),
    "linf": np.concatenate([np.abs(cj).sum(-1), np.abs(jac).sum(-1).max(-1)[:, None]], axis=1),
  }


def as_modes(vals, k):
  """(n_c + 1,) objective values -> {'pairwise': (K, K), 'per_class': (K,), 'global': ()}."""
  pairs, _ = objectives(k)
  pw = np.zeros((k, k))
  for r, (i, j) in enumerate(pairs):
    pw[i, j] = pw[j, i] = vals[r]
  return {"pairwise": pw, "per_class": vals[len(pairs) : len(pairs) + k], "global": vals[-1]}


def ascent_lower_estimate(ops, n_in, k, rng, *, starts=6, steps=40, n_random=256):
  """Lower estimates of every Lipschitz constant by gradient ascent, in float64.

  For each objective (pair, class, global; l2 and linf) and each start, maximises the
  secant ratio ``|c^T (f(x + d) - f(x))| / ||d||`` (global: ``||f(x+d) - f(x)|| / ||d||``)
  over ``x`` and ``d`` by normalised gradient ascent. The secant has a useful gradient also
  for piecewise-linear networks, where ``||J(x)^T c||`` is piecewise constant. Every secant
  and every Jacobian norm (at points along the best segments and at random inputs) is a
  valid lower bound of every constant; the max over all of them is returned.

  Returns:
    {norm: (n_c + 1,)} lower estimates, and the number of points evaluated.
  """
  _, c = objectives(k)
  n_c = c.shape[0]
  rows = [(norm, o) for norm in ("l2", "linf") for o in range(n_c + 1)] * starts
  B = len(rows)
  is_inf = np.array([r[0] == "linf" for r in rows])
  obj = np.array([r[1] for r in rows])
  is_glob = obj == n_c
  cmat = np.concatenate([c, np.zeros((1, k))])[obj]
  x = rng.normal(size=(B, n_in)) * rng.choice([0.3, 1.0, 3.0], size=(B, 1))
  d = rng.normal(size=(B, n_in))
  d = np.where(is_inf[:, None], np.sign(d), d)
  d *= rng.choice([0.03, 0.3], size=(B, 1)) / np.linalg.norm(d, axis=1, keepdims=True)

  def dnorm(d):
    return np.where(is_inf, np.abs(d).max(1), np.linalg.norm(d, axis=1))

  def value_and_grads(x, d):
    t0, t1 = [], []
    z0, z1 = np_forward(ops, x, t0), np_forward(ops, x + d, t1)
    dz = z1 - z0
    s = np.einsum("bk,bk->b", cmat, dz)
    g_l2 = dz / np.maximum(np.linalg.norm(dz, axis=1, keepdims=True), 1e-300)
    top = np.argmax(np.abs(dz), axis=1)
    g_inf = np.eye(k)[top] * np.sign(dz[np.arange(B), top])[:, None]
    num = np.where(
      is_glob, np.where(is_inf, np.abs(dz).max(1), np.linalg.norm(dz, axis=1)), np.abs(s)
    )
    gnum = np.where(
      is_glob[:, None], np.where(is_inf[:, None], g_inf, g_l2), np.sign(s)[:, None] * cmat
    )
    nd = dnorm(d)
    ratio = num / nd
    gz = gnum / nd[:, None]
    v1, v0 = np_vjp(ops, t1, gz), np_vjp(ops, t0, gz)
    j = np.argmax(np.abs(d), axis=1)
    gnd = np.where(
      is_inf[:, None], np.eye(n_in)[j] * np.sign(d[np.arange(B), j])[:, None], d / nd[:, None]
    )
    return ratio, v1 - v0, v1 - (ratio / nd)[:, None] * gnd

  def unit(g):
    return g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-300)

  best = np.full(B, -np.inf)
  best_x, best_d = x.copy(), d.copy()
  for t in range(steps + 1):
    ratio, gx, gd = value_and_grads(x, d)
    better = ratio > best
    best = np.where(better, ratio, best)
    best_x[better], best_d[better] = x[better], d[better]
    if t == steps:
      break
    lr = 0.25 * 0.5 * (1 + np.cos(np.pi * t / steps)) + 0.01
    x = x + lr * unit(gx)
    d = d + lr * dnorm(d)[:, None] * unit(gd)
    d = d / np.maximum(dnorm(d) / 3.0, 1.0)[:, None]  # keep ||d|| <= 3

  pts = np.concatenate(
    [best_x + a * best_d for a in (0.0, 0.25, 0.5, 0.75, 1.0)]
    + [rng.normal(size=(n_random, n_in)) * rng.choice([0.3, 1.0, 3.0], size=(n_random, 1))]
  )
  jv = jacobian_values(np_jacobian(ops, pts), c)
  out = {}
  for norm in ("l2", "linf"):
    sec = np.full(n_c + 1, -np.inf)
    m = is_inf == (norm == "linf")
    np.maximum.at(sec, obj[m], best[m])
    out[norm] = np.maximum(sec, jv[norm].max(0))
  return out, B * (steps + 1) * 2 + pts.shape[0]


# -------------------------------------------------------------------- crmjax, jitted


# XLA's backend optimisations are switched off for these one-off programs: on CPU they
# cost more compile time than they save at run time on tiny networks.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@functools.cache
def _bounds_fn(layers, shape):
  """Jitted: (params, x) -> ({(method, mode, norm): bound}, logits at x)."""
  model = L.Sequential(layers)

  def fn(params, x):
    net = network.from_layers(layers, params, shape)
    state = liplt.init_state(net, jax.random.key(1))
    # Converge the power iteration once, then every mode reuses the state (warm start).
    _, s1 = liplt.liplt_bound(net, state, num_iters=ITERS)
    _, s2 = liplt.naive_bound(net, state, num_iters=ITERS)
    state = s1.replace(naive=s2.naive)
    out = {}
    for method in liplt.METHODS:
      for mode in liplt.MODES:
        for norm in liplt.NORMS:
          out[(method, mode, norm)] = liplt.lipschitz_bound(
            net, state if norm == "l2" else None, method=method, mode=mode, norm=norm, num_iters=0
          )[0]
    return out, model.apply({"params": params}, x)

  return _jit(fn)


def all_bounds(layers, shape, params, x_check):
  b, logits = _bounds_fn(layers, shape)(params, jnp.asarray(x_check, jnp.float32))
  return {key: np.asarray(v, np.float64) for key, v in b.items()}, np.asarray(logits)


def check_np_model(ops, x_check, logits):
  """The float64 numpy copy computes the Flax model (up to float32 rounding)."""
  want = np_forward(ops, x_check.reshape(x_check.shape[0], -1).astype(np.float64))
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4 * (1 + np.abs(want).max()))


def compare(bounds, lower, k, what):
  """Violations of ``lower <= bound`` for every (method, mode, norm), and of LipLT <= naive.

  Returns (number of comparisons, list of violation descriptions).
  """
  n, bad = 0, []
  for norm in liplt.NORMS:
    low = as_modes(lower[norm], k)
    for mode in liplt.MODES:
      mask = ~np.eye(k, dtype=bool) if mode == "pairwise" else np.ones(np.shape(low[mode]), bool)
      for method in liplt.METHODS:
        b = bounds[(method, mode, norm)]
        ok = low[mode] <= b * (1 + RTOL) + ATOL
        n += int(mask.sum())
        if not np.all(ok[mask]):
          bad.append(f"{what} > {method} {mode} {norm}: {low[mode][mask]} vs {b[mask]}")
      lt, nv = bounds[("liplt", mode, norm)], bounds[("naive", mode, norm)]
      n += int(mask.sum())
      if not np.all((lt <= nv * (1 + RTOL) + ATOL)[mask]):
        bad.append(f"liplt > naive {mode} {norm}: {lt[mask]} vs {nv[mask]}")
  return n, bad


# ------------------------------------------------------------------------ property 1a


# Each drawn architecture is compiled once and checked with PARAM_DRAWS random parameter
# sets (the first at the drawn weight scale, the others at scales log-uniform in [0.3, 3]).
PARAM_DRAWS = 3


def _param_draws(layers, shape, seed, scale, n=PARAM_DRAWS):
  rng = np.random.default_rng(seed)
  for i in range(n):
    s = scale if i == 0 else float(np.exp(rng.uniform(np.log(0.3), np.log(3.0))))
    yield make_params(layers, shape, seed + i, s), s, np.random.default_rng(seed + i)


@_settings(10)
@given(networks())
def test_bounds_above_gradient_ascent_lower_estimates(spec):
  layers, shape, seed, scale = spec
  for params, s, rng in _param_draws(layers, shape, seed, scale):
    x_check = rng.normal(size=(4, *shape)).astype(np.float32)
    bounds, logits = all_bounds(layers, shape, params, x_check)
    ops, _ = np_ops(layers, jax.tree.map(np.asarray, params), shape)
    check_np_model(ops, x_check, logits)
    k = logits.shape[-1]
    lower, n_points = ascent_lower_estimate(ops, int(np.prod(shape)), k, rng)
    n_cmp, bad = compare(bounds, lower, k, "ascent lower estimate")
    tight = float(lower["l2"][-1] / bounds[("liplt", "global", "l2")])
    _report(
      "1a_ascent",
      networks=1,
      kind="conv" if len(shape) == 3 else "dense",
      points=n_points,
      comparisons=n_cmp,
      violations=len(bad),
      layers=len(layers),
      liplt_global_l2_tightness=tight,
    )
    assert not bad, (layers, shape, seed, s, bad)


# ------------------------------------------------------------------------ property 1b


def realised_patterns(w1, b1, rng, n_samples=4096):
  """Activation patterns (bool rows) of relu(x @ w1 + b1) realised somewhere in R^d.

  Sampling at several scales; for d = 2 additionally the exact enumeration of the line
  arrangement: the four cells around every vertex and every unbounded direction, so the
  patterns found are all the realisable ones (general position holds almost surely).
  Returns (patterns, exact_enumeration).
  """
  d, n = w1.shape
  x = rng.normal(size=(n_samples, d)) * rng.choice([0.1, 1.0, 10.0, 100.0], size=(n_samples, 1))
  pats = [(x @ w1 + b1) > 0]
  if d == 2:
    for j, l in itertools.combinations(range(n), 2):
      A = w1[:, [j, l]].T
      if abs(np.linalg.det(A)) < 1e-12:
        continue
      v = np.linalg.solve(A, -b1[[j, l]])
      base = (v @ w1 + b1) > 0
      for sj, sl in itertools.product([False, True], repeat=2):
        p = base.copy()
        p[j], p[l] = sj, sl
        pats.append(p[None])
    crit = np.sort(
      np.concatenate([np.arctan2(w1[1], w1[0]) + s * np.pi / 2 for s in (-1, 1)]) % (2 * np.pi)
    )
    mids = crit + np.diff(np.concatenate([crit, crit[:1] + 2 * np.pi])) / 2
    u = np.stack([np.cos(mids), np.sin(mids)], axis=1)
    pats.append((u @ w1) > 0)
  return np.unique(np.concatenate(pats), axis=0), d == 2


@_settings(20)
@given(st.integers(2, 3), st.integers(2, 6), st.integers(0, 2**31 - 1), st.floats(0.3, 3.0))
def test_bounds_above_exact_constant_one_hidden_layer_relu(d, n, seed, scale):
  k = 3
  layers = (L.Dense(n), L.Act("relu"), L.Dense(k))
  shape = (d,)
  params = make_params(layers, shape, seed, scale, bias_scale=1.0)
  rng = np.random.default_rng(seed)
  x_check = rng.normal(size=(4, d)).astype(np.float32)
  bounds, logits = all_bounds(layers, shape, params, x_check)
  p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  w1, b1 = p64["layer_0"]["kernel"], p64["layer_0"]["bias"]
  w2 = p64["layer_2"]["kernel"]
  ops, _ = np_ops(layers, p64, shape)
  check_np_model(ops, x_check, logits)

  pats, exact = realised_patterns(w1, b1, rng)
  _, c = objectives(k)
  jac = np.einsum("nk,pn,dn->pkd", w2, pats.astype(np.float64), w1)  # (P, K, d) = W2^T D W1^T
  jv = jacobian_values(jac, c)
  lower = {norm: v.max(0) for norm, v in jv.items()}
  n_cmp, bad = compare(bounds, lower, k, "exact constant" if exact else "pattern max")

  # Self-check of the machinery of property 1a: with all patterns known, the ascent
  # estimate cannot exceed the exact constant (and usually reaches it).
  est, _ = ascent_lower_estimate(ops, d, k, rng)
  reached = 0
  if exact:
    for norm in liplt.NORMS:
      assert np.all(est[norm] <= lower[norm] * (1 + 1e-9) + 1e-12), (est, lower)
      reached += int(np.sum(est[norm] >= lower[norm] * (1 - 1e-6)))
  _report(
    "1b_exact",
    networks=1,
    exact_enumeration=bool(exact),
    patterns=int(len(pats)),
    all_patterns=2**n,
    comparisons=n_cmp,
    violations=len(bad),
    ascent_reached_exact=reached,
    ascent_objectives=2 * (c.shape[0] + 1) if exact else 0,
  )
  assert not bad, (d, n, seed, scale, bad)


# ------------------------------------------------------------------------ property 1c


def cancellation_layers(d, n, m, k, a1, a2):
  """``x -> z = R [phi(u); phi(-u)] + b``, ``u = M phi(W x + b1) + c`` (leaky slopes a1, a2)."""
  del d
  return (L.Dense(n), L.Act("leaky_relu", a1), L.Dense(2 * m), L.Act("leaky_relu", a2), L.Dense(k))


def cancellation_params(d, n, m, k, seed, noise):
  """``W2 = [M, -M]``, ``b2 = [c, -c]`` and ``R = [P; P] + noise``: the linear part of the
  logits (``Hhat`` products) is ``noise``-small, the logits are ``P (1 - a2) |u| + ...``."""
  rng = np.random.default_rng(seed)
  M, c = rng.normal(size=(n, m)) / np.sqrt(n), rng.normal(size=m) * 0.3
  P = rng.normal(size=(m, k))
  f32 = lambda a: np.asarray(a, np.float32)
  return {
    "layer_0": {
      "kernel": f32(rng.normal(size=(d, n)) / np.sqrt(d)),
      "bias": f32(rng.normal(size=n) * 0.3),
    },
    "layer_2": {"kernel": f32(np.concatenate([M, -M], 1)), "bias": f32(np.concatenate([c, -c]))},
    "layer_4": {
      "kernel": f32(np.concatenate([P, P]) + noise * rng.normal(size=(2 * m, k))),
      "bias": f32(rng.normal(size=k) * 0.3),
    },
  }


SOUND_VARIANTS = ("liplt", "naive", "liplt_aol", "scaled")


def sound_bounds_all(net, scales):
  """``{(variant, mode, norm): float64 bound}`` of ``soundness.sound_bounds`` and, for l_inf,
  ``('training', mode, 'linf')``: ``liplt.liplt_bound`` itself."""
  out = {}
  for variant in SOUND_VARIANTS:
    kw = {"method": "liplt", "scales": scales} if variant == "scaled" else {"method": variant}
    for norm in liplt.NORMS:
      bounds, info = soundness.sound_bounds(net, modes=liplt.MODES, norm=norm, **kw)
      assert info["kind"] == "guaranteed upper bound", info
      out.update({(variant, mode, norm): b for mode, b in bounds.items()})
  train = jax.jit(lambda n: [liplt.liplt_bound(n, mode=m, norm="linf")[0] for m in liplt.MODES])
  for mode, b in zip(liplt.MODES, train(net)):
    out[("training", mode, "linf")] = np.asarray(b, np.float64)
  return out


def below_bounds(bounds, lower, k):
  """Violations of ``lower <= bound`` (float64; the sound bounds carry their margin)."""
  bad = []
  for (variant, mode, norm), b in bounds.items():
    low = as_modes(lower[norm], k)[mode]
    mask = ~np.eye(k, dtype=bool) if mode == "pairwise" else np.ones(np.shape(low), bool)
    tol = 1e-6 if variant == "training" else 0.0  # the training bound is float32
    if not np.all((low <= b * (1 + tol))[mask]):
      bad.append(f"{variant} {mode} {norm}: lower {low[mask]} > bound {np.asarray(b)[mask]}")
  return bad


# Few shapes (each new shape compiles its operators once), any slopes, weights and noise.
@_settings(8)
@given(
  st.integers(1, 2),
  st.integers(1, 2),
  st.just(2),
  st.integers(2, 3),
  st.floats(0.05, 0.9),
  st.floats(0.05, 0.9),
  st.integers(0, 2**31 - 1),
  st.sampled_from([0.0, 0.1]),
)
def test_sound_bounds_where_eq19_needs_the_m_terms(d, n, m, k, a1, a2, seed, noise):
  layers = cancellation_layers(d, n, m, k, a1, a2)
  params = cancellation_params(d, n, m, k, seed, noise)
  net = network.from_layers(layers, params, (d,))
  rng = np.random.default_rng(seed)
  scales = [np.exp(rng.normal(size=b.phi_shape)) for b in net.blocks]
  bounds = sound_bounds_all(net, scales)
  ops, _ = np_ops(layers, jax.tree.map(np.asarray, params), (d,))
  x_check = rng.normal(size=(4, d)).astype(np.float32)
  check_np_model(ops, x_check, np.asarray(L.Sequential(layers).apply({"params": params}, x_check)))
  lower, _ = ascent_lower_estimate(ops, d, k, rng, starts=4, steps=30)
  bad = below_bounds(bounds, lower, k)
  _report("1c_cancellation", networks=1, comparisons=len(bounds), violations=len(bad))
  assert not bad, (layers, seed, noise, bad)


# A counterexample to an earlier l_inf bound (``Block.abs`` gave the wrong slope range):
# z0 = phi(phi(x)) + phi(-phi(x)) = |phi(x)| / 2, z1 = 0.1, with phi = leaky ReLU of slope 0.5:
# the pairwise constant is exactly 0.5 (x > 0), all of it from the m_j term of eq. 19 (the Hhat
# products cancel in R Hhat_1 Hhat_0).
COUNTER_LAYERS = (
  L.Dense(1),
  L.Act("leaky_relu", 0.5),
  L.Dense(2),
  L.Act("leaky_relu", 0.5),
  L.Dense(2),
)
COUNTER_PARAMS = {
  "layer_0": {"kernel": np.array([[1.0]], np.float32), "bias": np.zeros(1, np.float32)},
  "layer_2": {"kernel": np.array([[1.0, -1.0]], np.float32), "bias": np.zeros(2, np.float32)},
  "layer_4": {
    "kernel": np.array([[1.0, 0.0], [1.0, 0.0]], np.float32),
    "bias": np.array([0.0, 0.1], np.float32),
  },
}


def test_linf_counterexample_whose_constant_is_all_m_terms():
  net = network.from_layers(COUNTER_LAYERS, COUNTER_PARAMS, (1,))
  f = lambda x: np.asarray(
    L.Sequential(COUNTER_LAYERS).apply(
      {"params": COUNTER_PARAMS}, np.asarray(x, np.float32).reshape(-1, 1)
    )
  )
  np.testing.assert_allclose(f([1.0, -2.0, 0.2]), [[0.5, 0.1], [0.5, 0.1], [0.1, 0.1]], atol=1e-7)
  tight = (1 + 1e-4) ** 3 * (1 + 1e-7)  # the margin of L + 1 = 3 factors
  for norm in liplt.NORMS:
    for variant in ("liplt", "liplt_aol", "scaled"):
      kw = (
        {"scales": [np.float32(2.0), np.float32(0.5)]}
        if variant == "scaled"
        else {"method": variant}
      )
      lip, info = soundness.sound_bound(net, norm=norm, **kw)
      assert info["kind"] == "guaranteed upper bound"
      assert lip[0, 1] >= 0.5, (norm, variant, lip[0, 1])  # old Block.abs: 0.25 in l_inf
      if variant == "liplt":
        assert lip[0, 1] <= 0.5 * tight, (norm, lip[0, 1])  # and LipLT is exact here
    naive, _ = soundness.sound_bound(net, method="naive", norm=norm)
    assert naive[0, 1] >= 0.5
    train, _ = liplt.liplt_bound(net, norm=norm, num_iters=50)
    np.testing.assert_allclose(np.asarray(train)[0, 1], 0.5, rtol=1e-6)
  # The certificate of x = 1 (margin 0.4): radius 0.8 = the true distance to x = 0.2.
  lip, _ = soundness.sound_bound(net, norm="linf")
  radius = certify.radii_of(f([1.0]), np.array([0]), lip)[0]
  assert 0.8 / tight <= radius <= 0.8
  assert f([0.2 - 1e-3])[0].argmax() == 1 and f([0.1])[0].argmax() == 1  # misclassified
  assert f([0.2 + 1e-3])[0].argmax() == 0


# ------------------------------------------------------------------------- property 2

PGD_STEPS, PGD_RESTARTS = 100, 10
POWER_MULTIPLES = (2, 4, 8)  # the power check attacks at these multiples of R
N_POINTS = 32
N_ANGLES, N_RADII = 4096, 8
# The exhaustive search counts a label change where the float64 margin is below
# -MARGIN_TOL * (1 + max |z|): the float64 evaluation of the network at distance exactly
# R may differ from the float32 certificate by rounding only. (Strict label changes, with
# no tolerance, are counted too and reported.)
MARGIN_TOL = 1e-6


@functools.cache
def _certify_fn(layers, shape):
  """Jitted: (params, state, x) -> (labels, radii, logits): the pairwise-LipLT l2 certificate.

  ``state=None``: a fresh ``init_state`` in the dtype of ``x``. Works in float32 and, under
  ``jax.enable_x64``, in float64.
  """
  model = L.Sequential(layers)

  def fn(params, state, x):
    net = network.from_layers(layers, params, shape)
    if state is None:  # same start in float32 and float64
      state = jax.tree.map(lambda a: a.astype(x.dtype), liplt.init_state(net, jax.random.key(1)))
    lip, _ = liplt.liplt_bound(net, state, mode="pairwise", norm="l2", num_iters=ITERS)
    z = model.apply({"params": params}, x)
    y = jnp.argmax(z, axis=-1)
    z_y = jnp.take_along_axis(z, y[:, None], axis=-1)
    ratio = (z_y - z) / jnp.maximum(lip[y], 1e-30)
    ratio = jnp.where(jax.nn.one_hot(y, z.shape[-1], dtype=bool), jnp.inf, ratio)
    return y, jnp.min(ratio, axis=-1), z

  return _jit(fn)


@functools.cache
def _apply_fn(layers):
  return _jit(lambda p, x: L.Sequential(layers).apply({"params": p}, x))


# pgd_l2 attacks every network of this property embedded in one fixed architecture, so
# that the attack compiles once: hidden units zero-padded to width 8, missing hidden
# layers replaced by identity layers (exact: they follow a ReLU, so their inputs are
# >= 0), missing classes given logit -1e6. The embedding is checked to reproduce the
# network's logits in every example.
PAD_WIDTH, PAD_HIDDEN, PAD_CLASSES = 8, 3, 4
PAD_LAYERS = (L.Dense(PAD_WIDTH), L.Act("relu")) * PAD_HIDDEN + (L.Dense(PAD_CLASSES),)


def embed(params, n_hidden):
  out, n_in = {}, 2
  for j in range(PAD_HIDDEN + 1):
    last = j == PAD_HIDDEN
    width = PAD_CLASSES if last else PAD_WIDTH
    kernel, bias = np.zeros((n_in, width), np.float32), np.zeros(width, np.float32)
    if j < n_hidden or last:
      p = params[f"layer_{2 * n_hidden if last else 2 * j}"]
      a, b = p["kernel"].shape
      kernel[:a, :b], bias[:b] = p["kernel"], p["bias"]
      if last:
        bias[b:] = -1e6
    else:
      kernel[:] = np.eye(PAD_WIDTH, dtype=np.float32)
    out[f"layer_{2 * j}"] = {"kernel": kernel, "bias": bias}
    n_in = width
  return out


@functools.cache
def _pgd_fn():
  model = L.Sequential(PAD_LAYERS)

  def fn(params, x, y, eps, key):
    return attacks.pgd_l2(
      lambda v: model.apply({"params": params}, v),
      x,
      y,
      key=key,
      eps=eps,
      num_steps=PGD_STEPS,
      num_restarts=PGD_RESTARTS,
      loss="multitarget",
      clip_min=-jnp.inf,
      clip_max=jnp.inf,
    )

  return jax.jit(fn)  # compiled once: optimise


@st.composite
def relu_2d_networks(draw):
  n_hidden = draw(st.integers(1, PAD_HIDDEN))
  layers = []
  for _ in range(n_hidden):
    layers += [L.Dense(draw(st.integers(2, PAD_WIDTH))), L.Act("relu")]
  layers.append(L.Dense(draw(st.integers(2, PAD_CLASSES))))
  return tuple(layers), draw(st.integers(0, 2**31 - 1)), draw(st.floats(0.3, 3.0))


@functools.cache
def _search_fn(layers):
  """Jitted (call under x64): the margins of the network on the disc of radius R around x.

  Returns per point: the clean margin, the smallest margin on the N_ANGLES x N_RADII
  search grid, the number of grid points with margin < 0 (strict label changes) and with
  margin < -MARGIN_TOL * (1 + max |z|) (counted as violations).
  """
  model = L.Sequential(layers)

  def one(params, x, y, r):
    theta = jnp.linspace(0, 2 * jnp.pi, N_ANGLES, endpoint=False, dtype=x.dtype)
    fr = jnp.arange(1, N_RADII + 1, dtype=x.dtype) / N_RADII
    u = jnp.stack([jnp.cos(theta), jnp.sin(theta)], axis=1)
    offsets = (fr[:, None, None] * u[None]).reshape(-1, 2)  # unit disc, circle included
    z = model.apply({"params": params}, jnp.concatenate([x[None], x + r * offsets]))
    m = attacks.margins(z, jnp.full(z.shape[:1], y))
    bad = m[1:] < -MARGIN_TOL * (1 + jnp.max(jnp.abs(z[1:]), axis=-1))
    return m[0], jnp.min(m[1:]), jnp.sum(m[1:] < 0), jnp.sum(bad)

  return jax.jit(jax.vmap(one, in_axes=(None, 0, 0, 0)))


@_settings(10)
@given(relu_2d_networks())
def test_certified_points_survive_pgd_and_exhaustive_2d_search(spec):
  layers, seed, scale = spec
  targets = broken = 0
  for params, _, rng in _param_draws(layers, (2,), seed, scale, n=2):
    t, b = _check_certified_points(layers, jax.tree.map(np.asarray, params), rng)
    targets, broken = targets + t, broken + b
  # The attack has power: where the exhaustive search finds an adversary of a certified point
  # within 2R (else 4R, 8R), PGD at that radius breaks at least half of those points.
  assert 2 * broken >= targets, (layers, seed, scale, targets, broken)


def _check_certified_points(layers, params, rng):
  shape, n_hidden = (2,), (len(layers) - 1) // 2
  x = (rng.normal(size=(N_POINTS, 2)) * 1.5).astype(np.float32)
  # The certificate as crmjax.certify makes it: the sound bound, highest-precision logits.
  lip, info = soundness.sound_bound(network.from_layers(layers, params, shape), mode="pairwise")
  assert info["kind"] == "guaranteed upper bound"
  z32 = np.asarray(certify.certified_apply(L.Sequential(layers))({"params": params}, x))
  y = z32.argmax(1)
  radius = certify.radii_of(z32, y, lip)
  assert np.all(radius >= 0)
  cert = radius > 0  # margin > 0 only
  k = layers[-1].features

  padded = embed(params, n_hidden)
  np.testing.assert_allclose(
    np.asarray(_apply_fn(PAD_LAYERS)(padded, x))[:, :k],
    z32,
    rtol=1e-5,
    atol=1e-5 * (1 + np.abs(z32).max()),
  )
  pgd = _pgd_fn()
  res = pgd(padded, x, y, radius, jax.random.key(int(rng.integers(1000))))
  res = jax.tree.map(np.asarray, res)
  pgd_broken = np.asarray(res.success) & cert
  # The attack's iterates stay in the ball (else a success would prove nothing).
  dist = np.linalg.norm(np.asarray(res.x_adv) - x, axis=1)
  assert np.all(dist <= radius * (1 + 1e-5) + 1e-7)
  # Exhaustive 2-D search in float64: the circle of radius R (N_ANGLES angles) and
  # N_RADII - 1 concentric circles inside it.
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    clean, worst, strict, tol = (
      np.asarray(a)
      for a in _search_fn(layers)(
        p64, jnp.asarray(x, jnp.float64), jnp.asarray(y), jnp.asarray(radius, jnp.float64)
      )
    )
    # The same search at 2R, 4R, 8R: the smallest multiple with an adversary, per point.
    mult = np.full(N_POINTS, np.inf)
    for m in POWER_MULTIPLES[::-1]:
      strict_m = np.asarray(
        _search_fn(layers)(
          p64, jnp.asarray(x, jnp.float64), jnp.asarray(y), jnp.asarray(m * radius, jnp.float64)
        )[2]
      )
      mult = np.where(cert & (strict_m > 0), m, mult)
  assert clean.dtype == np.float64
  search_broken = cert & (tol > 0)
  # Power check: PGD at that multiple of R (not certified) breaks those points.
  targets = np.isfinite(mult)
  res2 = pgd(
    padded,
    x,
    y,
    np.where(targets, mult, 1.0).astype(np.float32) * radius,
    jax.random.key(int(rng.integers(1000))),
  )
  broken_power = np.asarray(res2.success) & targets

  _report(
    "2_pgd",
    networks=1,
    classes=k,
    points=N_POINTS,
    certified=int(cert.sum()),
    pgd_runs_per_point=PGD_RESTARTS * (PAD_CLASSES - 1),
    pgd_steps=PGD_STEPS,
    pgd_violations=int(pgd_broken.sum()),
    search_points=int(cert.sum()) * N_ANGLES * N_RADII,
    search_violations=int(search_broken.sum()),
    search_strict_label_changes=int(np.sum(strict[cert])),
    search_min_margin_fraction=float(np.min(worst[cert] / clean[cert])) if cert.any() else None,
    power_targets=int(targets.sum()),
    power_targets_at_2R=int(np.sum(mult == 2)),
    pgd_power_broken=int(broken_power.sum()),
    pgd_min_margin_fraction=float(np.min(np.asarray(res.margin)[cert] / clean[cert]))
    if cert.any()
    else None,
  )
  assert not pgd_broken.any(), (layers, params, np.flatnonzero(pgd_broken))
  assert not search_broken.any(), (layers, params, np.flatnonzero(search_broken), worst)
  return int(targets.sum()), int(broken_power.sum())


# ------------------------------------------------------------------------- property 3

# Documented margin: a float32 radius may exceed the float64 radius of the same network
# and points by at most F32_RTOL relative plus F32_ATOL absolute.
F32_RTOL, F32_ATOL = 1e-4, 1e-6


@_settings(8)
@given(networks(max_layers=4, max_conv_layers=3))
def test_float32_radii_not_above_float64_radii(spec):
  layers, shape, seed, scale = spec
  for params, s, rng in _param_draws(layers, shape, seed, scale, n=2):
    x = rng.normal(size=(16, *shape)).astype(np.float32)
    fn = _certify_fn(layers, shape)
    y32, r32, _ = (np.asarray(a) for a in fn(params, None, x))
    with jax.enable_x64(True):
      p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
      y64, r64, _ = (np.asarray(a) for a in fn(p64, None, jnp.asarray(x, jnp.float64)))
    assert r32.dtype == np.float32 and r64.dtype == np.float64
    same = y32 == y64
    # A label flip needs a float32 margin within rounding of 0, i.e. a radius ~ 0.
    assert np.all(np.where(same, True, r32 <= F32_ATOL)), (r32, r64)
    over = same & (r32 > r64 * (1 + F32_RTOL) + F32_ATOL)
    rel = np.where(same, (r32 - r64) / np.maximum(r64, 1e-12), -np.inf)
    _report(
      "3_float32",
      networks=1,
      points=x.shape[0],
      label_flips=int((~same).sum()),
      violations=int(over.sum()),
      worst_rel_excess=float(rel.max()),
      worst_abs_excess=float(np.where(same, r32 - r64, -np.inf).max()),
    )
    assert not over.any(), (layers, shape, seed, s, r32[over], r64[over])
