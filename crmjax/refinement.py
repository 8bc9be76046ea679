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

Multi-layer use (``rescale``, ``refined_liplt_bound``): for a positive diagonal ``D_k``,
``G_k phi(W_k x) = (G_k D_k^{-1}) psi(D_k W_k x)`` with ``psi_i(u) = d_i phi(u / d_i)``,
which has the same slope bounds ``[alpha_k, beta_k]``. So Theorem 3.3 (eq. 19) applied to
the network with ``W_k <- D_k W_k``, ``G_k <- G_k D_k^{-1}`` (``Hhat_k`` unchanged) is a
valid bound of the original network for EVERY ``D_k > 0``; with one layer and
``D = T^{1/2}``, ``G^T G <= T`` it is at most the Theorem 3.2 bound (``||G T^{-1/2}|| <= 1``).
``refined_liplt_bound`` picks ``D_k = T_k^{1/2}`` with ``T_k`` the AOL / SLL diagonal of the
operator that reads ``phi_k`` (``G_k``, or for a feed-forward block the next block's ``W``,
or the readout). Soundness does not depend on that choice, tightness does.
"""

from __future__ import annotations

from typing import Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from crmjax import liplt
from crmjax import network
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


def layer_bound(W, G=None, H=None, alpha: float = 0.0, beta: float = 1.0, *,
                t_choice: TChoice = "aol", q=None, t=None) -> jax.Array:
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
  return (jnp.linalg.norm(hhat(W, G, H, alpha, beta), 2)
          + 0.5 * (beta - alpha) * nG * jnp.linalg.norm(W, 2))


# ------------------------------------------------------------- multi-layer (LipNet)


def rescale(net: LipNet, scales: Sequence[jax.Array | None]) -> LipNet:
  """``W_k <- D_k W_k``, ``G_k <- G_k D_k^{-1}`` per block (``D_k = diag(scales[k])``).

  ``scales[k]`` is positive with block k's ``phi_shape`` (or ``None``: unchanged). The
  LipLT bound of the result is a valid bound of ``net`` (see the module docstring).
  """
  blocks = []
  for b, d in zip(net.blocks, scales):
    if d is None:
      blocks.append(b)
      continue
    shape = b.phi_shape
    W = ops.chain([b.W, ops.Scale(d, shape)], b.W.in_shape)
    inv = ops.Scale(1.0 / d, shape)
    G = inv if b.G is None else ops.chain([inv, b.G], shape)
    blocks.append(network.Block(W, G, b.H, alpha=b.alpha, beta=b.beta))
  return LipNet(tuple(blocks), net.readout)


def _adjoint_apply(op, y):
  fn = jax.linear_transpose(op, jax.ShapeDtypeStruct(op.in_shape, y.dtype))
  return fn(y)[0]


def _aol_diag(op, q=None) -> jax.Array:
  """``(|A|^T |A| q) / q`` (an upper bound of the row sums of ``|A^T A|``), ``in_shape``."""
  a = op.abs()
  qv = jnp.ones(op.in_shape, jnp.float32) if q is None else q
  return _adjoint_apply(a, a(qv)) / qv


def refined_scales(net: LipNet, *, t_choice: TChoice = "aol") -> list[jax.Array | None]:
  """``D_k = T_k^{1/2}`` per block, ``T_k`` the AOL diagonal of the operator reading ``phi_k``.

  That operator is ``G_k``; for ``G_k = I`` (feed-forward) it is the next block's ``W``
  (or the readout). ``t_choice='spectral'`` returns ``None``s (a scalar ``D`` changes
  nothing). Any positive ``D`` is sound; this is a heuristic for tightness.
  """
  if t_choice == "spectral":
    return [None] * len(net.blocks)
  if t_choice not in ("aol", "sll"):
    raise ValueError(f"refined_scales supports 'spectral', 'aol', 'sll'; got {t_choice!r}")
  out = []
  for k, b in enumerate(net.blocks):
    reader = b.G if b.G is not None else (
        net.blocks[k + 1].W if k + 1 < len(net.blocks) else net.readout)
    if ops.is_isometry(reader):
      out.append(None)
      continue
    t = jax.lax.stop_gradient(_aol_diag(reader))
    out.append(jnp.sqrt(jnp.maximum(t, _TINY)))
  return out


def refined_liplt_bound(net: LipNet, state: liplt.PowerState | None = None, *,
                        t_choice: TChoice = "aol", mode: liplt.Mode = "pairwise",
                        num_iters: int = 1) -> tuple[jax.Array, liplt.PowerState | None]:
  """LipLT (eq. 19, l2) of ``rescale(net, refined_scales(net))``: a valid bound of ``net``.

  Same state / shapes as ``liplt.liplt_bound`` (the rescaled net has the same shapes).
  """
  return liplt.liplt_bound(rescale(net, refined_scales(net, t_choice=t_choice)), state,
                           mode=mode, norm="l2", num_iters=num_iters)
