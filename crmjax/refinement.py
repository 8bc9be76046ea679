"""The l2 refinement of the one-layer LipLT bound (paper Theorem 3.2), and its multi-layer use.

For one layer ``h(x) = H x + G phi(W x)`` with ``alpha <= phi' <= beta``, ``c = (alpha +
beta)/2``, ``r = (beta - alpha)/2``, and any diagonal ``T`` with ``G^T G <= T``:

    Lip(h) <= ||H + c G W|| + r ||W^T T W||^{1/2}                     (Theorem 3.2)

(``h(x) - h(y) = (H + c G W) dx + G delta`` with ``|delta_i| <= r |(W dx)_i|``, and
``||G delta||^2 <= delta^T T delta <= r^2 ||T^{1/2} W dx||^2``.) Choices of ``T``:

* ``'spectral'``: ``T = ||G||^2 I`` -- exactly the plain LipLT one-layer bound
  ``||H + c G W|| + r ||G|| ||W||``;
* ``'aol'``: ``T_ii = sum_j |G^T G|_ij`` (diagonal dominance);
* ``'sll'``: ``T_ii = sum_j |G^T G|_ij q_j / q_i`` for any ``q > 0`` (``q = 1`` is AOL);
* ``'sdp'``: the best diagonal ``T`` (a small SDP, needs ``cvxpy``; host side).

The matrix functions take explicit dense matrices in the ``(out, in)`` convention (``W (m,
n)``, ``G (p, m)``, ``H (p, n)``; ``G = None`` is ``I``, ``H = None`` is ``0``), are pure
``jax.numpy`` (differentiable; float64 when x64 is on) except ``t_sdp``.

Multi-layer use (``rescale``, ``refined_liplt_bound``, ``optimize_scales``): for a positive
diagonal ``D_k``, ``G_k phi(W_k x) = (G_k D_k^{-1}) psi(D_k W_k x)`` with ``psi_i(u) = d_i
phi(u / d_i)``, which has the same slope bounds ``[alpha_k, beta_k]``. So Theorem 3.3 (eq.
19) applied to the network with ``W_k <- D_k W_k``, ``G_k <- G_k D_k^{-1}`` (``Hhat_k``
unchanged) is a valid bound of the original network for EVERY ``D_k > 0`` (``crmjax.rescaling``
has the argument); with one layer and ``D = T^{1/2}``, ``G^T G <= T`` it is at most the
Theorem 3.2 bound (``||G T^{-1/2}|| <= 1``). ``refined_liplt_bound`` picks ``D_k = T_k^{1/2}``
with ``T_k`` the AOL / SLL diagonal of the operator that reads ``phi_k`` (``G_k``, or for a
feed-forward block the next block's ``W``, or the readout): a heuristic, sometimes worse than
plain LipLT. ``optimize_scales`` minimises the bound itself over ``log D`` (Adam) and keeps
the best of plain LipLT (``D = I``), AOL and the optimised iterate. Soundness does not depend
on the choice of ``D``, tightness does.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from crmjax import liplt, rescaling, soundness
from crmjax import operators as ops
from crmjax.network import LipNet

TChoice = Literal["spectral", "aol", "sll", "sdp"]
T_CHOICES = ("spectral", "aol", "sll", "sdp")
_HI = jax.lax.Precision.HIGHEST
_TINY = 1e-30


def _mm(a, b):
  return jnp.matmul(a, b, precision=_HI)


def _g(G, m, dtype):
  return jnp.eye(m, dtype=dtype) if G is None else jnp.asarray(G)


def t_spectral(G: jax.Array) -> jax.Array:
  """``T = ||G||_2^2 I``: ``(m,)`` for ``G (p, m)``."""
  G = jnp.asarray(G)
  return jnp.full((G.shape[1],), jnp.linalg.norm(G, 2) ** 2, G.dtype)


def t_aol(G: jax.Array) -> jax.Array:
  """AOL: ``T_ii = sum_j |G^T G|_ij`` (``(m,)``); ``G^T G <= T`` by Gershgorin."""
  G = jnp.asarray(G)
  return jnp.sum(jnp.abs(_mm(G.T, G)), axis=1)


def t_sll(G: jax.Array, q: jax.Array) -> jax.Array:
  """SLL: ``T_ii = sum_j |G^T G|_ij q_j / q_i`` for positive ``q (m,)``."""
  G = jnp.asarray(G)
  return _mm(jnp.abs(_mm(G.T, G)), q) / q


def t_sdp(W, G, *, solver: str | None = None) -> np.ndarray:
  """The diagonal ``T >= G^T G`` minimising ``||W^T T W||`` (an SDP; float64 numpy).

  ``min lam  s.t.  diag(t) - G^T G >= 0,  W^T diag(t) W <= lam I``. The solver's ``t`` is
  then shifted by ``max(0, -lambda_min(diag(t) - G^T G))`` so ``G^T G <= T`` holds exactly
  (up to float64 eigenvalue accuracy) whatever the solver's tolerance.
  """
  import cvxpy as cp  # optional dependency (the ``dev`` extra)

  W = np.asarray(W, np.float64)
  G = np.eye(W.shape[0]) if G is None else np.asarray(G, np.float64)
  gram = G.T @ G
  gram = 0.5 * (gram + gram.T)
  m = W.shape[0]
  t, lam = cp.Variable(m), cp.Variable()
  wtw = W.T @ cp.diag(t) @ W
  cons = [cp.diag(t) - gram >> 0, lam * np.eye(W.shape[1]) - 0.5 * (wtw + wtw.T) >> 0]
  cp.Problem(cp.Minimize(lam), cons).solve(solver=solver or _default_solver())
  tv = np.asarray(t.value, np.float64)
  gap = np.linalg.eigvalsh(np.diag(tv) - gram).min()
  return tv + max(0.0, -gap) * (1 + 1e-9) + 1e-12 * np.abs(tv).max()


def _default_solver():
  import cvxpy as cp

  return cp.CLARABEL if cp.CLARABEL in cp.installed_solvers() else cp.SCS


def choose_t(W, G=None, *, t_choice: TChoice = "aol", q=None) -> jax.Array:
  """The diagonal of ``T`` (``(m,)``) for ``t_choice``; ``G = None`` means ``I``."""
  W = jnp.asarray(W)
  Gm = _g(G, W.shape[0], W.dtype)
  if t_choice == "spectral":
    return t_spectral(Gm)
  if t_choice == "aol":
    return t_aol(Gm)
  if t_choice == "sll":
    return t_sll(Gm, jnp.ones((W.shape[0],), W.dtype) if q is None else jnp.asarray(q))
  if t_choice == "sdp":
    return jnp.asarray(t_sdp(W, G))
  raise ValueError(f"t_choice must be one of {T_CHOICES}, got {t_choice!r}")


def hhat(W, G=None, H=None, alpha: float = 0.0, beta: float = 1.0) -> jax.Array:
  """``H + (alpha + beta)/2 G W``: ``(p, n)``."""
  W = jnp.asarray(W)
  y = 0.5 * (alpha + beta) * (W if G is None else _mm(jnp.asarray(G), W))
  return y if H is None else y + jnp.asarray(H)


def layer_bound(
  W,
  G=None,
  H=None,
  alpha: float = 0.0,
  beta: float = 1.0,
  *,
  t_choice: TChoice = "aol",
  q=None,
  t=None,
) -> jax.Array:
  """Theorem 3.2: ``||H + c G W|| + r ||W^T T W||^{1/2}`` for one layer.

  Args:
    W: ``(m, n)``; G: ``(p, m)`` or ``None`` (``I``); H: ``(p, n)`` or ``None`` (``0``).
    alpha, beta: slope bounds of ``phi``.
    t_choice: ``'spectral'`` (= plain LipLT), ``'aol'``, ``'sll'`` (with ``q``), ``'sdp'``.
    q: ``(m,)`` positive SLL weights (default ones).
    t: an explicit diagonal ``(m,)`` with ``G^T G <= diag(t)`` (overrides ``t_choice``).

  Returns:
    A scalar upper bound on the l2 Lipschitz constant of ``h``.
  """
  W = jnp.asarray(W)
  t = choose_t(W, G, t_choice=t_choice, q=q) if t is None else jnp.asarray(t)
  r = 0.5 * (beta - alpha)
  scaled = jnp.sqrt(jnp.maximum(t, 0.0))[:, None] * W
  return jnp.linalg.norm(hhat(W, G, H, alpha, beta), 2) + r * jnp.linalg.norm(scaled, 2)


def plain_layer_bound(W, G=None, H=None, alpha: float = 0.0, beta: float = 1.0) -> jax.Array:
  """Plain LipLT for one layer: ``||H + c G W|| + r ||G|| ||W||`` (eq. 19, ``L = 1``)."""
  W = jnp.asarray(W)
  nG = 1.0 if G is None else jnp.linalg.norm(jnp.asarray(G), 2)
  return jnp.linalg.norm(hhat(W, G, H, alpha, beta), 2) + 0.5 * (
    beta - alpha
  ) * nG * jnp.linalg.norm(W, 2)


# ------------------------------------------------------------- multi-layer (LipNet)


def refined_scales(net: LipNet, *, t_choice: TChoice = "aol") -> list[jax.Array | None]:
  """``D_k = T_k^{1/2}`` per block, ``T_k`` the AOL diagonal of the operator reading ``phi_k``.

  That operator is ``G_k``; for ``G_k = I`` (feed-forward) it is the next block's ``W``
  (or the readout). ``t_choice='spectral'`` returns ``None``s (a scalar ``D`` changes
  nothing); ``'sll'`` with its default ``q = 1`` is ``'aol'``. Any positive ``D`` is
  sound; this is a heuristic for tightness (``rescaling.aol_scales``).
  """
  if t_choice == "spectral":
    return [None] * len(net.blocks)
  if t_choice not in ("aol", "sll"):
    raise ValueError(f"refined_scales supports 'spectral', 'aol', 'sll'; got {t_choice!r}")
  return rescaling.aol_scales(net)


def refined_liplt_bound(
  net: LipNet,
  state: liplt.PowerState | None = None,
  *,
  t_choice: TChoice = "aol",
  mode: liplt.Mode = "pairwise",
  num_iters: int = 1,
) -> tuple[jax.Array, liplt.PowerState | None]:
  """LipLT (eq. 19, l2) of ``rescale(net, refined_scales(net))``: a valid bound of ``net``.

  Same state / shapes as ``liplt.liplt_bound`` (the rescaled net has the same shapes).
  """
  return liplt.liplt_bound(
    rescaling.rescale(net, refined_scales(net, t_choice=t_choice)),
    state,
    mode=mode,
    norm="l2",
    num_iters=num_iters,
  )


# ------------------------------------------------------------- optimised scales

Init = Literal["aol", "ones"]
Norms = Literal["auto", "exact", "power"]
Evaluate = Literal["objective", "sound"]
INITS = ("aol", "ones")
NORM_CHOICES = ("auto", "exact", "power")
EXACT_MAX_SIZE = 1 << 22  # 'auto': materialise interior operators up to this many entries


def reduce_bound(bound: jax.Array, *, mode: liplt.Mode) -> jax.Array:
  """The scalar objective of a bound: mean off-diagonal ``L_ij`` (``(K, K)``, zero diagonal),
  mean ``L_i`` (``(K,)``) or ``L`` itself (``()``)."""
  if mode == "pairwise":
    K = bound.shape[0]
    return jnp.sum(bound) / (K * (K - 1))
  return jnp.mean(bound)


def _top_singular_value(mat: jax.Array) -> jax.Array:
  """``||mat||_2 = sqrt(v^T (M M^T) v)``, ``v`` the top eigenvector of the smaller Gram matrix.

  ``v`` carries no gradient (envelope theorem: the gradient of the top eigenvalue is
  ``v v^T``), so no eigenvector derivative, whose ``1 / (lambda_i - lambda_j)`` is infinite
  for the repeated (zero) eigenvalues that dead ReLU units produce.
  """
  gram = _mm(mat, mat.T) if mat.shape[0] <= mat.shape[1] else _mm(mat.T, mat)
  v = jnp.linalg.eigh(jax.lax.stop_gradient(gram))[1][:, -1]
  return jnp.sqrt(jnp.maximum(jnp.dot(v, _mm(gram, v), precision=_HI), _TINY))


def exact_liplt_bound(net: LipNet, *, mode: liplt.Mode = "pairwise") -> jax.Array:
  """Theorem 3.3 (eq. 19, l2) with every interior norm exact, for small networks.

  Each ``A_{t,e} = W_e Hhat_{e-1} .. G_{t-1}`` is materialised (applied to the basis of
  its input side, ``soundness.interior_operator``) and its norm is the square root of the
  top eigenvalue of its Gram matrix; class rows are exact as in ``liplt.liplt_bound``.
  Pure and differentiable (float32; no power-iteration state). Memory: the largest
  ``n_in x n_out`` operator. Returns ``(K, K)``, ``(K,)`` or ``()`` by ``mode``.
  """
  L = len(net.blocks)
  table = jnp.zeros((L, L), jnp.float32)
  for e in range(L):
    for t in range(e + 1):
      fn, s_in, _ = soundness.interior_operator(net, t, e)
      n = ops.size(s_in)
      mat = fn(jnp.eye(n, dtype=jnp.float32).reshape(n, *s_in)).reshape(n, -1)  # A^T
      table = table.at[e, t].set(_top_singular_value(mat))
  radii = jnp.asarray([b.radius for b in net.blocks], jnp.float32)
  m = liplt.interior_bounds(table, radii) if L else jnp.zeros((0,))
  return liplt.readout_bound(net, m, mode=mode, norm="l2")


def _resolve_norms(net: LipNet, norms: Norms) -> str:
  if norms not in NORM_CHOICES:
    raise ValueError(f"norms must be one of {NORM_CHOICES}, got {norms!r}")
  if norms != "auto":
    return norms
  sizes = [
    ops.size(soundness.interior_operator(net, t, e)[1]) * ops.size(b.phi_shape)
    for e, b in enumerate(net.blocks)
    for t in range(e + 1)
  ]
  return "exact" if max(sizes, default=0) <= EXACT_MAX_SIZE else "power"


def log_scales_bound(
  net: LipNet,
  log_d: list[jax.Array],
  state: liplt.PowerState | None = None,
  *,
  mode: liplt.Mode = "pairwise",
  norms: Literal["exact", "power"] = "power",
  num_iters: int = 1,
) -> tuple[jax.Array, liplt.PowerState | None]:
  """``reduce_bound`` of the l2 LipLT bound (eq. 19) of ``rescale(net, exp(log_d))``.

  Args:
    net: the network.
    log_d: one array per block, block k's ``phi_shape``: ``log D_k``.
    state: ``liplt.PowerState`` of ``net`` (the rescaled net has the same shapes);
      ``norms='power'`` only.
    mode: as ``liplt.liplt_bound``.
    norms: ``'power'`` (``liplt.liplt_bound``, ``num_iters`` warm-started iterations: a
      lower estimate of each norm) or ``'exact'`` (``exact_liplt_bound``).
    num_iters: power iterations this call.

  Returns:
    ``(scalar, new_state)``, differentiable in ``log_d`` (power vectors are state: the
    gradient is that of the norms at the current singular vectors).
  """
  scaled = rescaling.rescale(net, [jnp.exp(l) for l in log_d])
  if norms == "exact":
    return reduce_bound(exact_liplt_bound(scaled, mode=mode), mode=mode), state
  bound, state = liplt.liplt_bound(scaled, state, mode=mode, norm="l2", num_iters=num_iters)
  return reduce_bound(bound, mode=mode), state


def scales_step(
  net: LipNet,
  log_d: list[jax.Array],
  opt_state: optax.OptState,
  state: liplt.PowerState | None,
  *,
  tx: optax.GradientTransformation,
  mode: liplt.Mode = "pairwise",
  norms: Literal["exact", "power"] = "power",
  num_iters: int = 1,
) -> tuple:
  """One optimiser step on ``log D`` (pure, jit-able).

  Returns:
    ``(new_log_d, new_opt_state, new_state, value)``: ``value`` is ``log_scales_bound`` at
    the INPUT ``log_d``.
  """
  (value, state), grads = jax.value_and_grad(log_scales_bound, argnums=1, has_aux=True)(
    net, log_d, state, mode=mode, norms=norms, num_iters=num_iters
  )
  updates, opt_state = tx.update(grads, opt_state, log_d)
  return optax.apply_updates(log_d, updates), opt_state, state, value


@functools.partial(jax.jit, static_argnames=("steps", "mode", "norms", "num_iters", "warmup_iters"))
def _descend(net, log_d, state, learning_rate, *, steps, mode, norms, num_iters, warmup_iters):
  """``steps`` Adam steps (``lax.scan``); the best iterate by the per-step objective."""
  tx = optax.adam(learning_rate)
  if norms == "power" and warmup_iters:  # converge at the start point (early estimates low)
    _, state = log_scales_bound(net, log_d, state, mode=mode, num_iters=warmup_iters)

  def body(carry, _):
    log_d, opt_state, state, best_value, best = carry
    new, opt_state, state, value = scales_step(
      net, log_d, opt_state, state, tx=tx, mode=mode, norms=norms, num_iters=num_iters
    )
    better = value < best_value  # False for NaN: a diverged iterate is never kept
    best = jax.tree.map(lambda a, b: jnp.where(better, a, b), log_d, best)
    return (new, opt_state, state, jnp.where(better, value, best_value), best), value

  carry = (log_d, tx.init(log_d), state, jnp.asarray(jnp.inf, jnp.float32), log_d)
  (_, _, state, _, best), history = jax.lax.scan(body, carry, None, length=steps)
  return best, state, history


@functools.partial(jax.jit, static_argnames=("mode", "norms", "num_iters"))
def _objectives(net, log_ds, state, *, mode, norms, num_iters):
  """``log_scales_bound`` of several candidates (stacked on a leading axis), each from the
  same (warm) ``state``."""
  return jax.vmap(
    lambda l: log_scales_bound(net, l, state, mode=mode, norms=norms, num_iters=num_iters)[0]
  )(log_ds)


def _sound_objective(net, log_d, mode, sound_kwargs):
  bound, _ = soundness.sound_bound(
    net, scales=[jnp.exp(l) for l in log_d], mode=mode, **(sound_kwargs or {})
  )
  b = np.asarray(bound, np.float64)
  return b.sum() / (b.shape[0] * (b.shape[0] - 1)) if mode == "pairwise" else b.mean()


def optimize_scales(
  net: LipNet,
  *,
  init: Init = "aol",
  steps: int = 300,
  learning_rate: float = 0.005,
  mode: liplt.Mode = "pairwise",
  norms: Norms = "auto",
  num_iters: int = 20,
  warmup_iters: int = 200,
  final_iters: int = 2000,
  evaluate: Evaluate = "objective",
  key: jax.Array | None = None,
  sound_kwargs: dict | None = None,
) -> tuple[list[jax.Array], dict]:
  """Positive diagonal scales ``D_k`` minimising the LipLT bound of ``rescale(net, D)``.

  Minimises ``reduce_bound`` (mean pairwise ``L_ij``, mean ``L_i`` or the global ``L``, by
  ``mode``) of the l2 LipLT bound (Theorem 3.3, eq. 19) of ``rescale(net, exp(log_d))`` over
  ``log_d`` (one entry per neuron) with Adam. Every ``D > 0`` gives a valid bound of ``net``
  (``crmjax.rescaling``), so the result is sound whatever the optimiser does. The objective
  is the bound itself: with exact interior norms (``exact_liplt_bound``) for small networks,
  else warm-started power iteration. An optimiser can exploit the lag of a warm-started
  power iteration (its estimates lie below the norms), so the best iterate, plain LipLT
  (``D = I``) and the AOL heuristic (``rescaling.aol_scales``) are re-evaluated (exactly,
  or with ``final_iters`` iterations, or soundly) and the smallest is returned: the result
  is never worse than either baseline under that evaluation.

  Host-side driver (returns numbers); the step (``scales_step``) is pure and the
  ``steps`` of them run in one jitted ``lax.scan``, compiled once per network structure.

  Args:
    net: the network (eq. 17 form; dense, conv, residual).
    init: start point, ``'aol'`` (``log T^{1/2}``) or ``'ones'`` (``D = I``).
    steps: Adam steps.
    learning_rate: Adam step size on ``log D``.
    mode: the objective, as above.
    norms: ``'exact'``, ``'power'`` or ``'auto'`` (exact when every interior operator has
      at most ``EXACT_MAX_SIZE`` entries).
    num_iters: power iterations per step (``'power'``, warm-started).
    warmup_iters: power iterations at the start point before the first step (``'power'``).
    final_iters: power iterations of the final evaluation (``'power'``), from the
      optimisation's last power state, the same for every candidate.
    evaluate: ``'objective'`` (the objective above, exact or ``final_iters``) or ``'sound'``
      (``soundness.sound_bound(net, scales=...)``: guaranteed, float64; host side).
    key: PRNG key of the initial power-iteration vectors (default ``jax.random.key(0)``).
    sound_kwargs: extra arguments of ``soundness.sound_bound`` (``evaluate='sound'``).

  Returns:
    ``(scales, info)``: ``scales`` a list over blocks of positive ``phi_shape`` arrays (for
    ``rescale(net, scales)`` or ``soundness.sound_bound(net, scales=scales)``); ``info``
    has ``'bound'`` (the chosen candidate's evaluated objective), ``'candidates'``
    (``'ones'``, ``'aol'``, ``'optimized'`` -> evaluated objective), ``'chosen'``,
    ``'history'`` (the per-step objective, ``(steps,)``), ``'norms'``, ``'evaluate'``.
  """
  if init not in INITS:
    raise ValueError(f"init must be one of {INITS}, got {init!r}")
  if evaluate not in ("objective", "sound"):
    raise ValueError(f"evaluate must be 'objective' or 'sound', got {evaluate!r}")
  liplt._check("liplt", mode, "l2")  # pylint: disable=protected-access
  norms = _resolve_norms(net, norms)
  state = None
  if norms == "power":
    state = liplt.init_state(net, jax.random.key(0) if key is None else key)
  ones, aol = unit_log_scales(net), jax.jit(aol_log_scales)(net)
  names, cands = ("ones", "aol", "optimized"), [ones, aol]
  with jax.default_matmul_precision("highest"):
    best, state, history = _descend(
      net,
      aol if init == "aol" else ones,
      state,
      jnp.float32(learning_rate),
      steps=steps,
      mode=mode,
      norms=norms,
      num_iters=num_iters,
      warmup_iters=warmup_iters,
    )
    cands.append(best)
    if evaluate == "sound":
      vals = np.asarray([_sound_objective(net, c, mode, sound_kwargs) for c in cands])
    else:
      stacked = jax.tree.map(lambda *a: jnp.stack(a), *cands)
      vals = np.asarray(
        _objectives(net, stacked, state, mode=mode, norms=norms, num_iters=final_iters), np.float64
      )
  # Ties go to the simpler candidate (ones, then AOL); NaN is never chosen.
  i = int(np.argmin(np.where(np.isfinite(vals), vals, np.inf)))
  info = {
    "bound": float(vals[i]),
    "chosen": names[i],
    "norms": norms,
    "evaluate": evaluate,
    "candidates": dict(zip(names, map(float, vals))),
    "history": np.asarray(history, np.float64),
  }
  return [jnp.exp(l) for l in cands[i]], info


# ------------------------------------------------------------- scales refreshed in training


def _candidates(net, log_ds, states, *, mode, num_iters, stacked_states: bool):
  """``log_scales_bound`` and the power state of each candidate (stacked on axis 0), from
  its own power state (``stacked_states``) or each from the same ``states``."""
  return jax.vmap(
    lambda l, s: log_scales_bound(net, l, s, mode=mode, num_iters=num_iters),
    in_axes=(0, 0 if stacked_states else None),
  )(log_ds, states)


def _pick(values: jax.Array, stacked):
  """The smallest finite candidate (the first on ties; NaN never chosen) and its index."""
  i = jnp.argmin(jnp.where(jnp.isfinite(values), values, jnp.inf))
  return i, jax.tree.map(lambda a: a[i], stacked)


def unit_log_scales(net: LipNet) -> list[jax.Array]:
  """``log D = 0`` (``D = I``, the plain bound) per block, of its ``phi_shape``."""
  return [jnp.zeros(b.phi_shape, jnp.float32) for b in net.blocks]


def aol_log_scales(net: LipNet) -> list[jax.Array]:
  """``log`` of ``rescaling.aol_scales(net)``, zeros (``D = I``) for isometric readers."""
  return [
    jnp.zeros(b.phi_shape, jnp.float32) if d is None else jnp.log(d).astype(jnp.float32)
    for b, d in zip(net.blocks, rescaling.aol_scales(net))
  ]


def refresh_scales(
  net: LipNet,
  log_d: list[jax.Array],
  state: liplt.PowerState,
  *,
  learning_rate: float | jax.Array,
  steps: int,
  mode: liplt.Mode = "pairwise",
  num_iters: int = 2,
  warmup_iters: int = 10,
  final_iters: int = 20,
) -> tuple[list[jax.Array], liplt.PowerState, dict]:
  """One refresh of the training rescaling ``D`` (Theorem 3.3 / eq. 19 of ``rescale(net, D)``,
  the Theorem 3.2 refinement): pure and jit-able, the in-training form of ``optimize_scales``.

  Every ``D > 0`` gives a valid bound (module docstring); this only chooses a tight one.

  1. Start: of the previous ``log_d`` (warm start), AOL (``aol_log_scales``) and ``D = I``,
     the one with the smallest objective (``reduce_bound`` by ``mode``), each evaluated
     with ``warmup_iters`` power iterations from the training ``state``. At the first
     refresh the previous ``log_d`` is ``D = I``, so it starts from the better of I and AOL.
  2. ``steps`` Adam steps on ``log D`` (``_descend``: ``num_iters`` warm-started power
     iterations per step; the best iterate by its per-step objective).
  3. Choice: the previous ``log_d``, AOL, ``D = I`` and the best iterate, each evaluated with
     ``final_iters`` more power iterations from its own vectors (those of 1, and for the
     iterate those at the end of 2): the smallest (the first on ties, so the previous ``D``
     is kept unless bettered). So the result is never worse than plain LipLT (``D = I``)
     nor AOL under that evaluation. (Power-iteration values are lower estimates: an
     optimiser exploits the lag of warm-started vectors, so the per-step values of 2 are
     never trusted for the choice; more ``num_iters`` make the descent more reliable.)

  Args:
    net: the network (its params are read, never differentiated).
    log_d: the current ``log D``, one array per block of its ``phi_shape`` (``float32``).
    state: the training ``liplt.PowerState`` (the rescaled net has the same shapes).
    learning_rate: Adam step size on ``log D``.
    steps: Adam steps (static; 0: only the choice among the three fixed candidates).
    mode: the objective (``liplt.MODES``): the training ``bound_mode``.
    num_iters, warmup_iters, final_iters: power iterations per Adam step, per start
      candidate, per final candidate (static).

  Returns:
    ``(log_d, state, info)``: the chosen ``log D`` (same structure and dtypes as the input),
    its power state (after the final evaluation: converged for the new ``D``, so the next
    training steps continue from it) and ``info`` with ``'objective'`` (the chosen value),
    ``'candidates'`` (``(4,)``: previous, AOL, ``D = I``, optimised), ``'chosen'`` (index)
    and ``'history'`` (``(steps,)`` per-step objective).
  """
  net = jax.lax.stop_gradient(net)
  aol = aol_log_scales(net)
  ones = [jnp.zeros_like(l) for l in log_d]
  stack = lambda *cands: jax.tree.map(lambda *a: jnp.stack(a), *cands)
  starts = stack(log_d, aol, ones)
  values, states = _candidates(
    net, starts, state, mode=mode, num_iters=warmup_iters, stacked_states=False
  )
  _, (start, state) = _pick(values, (starts, states))
  best, state, history = _descend(
    net,
    start,
    state,
    jnp.asarray(learning_rate, jnp.float32),
    steps=steps,
    mode=mode,
    norms="power",
    num_iters=num_iters,
    warmup_iters=0,
  )
  finals = stack(log_d, aol, ones, best)
  states = jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]), states, state)
  values, states = _candidates(
    net, finals, states, mode=mode, num_iters=final_iters, stacked_states=True
  )
  j, (chosen, state) = _pick(values, (finals, states))
  info = {"objective": values[j], "candidates": values, "chosen": j, "history": history}
  return chosen, state, info
