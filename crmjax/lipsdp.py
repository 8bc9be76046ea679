"""LipSDP-Neuron (Fazlyab et al., NeurIPS 2019): an SDP upper bound on the l2 Lipschitz constant.

For a feed-forward network ``f(x) = W_L phi(W_{L-1} .. phi(W_0 x))`` (biases do not matter)
with ``phi`` slope-restricted in ``[alpha, beta]`` (ReLU: 0, 1), stack the input and the
hidden activations as ``xi = (x, z_1, .., z_L)`` (``n_0 + N`` entries, ``N = n_1 + .. +
n_L``), the pre-activations as ``A xi = (W_0 x, W_1 z_1, .., W_{L-1} z_{L-1})`` and the
activations as ``B xi = (z_1, .., z_L)``. Every neuron obeys the incremental quadratic
constraint of slope restriction, so for ``T = diag(t)``, ``t >= 0``, the LMI

    [A; B]^T [[-2 alpha beta T, (alpha+beta) T], [(alpha+beta) T, -2 T]] [A; B]
      + diag(-rho I_{n_0}, 0, .., 0, W_L^T W_L)  <=  0

implies ``||f(x) - f(y)||^2 <= rho ||x - y||^2``. ``lipsdp_neuron`` solves ``min rho`` over
``(rho, t)`` with cvxpy + SCS (first order; Clarabel through cvxpy took minutes and GBs
on these sizes) and returns ``sqrt(rho)``. Host side, float64 numpy, not differentiable;
meant for small networks (the LMI is ``(n_0 + N)`` square: 3 hidden layers of 64 on a
32-dim input is 224).

The solver's ``(rho, t)`` satisfies the LMI only to its tolerance, so the reported bound is
re-derived from its ``t`` alone (``certified_rho``): with ``C = M(0, t) = [[C_xx, C_xz],
[C_zx, C_zz]]`` (``x`` = the input block), if ``C_zz < 0`` then ``M(rho, t) <= 0`` iff
``rho >= lambda_max(C_xx - C_xz C_zz^{-1} C_zx)`` (Schur complement), computed in float64.
That is the smallest ``rho`` valid for the solver's multipliers: sound up to float64
eigenvalue accuracy whatever the solver's tolerance.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from crmjax import layers as L


def weights_of(layers: Sequence[Any], params: Any) -> tuple[list[np.ndarray], tuple[float, float]]:
  """The ``(out, in)`` float64 weight matrices and the common slopes of a dense network.

  Args:
    layers: ``crmjax.layers`` specs: an optional leading ``Flatten``, then ``Dense`` and
      ``Act`` alternating, ending with a ``Dense`` (all activations with the same slopes).
    params: the model's params ``{'layer_i': {'kernel': (in, out), ...}}``.

  Returns:
    ``([W_0, .., W_L], (alpha, beta))``.
  """
  weights, slopes = [], set()
  for i, layer in enumerate(layers):
    if isinstance(layer, L.Dense):
      weights.append(np.asarray(params[f"layer_{i}"]["kernel"], np.float64).T)
    elif isinstance(layer, L.Act):
      slopes.add(layer.slope_bounds)
    elif isinstance(layer, L.Flatten) and i == 0:
      continue
    else:
      raise ValueError(f"layer {i}: LipSDP here supports Dense / Act networks, got {layer!r}")
  if len(slopes) > 1:
    raise ValueError(f"all activations must share their slopes, got {sorted(slopes)}")
  if not isinstance(layers[-1], L.Dense):
    raise ValueError("the network must end with a Dense layer")
  return weights, (slopes.pop() if slopes else (0.0, 1.0))


def lmi_matrix(
  weights: Sequence[np.ndarray], rho: float, t: np.ndarray, *, alpha: float = 0.0, beta: float = 1.0
) -> np.ndarray:
  """The LipSDP-Neuron matrix ``M(rho, t)`` (``(n_0 + N)`` square; ``M <= 0`` certifies)."""
  A, B, E = _structure(weights)
  T = np.diag(np.asarray(t, np.float64))
  M = (
    A.T @ (-2 * alpha * beta * T) @ A
    + (alpha + beta) * (A.T @ T @ B + B.T @ T @ A)
    - 2 * B.T @ T @ B
    + E
  )
  n0 = weights[0].shape[1]
  M[:n0, :n0] -= rho * np.eye(n0)
  return 0.5 * (M + M.T)


def _structure(weights):
  """``A (N, n_0+N)``, ``B (N, n_0+N)``, ``E`` (``W_L^T W_L`` on the last hidden block)."""
  weights = [np.asarray(w, np.float64) for w in weights]
  n0 = weights[0].shape[1]
  hidden = [w.shape[0] for w in weights[:-1]]
  N = sum(hidden)
  D = n0 + N
  A = np.zeros((N, D))
  row, col = 0, 0
  for w in weights[:-1]:
    A[row : row + w.shape[0], col : col + w.shape[1]] = w
    row, col = row + w.shape[0], col + w.shape[1]
  B = np.concatenate([np.zeros((N, n0)), np.eye(N)], axis=1)
  E = np.zeros((D, D))
  last = hidden[-1]
  E[D - last :, D - last :] = weights[-1].T @ weights[-1]
  return A, B, E


def lipsdp_neuron(
  weights: Sequence[np.ndarray],
  *,
  alpha: float = 0.0,
  beta: float = 1.0,
  solver: str | None = None,
  verbose: bool = False,
  **solver_kwargs,
) -> dict[str, Any]:
  """Solves LipSDP-Neuron: ``min rho`` s.t. the LMI (module docstring), ``t >= 0``.

  Args:
    weights: ``[W_0, .., W_L]``, ``(out, in)`` matrices, at least one hidden layer.
    alpha, beta: slope bounds of every activation.
    solver: a cvxpy solver name (default ``'SCS'``); ``solver_kwargs`` go to it (default
      ``eps_abs = eps_rel = 1e-7``).

  Returns:
    ``{'bound': sqrt(certified rho), 'rho' (certified), 'solver_rho' (the solver's value),
    't' (N,), 'status', 'solver', 'seconds', 'lmi_max_eig'}`` (``lmi_max_eig``: largest
    eigenvalue of the LMI at the certified point, ``<= 0`` up to rounding).
  """
  import cvxpy as cp  # optional dependency (the ``dev`` extra)

  if len(weights) < 2:
    raise ValueError(
      "LipSDP needs at least one hidden layer (a linear map's constant is its spectral norm)"
    )
  if solver is None:
    solver = cp.SCS
    solver_kwargs = {"eps_abs": 1e-7, "eps_rel": 1e-7, "max_iters": 200_000, **solver_kwargs}
  t0 = time.perf_counter()
  A, B, E = _structure(weights)
  N, D = A.shape
  n0 = D - N
  t = cp.Variable(N, nonneg=True)
  rho = cp.Variable()
  T = cp.diag(t)
  M = (
    (-2 * alpha * beta) * (A.T @ T @ A)
    + (alpha + beta) * (A.T @ T @ B + B.T @ T @ A)
    - 2 * (B.T @ T @ B)
    + E
  )
  Ex = np.zeros((D, D))
  Ex[:n0, :n0] = np.eye(n0)
  M = M - rho * Ex
  prob = cp.Problem(cp.Minimize(rho), [0.5 * (M + M.T) << 0])
  prob.solve(solver=solver, verbose=verbose, **solver_kwargs)
  seconds = time.perf_counter() - t0
  if rho.value is None:
    raise RuntimeError(f"LipSDP: solver {solver} failed with status {prob.status}")
  tv = np.maximum(np.asarray(t.value, np.float64), 0.0)
  rv = certified_rho(weights, tv, alpha=alpha, beta=beta)
  resid = float(np.linalg.eigvalsh(lmi_matrix(weights, rv, tv, alpha=alpha, beta=beta))[-1])
  return {
    "bound": float(np.sqrt(max(rv, 0.0))),
    "rho": rv,
    "solver_rho": float(rho.value),
    "t": tv,
    "status": prob.status,
    "solver": str(solver),
    "seconds": seconds,
    "lmi_max_eig": resid,
  }


def certified_rho(
  weights: Sequence[np.ndarray],
  t: np.ndarray,
  *,
  alpha: float = 0.0,
  beta: float = 1.0,
  margin: float = 1e-9,
) -> float:
  """The smallest ``rho`` with ``M(rho, t) <= 0`` for fixed multipliers ``t`` (float64).

  ``inf`` when ``C_zz = M(0, t)[n_0:, n_0:]`` is not negative definite (then no ``rho``
  works for this ``t``). ``margin`` is added relatively, for eigenvalue rounding.
  """
  n0 = np.asarray(weights[0]).shape[1]
  C = lmi_matrix(weights, 0.0, t, alpha=alpha, beta=beta)
  czz, cxz = C[n0:, n0:], C[:n0, n0:]
  if np.linalg.eigvalsh(czz)[-1] >= 0:
    return float("inf")
  schur = C[:n0, :n0] - cxz @ np.linalg.solve(czz, cxz.T)
  rho = float(np.linalg.eigvalsh(0.5 * (schur + schur.T))[-1])
  return max(rho, 0.0) * (1 + margin)


def naive(weights: Sequence[np.ndarray], *, alpha: float = 0.0, beta: float = 1.0) -> float:
  """``prod_k ||W_k||_2 * max(|alpha|, |beta|)^(L)`` (exact SVD norms)."""
  s = max(abs(alpha), abs(beta)) ** (len(weights) - 1)
  return float(s * np.prod([np.linalg.norm(np.asarray(w, np.float64), 2) for w in weights]))
