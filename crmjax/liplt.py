"""Lipschitz upper bounds of deep networks: naive and LipLT (Fazlyab et al., NeurIPS 2023).

For a network in the form of paper eq. 17 (see ``crmjax.network``),

    x_{k+1} = H_k x_k + G_k phi_k(W_k x_k),   z = R x_L,   alpha_k <= phi_k' <= beta_k,

the loop transformation ``Hhat_k = H_k + c_k G_k W_k`` with ``c_k = (alpha_k + beta_k)/2``,
``r_k = (beta_k - alpha_k)/2`` gives Theorem 3.3 (eq. 19): ``m_e``, a bound on the Lipschitz
constant of ``x_0 -> W_e x_e``, obeys

    m_0 = ||W_0||,
    m_e = ||W_e Hhat_{e-1} .. Hhat_0|| + sum_{j<e} r_j ||W_e Hhat_{e-1} .. Hhat_{j+1} G_j|| m_j,

and the bound of ``c^T z`` is the same expression with ``W_e`` replaced by ``c^T R``. With
``c = e_i - e_j`` this is the pairwise bound ``L_ij`` of the margin ``z_i - z_j`` (eq. 5),
with ``c = e_i`` the per-class bound, and with the whole ``R`` the global bound.

How it is computed:

* The interior norms ``||W_e Hhat .. G_j||`` (the "table") are estimated by power iteration
  on ``A^T A``. All O(L^2) operators are pushed through the network in ONE sweep of depth
  L: at layer i, the vectors of every (start, end) pair in flight share the shape of
  ``x_i`` and go through ``W_i`` and ``Hhat_i`` as a single batched call. ``jax.vjp`` of
  that sweep gives all the transposes at once. The vectors are ``PowerState``: thread it
  through training steps (warm start) and 1 to 10 iterations per step suffice.
* The readout terms (class rows) are exact, no iteration: one ``jax.vjp`` of the network's
  linear part applied to the K basis vectors gives the rows ``e_k^T R Hhat..G_j``;
  pair norms follow from their Gram matrix, ``||a_i - a_j||^2 = G_ii + G_jj - 2 G_ij``.
* The recursion over ``m`` is one unit-lower-triangular solve.
* ``method='liplt_aol'``: LipLT of the network with its activations rescaled by the AOL
  diagonal (``crmjax.rescaling``; a valid bound for any positive rescaling, often tighter,
  not always). Same ``PowerState`` shapes as ``'liplt'``; the scales carry no gradient.
* ``norm='linf'``: the induced infinity norm (max absolute row sum). LipLT holds for any
  induced norm. Single dense/conv operators are exact; a chain ``A = A_n .. A_1`` is bounded
  by ``max(|A_n| .. |A_1| 1)`` (no iteration); class rows are exact (their l1 norms).

The power-iteration estimates are lower estimates of each interior norm: fine for training,
not for certificates. ``crmjax.certify`` replaces them by guaranteed upper bounds.

Every function here is pure (params and state in, values out) and works under ``jit``,
``grad`` and ``vmap``.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from flax import struct

from crmjax import operators as ops
from crmjax import rescaling
from crmjax.network import LipNet

Mode = Literal["pairwise", "per_class", "global"]
Norm = Literal["l2", "linf"]
Method = Literal["liplt", "naive", "liplt_aol"]
Solver = Literal["power", "lanczos"]
MODES = ("pairwise", "per_class", "global")
NORMS = ("l2", "linf")
# The paper's bounds (what reports, experiments and the property tests enumerate), and
# every method ``lipschitz_bound`` (so ``config.bound``) accepts.
METHODS = ("liplt", "naive")
ALL_METHODS = METHODS + ("liplt_aol",)

_TINY = 1e-30


@struct.dataclass
class PowerState:
  """Power-iteration vectors (right singular vector estimates), one row per operator.

  Attributes:
    liplt: tuple over starts ``t = 0..L-1``; entry ``t`` has shape
      ``(L - t, *shape_t)``: row ``e - t`` is the vector of ``A = W_e Hhat_{e-1} .. G_{t-1}``
      (``t = 0``: the input start, ``G_{-1} = I``, ``shape_0`` = the input shape;
      ``t >= 1``: ``shape_t`` = the shape of ``W_{t-1} x``), for ``e = t .. L-1``.
    naive: tuple over blocks of ``(u_W, u_G, u_H)``, each ``(1, *in_shape)`` or ``None``
      where the norm is known exactly (identity, reshape, absent).
  """

  liplt: tuple
  naive: tuple


def _start_shapes(net: LipNet) -> list[tuple[int, ...]]:
  return [net.input_shape] + [b.phi_shape for b in net.blocks]


def _needs_iteration(op) -> bool:
  return op is not None and not ops.is_isometry(op) and not isinstance(op, ops.Scale)


@functools.partial(jax.jit, static_argnums=1)
def _unit_rows(key: jax.Array, shapes: tuple[tuple[int, ...], ...]) -> list[jax.Array]:
  """Random unit rows of each shape, cut from one normal draw: one small program (a draw per
  shape compiles a threefry program per shape: 12 s of XLA:CPU compilation for 4C3F)."""
  sizes = [math.prod(s) for s in shapes]
  flat = jax.random.normal(key, (sum(sizes),), jnp.float32)
  ends = itertools.accumulate(sizes)
  return [_normalize_rows(flat[e - n : e].reshape(s)) for s, n, e in zip(shapes, sizes, ends)]


def init_state(net: LipNet, key: jax.Array) -> PowerState:
  """Random unit starting vectors for every operator norm that needs power iteration.

  Args:
    net: the network (only its shapes are read).
    key: a ``jax.random`` key.

  Returns:
    A ``PowerState`` (see its docstring for the shapes).
  """
  L = len(net.blocks)
  shapes = _start_shapes(net)
  liplt_shapes = [(L - t, *shapes[t]) for t in range(L)]
  naive_ops = [op for b in net.blocks for op in (b.W, b.G, b.H)]
  naive_shapes = [(1, *op.in_shape) for op in naive_ops if _needs_iteration(op)]
  rows = iter(_unit_rows(key, tuple(liplt_shapes + naive_shapes)))
  liplt = tuple(next(rows) for _ in liplt_shapes)
  naive = [next(rows) if _needs_iteration(op) else None for op in naive_ops]
  return PowerState(liplt=liplt, naive=tuple(tuple(naive[3 * i : 3 * i + 3]) for i in range(L)))


# ---------------------------------------------------------------------------- helpers


def _flat(v):
  return v.reshape(v.shape[0], -1)


def _safe_sqrt(x):
  return jnp.sqrt(jnp.maximum(x, _TINY))


def _row_norms(v):
  return _safe_sqrt(jnp.sum(jnp.square(_flat(v)), axis=-1))


def _per_row(s, v):
  return s.reshape((-1,) + (1,) * (v.ndim - 1))


def _normalize_rows(v):
  return v / _per_row(_row_norms(v), v)


def _gram_product(fn: Callable, us):
  """``A^T A`` of every row of every input: one call of the linear map ``fn`` and its vjp."""
  ys, vjp = jax.vjp(fn, us)
  return vjp(ys)[0]


def power_iterate(fn: Callable, us: Sequence[jax.Array], num_iters: int) -> tuple:
  """``num_iters`` steps of ``u <- A^T A u / ||A^T A u||`` for a batch of operators.

  Args:
    fn: a linear map from a tuple of arrays ``us[t]`` of shape ``(n_t, *in_t)`` to a tuple
      of outputs, where row ``r`` of each output depends only on one row of one input
      (so that rows are independent operators ``A_r``).
    us: the current vectors, unit rows.
    num_iters: number of iterations (static).

  Returns:
    The updated unit rows (gradients are stopped: they are state, not parameters).
  """
  us = tuple(jax.lax.stop_gradient(u) for u in us)

  def step(_, us):
    return tuple(_normalize_rows(w) for w in _gram_product(fn, us))

  # Unrolled for the few iterations of a training step (XLA fuses across them); a loop
  # for the many iterations of evaluation and tests (bounded compile time).
  unroll = num_iters if num_iters <= 16 else 1
  return jax.lax.stop_gradient(jax.lax.fori_loop(0, num_iters, step, us, unroll=unroll))


def _row_dot(a, b):
  return jnp.sum(_flat(a) * _flat(b), axis=-1)


def _reorthogonalised(w: jax.Array, basis: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
  """``(w - Q Q^T w, q_j^T w)``: the Lanczos residual of ``w = A^T A q_j`` (``q_j = basis[-1]``),
  with full reorthogonalisation done twice (float32), and the diagonal entry ``alpha_j``."""
  alpha = _row_dot(w, basis[-1])
  for _ in range(2):
    for q in basis:
      w = w - _per_row(_row_dot(w, q), w) * q
  return w, alpha


def _next_basis_vector(w: jax.Array, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(beta_j, q_{j+1})`` from the residual; a row whose Krylov space is exhausted (residual
  below ``1e-5 scale``) stops growing: ``beta = 0``, ``q = 0``."""
  beta = _row_norms(w)
  keep = beta > 1e-5 * jnp.maximum(scale, _TINY)
  q = jnp.where(_per_row(keep, w), w / _per_row(beta, w), 0.0)
  return jnp.where(keep, beta, 0.0), q


def _ritz_step(basis, alphas, betas, w) -> jax.Array:
  """The unit top Ritz vector of ``T_k`` in the basis, advanced by one power step:
  ``A^T A Q y = theta Q y + y_k w`` (``w`` the last residual; no further product)."""
  tri = jax.vmap(jnp.diag)(jnp.stack(alphas, -1))
  if betas:
    off = jnp.stack(betas, -1)
    tri = tri + jax.vmap(lambda x: jnp.diag(x, 1) + jnp.diag(x, -1))(off)
  theta, vecs = jnp.linalg.eigh(tri)
  y = vecs[:, :, -1]  # (rows, k): each row's top eigenvector of T_k
  ritz = sum(_per_row(y[:, j], q) * q for j, q in enumerate(basis))
  v = _per_row(theta[:, -1], w) * ritz + _per_row(y[:, -1], w) * w
  n = _row_norms(v)
  return jnp.where(_per_row(n > 1e3 * _TINY, v), v / _per_row(n, v), basis[0])


def lanczos_iterate(fn: Callable, us: Sequence[jax.Array], num_iters: int) -> tuple:
  """``num_iters`` steps of Lanczos on ``A^T A`` from warm unit rows, for a batch of operators.

  The same ``num_iters`` products with ``A^T A`` as ``power_iterate``, a better vector: row
  ``r``'s result is the top Ritz vector of the Krylov space ``span(u, .., (A^T A)^{k-1} u)``
  (Golub & Van Loan, *Matrix Computations*, 4th ed., sec. 10.1; full reorthogonalisation),
  advanced by the one power step that the k-th product pays for. Its Rayleigh quotient is
  at least the power iteration's from the same rows in exact arithmetic, and it converges
  as ``(1 - 2 sqrt(gap))^{2k}`` rather than ``(1 - gap)^{2k}`` for a relative eigen-gap
  ``gap``: the few products of a training step track a top singular vector that the weight
  updates move. ``num_iters=1`` is one power iteration. Like the power iteration's, its
  estimate ``||A u||`` is a lower estimate of ``||A||`` (certificates use
  ``crmjax.soundness``).

  Args:
    fn, us, num_iters: as ``power_iterate``; the loop is unrolled (a few iterations).

  Returns:
    The updated unit rows (gradients stopped).
  """
  us = tuple(_normalize_rows(jax.lax.stop_gradient(u)) for u in us)
  if num_iters < 1:
    return us

  bases, alphas, betas = [[u] for u in us], [[] for _ in us], [[] for _ in us]
  for j in range(num_iters):
    ws = _gram_product(fn, tuple(b[j] for b in bases))
    residuals = []
    for t, w in enumerate(ws):
      w, alpha = _reorthogonalised(w, bases[t])
      alphas[t].append(alpha)
      residuals.append(w)
      if j + 1 < num_iters:
        beta, q = _next_basis_vector(w, alphas[t][0])
        betas[t].append(beta)
        bases[t].append(q)
  out = tuple(_ritz_step(*a) for a in zip(bases, alphas, betas, residuals))
  return jax.lax.stop_gradient(out)


SOLVERS = {"power": power_iterate, "lanczos": lanczos_iterate}
MAX_LANCZOS_ITERS = 16  # the training configs' limit: the loop is unrolled, its basis kept


# ------------------------------------------------------------------- the LipLT table


def table_sweep(net: LipNet, us: Sequence[jax.Array]) -> list[jax.Array]:
  """Applies every interior operator ``A_{t,e} = W_e Hhat_{e-1} .. Hhat_t G_{t-1}`` at once.

  One pass over the layers (sequential depth L): at layer ``i`` the in-flight vectors form
  an array ``(L - i, i + 1, *x_i shape)`` (ends ``e >= i`` by starts ``t <= i``) that goes
  through ``W_i`` and ``Hhat_i`` as one batched call; the start ``t = i + 1`` joins as
  ``G_i u``.

  Args:
    net: the network.
    us: ``PowerState.liplt``-shaped vectors (any values: the map is linear).

  Returns:
    A list over ends ``e = 0..L-1`` of arrays ``(e + 1, *phi_shape_e)``; row ``t`` is
    ``A_{t,e} us[t][e - t]``.
  """
  L = len(net.blocks)
  x = us[0][:, None]
  outs = []
  for i, b in enumerate(net.blocks):
    wx = b.W(x)
    outs.append(wx[0])
    if i + 1 < L:
      x = jnp.concatenate([b.hhat(x[1:], wx[1:]), b.g(us[i + 1])[:, None]], axis=1)
  return outs


def _table_matrix(outs: Sequence[jax.Array], reduce: Callable) -> jax.Array:
  """Packs per-end outputs into the lower-triangular ``(L, L)`` table ``B[e, t]``."""
  L = len(outs)
  rows = [jnp.pad(reduce(o), (0, L - o.shape[0])) for o in outs]
  return jnp.stack(rows)


def interior_table(
  net: LipNet,
  state: PowerState | None = None,
  *,
  norm: Norm = "l2",
  num_iters: int = 1,
  solver: Solver = "power",
) -> tuple[jax.Array, PowerState | None]:
  """The table ``B[e, t] = ||W_e Hhat_{e-1} .. Hhat_t G_{t-1}||`` of eq. 19.

  Args:
    net: the network.
    state: power-iteration vectors (``norm='l2'``); ``None`` for ``norm='linf'``.
    norm: ``'l2'`` (power iteration, a lower estimate that converges to the norm) or
      ``'linf'`` (a guaranteed upper bound, exact for single operators).
    num_iters: iterations this call (``l2`` only): products with ``A^T A`` per operator.
    solver: ``'power'`` (``power_iterate``) or ``'lanczos'`` (``lanczos_iterate``: the same
      cost per iteration, closer estimates from the same warm vectors).

  Returns:
    ``B`` of shape ``(L, L)``, zero above the diagonal (column 0 is the input start), and
    the updated state.
  """
  if norm == "linf":
    ones = [jnp.ones((len(net.blocks) - t, *s)) for t, s in enumerate(_start_shapes(net)[:-1])]
    outs = table_sweep(net.abs(), ones)
    return _table_matrix(outs, lambda o: jnp.max(_flat(o), axis=-1)), state
  frozen = jax.lax.stop_gradient(net)  # the iteration is state: no gradient through it
  us = SOLVERS[solver](lambda u: table_sweep(frozen, u), state.liplt, num_iters)
  outs = table_sweep(net, us)
  return _table_matrix(outs, _row_norms), state.replace(liplt=us)


def interior_bounds(table: jax.Array, radii: jax.Array) -> jax.Array:
  """Solves eq. 19 for ``m_0..m_{L-1}``: ``m_e = B[e,0] + sum_{j<e} r_j B[e,j+1] m_j``.

  Args:
    table: ``(L, L)`` lower-triangular table from ``interior_table``.
    radii: ``(L,)`` the ``(beta_j - alpha_j)/2`` of each block.

  Returns:
    ``m`` of shape ``(L,)``.
  """
  L = table.shape[0]
  inner = jnp.tril(jnp.pad(table[:, 1:], ((0, 0), (0, 1))), k=-1) * radii[None, :]
  return jax.scipy.linalg.solve_triangular(
    jnp.eye(L) - inner, table[:, 0], lower=True, unit_diagonal=True
  )


# ------------------------------------------------------------------- exact class rows


def class_rows(net: LipNet) -> list[jax.Array]:
  """The exact rows ``e_k^T R Hhat_{L-1} .. Hhat_t G_{t-1}`` for every class k and start t.

  One ``jax.vjp`` of the linear part of the network applied to K rows, with the K basis
  vectors as cotangents (no power iteration: these operators have K rows).

  Returns:
    A list over starts ``t = 0..L`` of arrays ``(K, n_t)``.
  """

  def linear_part(x0, vs):
    x = x0
    for b, v in zip(net.blocks, vs):
      x = b.hhat(x) + b.g(v)
    return net.readout(x)

  # One vjp of the part applied to K independent rows (operators take leading batch axes),
  # with the identity as cotangent: row k of each input gradient is e_k^T of its operator.
  # (A ``jax.vmap`` of the vjp gives the same rows, but its gradient batches each kernel
  # gradient over k: grouped convolutions, several times slower on XLA:CPU.)
  K = net.num_classes
  shapes = _start_shapes(net)
  x0 = jnp.zeros((K, *shapes[0]))
  vs = tuple(jnp.zeros((K, *s)) for s in shapes[1:])
  _, vjp = jax.vjp(linear_part, x0, vs)
  gx0, gvs = vjp(jnp.eye(K, dtype=x0.dtype))
  return [_flat(gx0)] + [_flat(g) for g in gvs]


def row_norms(rows: jax.Array, *, mode: Mode = "pairwise", norm: Norm = "l2") -> jax.Array:
  """The norm of ``c^T A`` for the rows ``(K, n)`` of ``A``: pairs, classes or all of ``A``.

  Args:
    rows: ``(K, n)``, row k is ``e_k^T A``.
    mode: ``'pairwise'`` -> ``(K, K)`` with ``||rows_i - rows_j||`` (zero diagonal);
      ``'per_class'`` -> ``(K,)``; ``'global'`` -> ``()``, the induced norm of ``A``.
    norm: ``'l2'`` (pairs via the Gram matrix, global via its top eigenvalue) or ``'linf'``
      (l1 norms of rows; global = largest row l1 norm).
  """
  K = rows.shape[0]
  if norm == "l2":
    gram = jnp.matmul(rows, rows.T, precision=jax.lax.Precision.HIGHEST)
    d = jnp.diagonal(gram)
    if mode == "per_class":
      return _safe_sqrt(d)
    if mode == "global":
      return _safe_sqrt(jnp.linalg.eigvalsh(gram)[-1])
    sq = d[:, None] + d[None, :] - 2.0 * gram
    return jnp.where(jnp.eye(K, dtype=bool), 0.0, _safe_sqrt(sq))
  l1 = jnp.sum(jnp.abs(rows), axis=-1)
  if mode == "per_class":
    return l1
  if mode == "global":
    return jnp.max(l1)
  return jax.lax.map(lambda r: jnp.sum(jnp.abs(r[None, :] - rows), axis=-1), rows)


# ------------------------------------------------------------------------ the bounds


def _check(method, mode, norm, solver="power"):
  if method not in ALL_METHODS:
    raise ValueError(f"method must be one of {ALL_METHODS}, got {method!r}")
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if norm not in NORMS:
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
  if solver not in SOLVERS:
    raise ValueError(f"solver must be one of {tuple(SOLVERS)}, got {solver!r}")


def _radii(net: LipNet) -> jax.Array:
  return jnp.asarray([b.radius for b in net.blocks], jnp.float32)


def liplt_bound(
  net: LipNet,
  state: PowerState | None = None,
  *,
  mode: Mode = "pairwise",
  norm: Norm = "l2",
  num_iters: int = 1,
  solver: Solver = "power",
) -> tuple[jax.Array, PowerState | None]:
  """The LipLT bound (paper Theorem 3.3, eq. 19) of the network's logits.

  Args:
    net: the network in eq. 17 form (``crmjax.network.from_layers``); differentiable.
    state: power-iteration vectors from ``init_state`` (``l2``; threaded through training
      steps for a warm start). ``None`` starts from ``init_state(net, jax.random.key(0))``.
    mode: ``'pairwise'`` -> ``(K, K)`` symmetric ``L_ij`` bounding ``z_i - z_j``, zero
      diagonal; ``'per_class'`` -> ``(K,)`` bounding each ``z_i``; ``'global'`` -> ``()``
      bounding the whole logit map.
    norm: ``'l2'`` or ``'linf'`` (induced norms on input and output).
    num_iters: iterations for the interior norms this call.
    solver: ``'power'`` or ``'lanczos'`` (``interior_table``).

  Returns:
    ``(bound, new_state)``.
  """
  _check("liplt", mode, norm, solver)
  if norm == "l2" and state is None:
    state = init_state(net, jax.random.key(0))
  if net.blocks:
    table, state = interior_table(net, state, norm=norm, num_iters=num_iters, solver=solver)
    m = interior_bounds(table, _radii(net))
  else:
    m = jnp.zeros((0,))
  return readout_bound(net, m, mode=mode, norm=norm), state


def readout_bound(
  net: LipNet, m: jax.Array, *, mode: Mode = "pairwise", norm: Norm = "l2"
) -> jax.Array:
  """The last step of eq. 19: ``||c^T R Hhat..Hhat_0|| + sum_j r_j ||c^T R Hhat..G_j|| m_j``.

  Args:
    net: the network.
    m: ``(L,)`` the interior bounds (``interior_bounds``).
    mode, norm: as ``liplt_bound`` (the class rows are exact).

  Returns:
    The bound, ``(K, K)``, ``(K,)`` or ``()`` by ``mode``.
  """
  norms = jnp.stack([row_norms(r, mode=mode, norm=norm) for r in class_rows(net)])
  weights = jnp.concatenate([jnp.ones((1,)), _radii(net) * m])
  return jnp.tensordot(weights, norms, axes=1)


def layer_norms(
  net: LipNet,
  state: PowerState | None = None,
  *,
  norm: Norm = "l2",
  num_iters: int = 1,
  solver: Solver = "power",
) -> tuple[jax.Array, PowerState | None]:
  """Per-block norms ``(L, 3)``: ``||W_k||``, ``||G_k||`` (1 if absent), ``||H_k||`` (0 if absent)."""
  if norm == "l2" and state is None:
    state = init_state(net, jax.random.key(0))
  ops_ = [(b.W, b.G, b.H) for b in net.blocks]
  if norm == "linf":
    vals = [
      [
        jnp.float32(1.0 if j == 1 else 0.0)
        if op is None
        else jnp.max(op.abs()(jnp.ones(op.in_shape)))
        for j, op in enumerate(t)
      ]
      for t in ops_
    ]
    return _stack2(vals, len(ops_)), state
  flat = [(i, j, op) for i, t in enumerate(ops_) for j, op in enumerate(t) if _needs_iteration(op)]
  frozen = jax.lax.stop_gradient([op for _, _, op in flat])
  us = SOLVERS[solver](
    lambda u: tuple(op(v) for op, v in zip(frozen, u)),
    tuple(state.naive[i][j] for i, j, _ in flat),
    num_iters,
  )
  found = {(i, j): _row_norms(op(u))[0] for (i, j, op), u in zip(flat, us)}
  new = [list(t) for t in state.naive]
  for (i, j, _), u in zip(flat, us):
    new[i][j] = u

  def exact(op, j):
    if op is None:
      return jnp.float32(1.0 if j == 1 else 0.0)
    if isinstance(op, ops.Scale):
      return jnp.max(jnp.abs(op.scale))
    return jnp.float32(1.0)  # isometry

  vals = [
    [found[(i, j)] if (i, j) in found else exact(op, j) for j, op in enumerate(t)]
    for i, t in enumerate(ops_)
  ]
  return _stack2(vals, len(ops_)), state.replace(naive=tuple(tuple(t) for t in new))


def _stack2(vals, n):
  if not n:
    return jnp.zeros((0, 3), jnp.float32)
  return jnp.stack([jnp.stack([jnp.asarray(v, jnp.float32) for v in row]) for row in vals])


def naive_bound(
  net: LipNet,
  state: PowerState | None = None,
  *,
  mode: Mode = "pairwise",
  norm: Norm = "l2",
  num_iters: int = 1,
  solver: Solver = "power",
) -> tuple[jax.Array, PowerState | None]:
  """The naive bound: ``||c^T R|| * prod_k (||H_k|| + s_k ||G_k|| ||W_k||)``.

  ``s_k = max(|alpha_k|, |beta_k|)``. For a feed-forward network (H = 0, G = I) this is the
  product of layer norms, and pairwise it is ``||(e_i - e_j)^T W_last||`` times the product
  of the earlier layers' norms (the paper's naive baseline). Same arguments and returns as
  ``liplt_bound``.
  """
  _check("naive", mode, norm, solver)
  norms, state = layer_norms(net, state, norm=norm, num_iters=num_iters, solver=solver)
  slopes = jnp.asarray([max(abs(b.alpha), abs(b.beta)) for b in net.blocks], jnp.float32)
  factor = jnp.prod(norms[:, 2] + slopes * norms[:, 1] * norms[:, 0])
  rows = class_rows(LipNet((), net.readout))[0]
  return row_norms(rows, mode=mode, norm=norm) * factor, state


def liplt_aol_bound(
  net: LipNet,
  state: PowerState | None = None,
  *,
  mode: Mode = "pairwise",
  norm: Norm = "l2",
  num_iters: int = 1,
  solver: Solver = "power",
) -> tuple[jax.Array, PowerState | None]:
  """``liplt_bound`` of ``rescaling.rescale(net, rescaling.aol_scales(net))``.

  A valid bound of ``net`` (Theorem 3.3 holds for every positive diagonal rescaling of the
  activations, ``crmjax.rescaling``); the AOL scales (Theorem 3.2's ``T^{1/2}``) are a
  heuristic choice. The rescaled network has the same shapes, so the same ``PowerState``;
  gradients flow into the weights, not into the scales. Same arguments and returns as
  ``liplt_bound``.
  """
  scaled = rescaling.rescale(net, rescaling.aol_scales(net))
  return liplt_bound(scaled, state, mode=mode, norm=norm, num_iters=num_iters, solver=solver)


def lipschitz_bound(
  net: LipNet,
  state: PowerState | None = None,
  *,
  method: Method = "liplt",
  mode: Mode = "pairwise",
  norm: Norm = "l2",
  num_iters: int = 1,
  solver: Solver = "power",
) -> tuple[jax.Array, PowerState | None]:
  """``liplt_bound``, ``naive_bound`` or ``liplt_aol_bound`` by name (``method``)."""
  _check(method, mode, norm, solver)
  fn = {"liplt": liplt_bound, "naive": naive_bound, "liplt_aol": liplt_aol_bound}[method]
  return fn(net, state, mode=mode, norm=norm, num_iters=num_iters, solver=solver)


def as_pairwise(
  bound: jax.Array, *, mode: Mode, num_classes: int | None = None, norm: Norm = "l2"
) -> jax.Array:
  """A ``(K, K)`` pairwise matrix (zero diagonal) from a bound of any mode.

  ``per_class``: ``L_ij = L_i + L_j`` (triangle inequality). ``global`` (needs
  ``num_classes``): ``sqrt(2) L`` in l2 (``||e_i - e_j||_2 = sqrt(2)``) and ``2 L`` in linf
  (each row's l1 norm is at most ``L``).
  """
  if mode == "pairwise":
    return bound
  if mode == "per_class":
    eye = jnp.eye(bound.shape[0], dtype=bool)
    return jnp.where(eye, 0.0, bound[:, None] + bound[None, :])
  if num_classes is None:
    raise ValueError("as_pairwise(mode='global') needs num_classes=K")
  factor = jnp.sqrt(2.0) if norm == "l2" else 2.0
  return jnp.where(jnp.eye(num_classes, dtype=bool), 0.0, factor * bound)
