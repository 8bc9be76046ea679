"""Guaranteed Lipschitz bounds for certificates.

Training uses warm-started power iteration, whose estimates of each interior norm
``||W_e Hhat .. G_j||`` can lie BELOW the true norm. A certificate may not. Here every
operator norm of eq. 19 is replaced by a guaranteed upper bound:

* **exact**: operators whose smaller side has at most ``exact_max_dim`` dimensions are
  materialised (a batched application of the operator to the basis vectors of its smaller
  side) and their norm is the square root of the top eigenvalue of the float64 Gram
  matrix. Class rows (``c^T R Hhat .. G_j``) are always exact: their norms are taken from
  the float64 rows themselves (no Gram cancellation).
* **probabilistic**: larger operators get ``k`` power iterations from a fresh random start
  (uniform on the sphere) and the bound ``sigma_est / sqrt(1 - eps)``, which fails with
  probability at most ``delta = 0.824 sqrt(n) (1 - eps)^((k - 1) / 2)`` (a conservative form
  of the power-method bound of Kuczynski & Wozniakowski, SIAM J. Matrix Anal. Appl. 1992,
  Thm. 3.1, whose failure decays like ``sqrt(n) (1 - eps)^k``). ``eps`` is chosen so that the
  failures of all such operators add up to at most ``failure_prob`` (union bound). The warm
  training estimate, when given, can only raise the estimate (``max`` of both).
* **l_inf** needs no iteration: ``max(|A_n| .. |A_1| 1)`` is an upper bound (exact for
  single operators).

Every norm is then multiplied by ``1 + margin`` (default 1e-4) to cover float32 rounding in
the materialisation and in the logits; the recursion runs in float64 on the host.

**Rescaled LipLT** (``method='liplt_aol'``, or ``method='liplt'`` with ``scales=``): the
same guaranteed computation on ``rescaling.rescale(net, D)``, a valid bound of ``net`` for
every positive diagonal ``D`` (``crmjax.rescaling``); ``'liplt_aol'`` takes the AOL scales,
``scales=`` any others (e.g. ``crmjax.refinement.optimize_scales``). The float32 rounding of
``1 / d`` makes ``G D^{-1} D`` differ from ``G`` by a relative ~1e-7 per block, far inside
the margin.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from crmjax import liplt
from crmjax import operators as ops
from crmjax import rescaling
from crmjax.network import LipNet

KW_CONSTANT = 0.824


def interior_operator(net: LipNet, t: int, e: int):
  """The operator ``A_{t,e} = W_e Hhat_{e-1} .. Hhat_t G_{t-1}`` of eq. 19 (``t <= e``).

  Returns:
    ``(fn, in_shape, out_shape)``: ``fn`` maps ``(n, *in_shape)`` to ``(n, *out_shape)``
    (``in_shape`` is the input shape for ``t = 0``, block ``t - 1``'s ``phi_shape`` else).
  """
  blocks = net.blocks

  def fn(u):
    x = u if t == 0 else blocks[t - 1].g(u)
    for k in range(t, e):
      x = blocks[k].hhat(x)
    return blocks[e].W(x)

  in_shape = net.input_shape if t == 0 else blocks[t - 1].phi_shape
  return fn, in_shape, blocks[e].phi_shape


def _gram_top_eigenvalue(mat: np.ndarray) -> float:
  """Largest squared singular value of a float matrix, in float64."""
  m = np.asarray(mat, np.float64)
  gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
  return float(np.linalg.eigvalsh(gram)[-1])


def exact_norm(fn, in_shape, out_shape, *, chunk: int = 1024) -> float:
  """The l2 norm of a linear map, materialised along its smaller side (float64 Gram)."""
  n_in, n_out = ops.size(in_shape), ops.size(out_shape)
  if n_in <= n_out:
    f = jax.jit(lambda b: fn(b).reshape(b.shape[0], -1))
    cols = [np.asarray(f(jnp.eye(n_in, dtype=jnp.float32)[i:i + chunk].reshape(-1, *in_shape)))
            for i in range(0, n_in, chunk)]
    return math.sqrt(max(_gram_top_eigenvalue(np.concatenate(cols)), 0.0))
  _, vjp = jax.vjp(fn, jnp.zeros((1, *in_shape)))
  f = jax.jit(jax.vmap(lambda c: vjp(c.reshape(1, *out_shape))[0].reshape(-1)))
  rows = [np.asarray(f(jnp.eye(n_out, dtype=jnp.float32)[i:i + chunk]))
          for i in range(0, n_out, chunk)]
  return math.sqrt(max(_gram_top_eigenvalue(np.concatenate(rows)), 0.0))


def kw_epsilon(*, n: int, num_iters: int, delta: float) -> float:
  """The relative eigenvalue error ``eps`` whose failure probability is ``delta``."""
  if num_iters < 2:
    return 1.0
  base = delta / (KW_CONSTANT * math.sqrt(n))
  return 1.0 if base >= 1 else 1.0 - base ** (2.0 / (num_iters - 1))


def _probabilistic_norms(fns_shapes, *, key, num_iters, warm=None):
  """Power iteration from a fresh random start for several operators at once."""
  us = tuple(liplt._random_rows(k, (1, *s))  # pylint: disable=protected-access
             for k, (_, s, _) in zip(jax.random.split(key, len(fns_shapes)), fns_shapes))
  fn = lambda us: tuple(f(u) for (f, _, _), u in zip(fns_shapes, us))
  us = jax.jit(lambda u: liplt.power_iterate(fn, u, num_iters))(us)
  est = [float(np.linalg.norm(np.asarray(y, np.float64))) for y in jax.jit(fn)(us)]
  if warm is not None:
    w = [float(np.linalg.norm(np.asarray(y, np.float64))) for y in jax.jit(fn)(warm)]
    est = [max(a, b) for a, b in zip(est, w)]
  return est


class _Norms:
  """Collects guaranteed norms of linear operators: exact when small, else probabilistic."""

  def __init__(self, *, exact_max_dim, num_iters, key):
    self.exact_max_dim, self.num_iters, self.key = exact_max_dim, num_iters, key
    self.exact, self.pending, self.values = [], [], {}

  def add(self, name, fn, in_shape, out_shape, warm=None):
    if min(ops.size(in_shape), ops.size(out_shape)) <= self.exact_max_dim:
      self.values[name] = exact_norm(fn, in_shape, out_shape)
      self.exact.append(name)
    else:
      self.pending.append((name, (fn, in_shape, out_shape), warm))

  def finish(self, failure_prob):
    info = {"exact_norms": len(self.exact), "probabilistic_norms": len(self.pending)}
    if not self.pending:
      info["failure_probability"] = 0.0
      return info
    warm = None
    if all(w is not None for *_, w in self.pending):
      warm = tuple(w for *_, w in self.pending)
    est = _probabilistic_norms([p for _, p, _ in self.pending], key=self.key,
                               num_iters=self.num_iters, warm=warm)
    delta = failure_prob / len(self.pending)
    worst = 0.0
    for (name, (_, s, _), _), sigma in zip(self.pending, est):
      eps = kw_epsilon(n=ops.size(s), num_iters=self.num_iters, delta=delta)
      if eps >= 1.0:
        raise ValueError(f"{self.num_iters} power iterations cannot reach failure "
                         f"probability {failure_prob}: raise num_iters")
      self.values[name] = sigma / math.sqrt(1.0 - eps)
      worst = max(worst, eps)
    info.update(failure_probability=failure_prob, power_iterations=self.num_iters,
                max_relative_inflation=1.0 / math.sqrt(1.0 - worst) - 1.0)
    return info


def _row_norms64(rows: np.ndarray, mode: str, norm: str):
  rows = np.asarray(rows, np.float64)
  vec = (lambda a: np.linalg.norm(a, axis=-1)) if norm == "l2" else \
      (lambda a: np.abs(a).sum(-1))
  if mode == "per_class":
    return vec(rows)
  if mode == "global":
    if norm == "l2":
      return math.sqrt(max(_gram_top_eigenvalue(rows), 0.0))
    return float(vec(rows).max())
  return np.stack([vec(rows[i][None] - rows) for i in range(rows.shape[0])])


def sound_bound(net: LipNet, *, method: str = "liplt", mode: str = "pairwise",
                norm: str = "l2", **kwargs) -> tuple[np.ndarray, dict]:
  """A guaranteed upper bound (float64) for certificates; see the module docstring.

  Args:
    net: the network (eq. 17 form).
    method: ``'liplt'`` (eq. 19), ``'naive'`` or ``'liplt_aol'`` (eq. 19 of the AOL-rescaled
      network, module docstring).
    mode: ``'pairwise'`` ``(K, K)``, ``'per_class'`` ``(K,)`` or ``'global'`` ``()``.
    norm: ``'l2'`` or ``'linf'``.
    **kwargs: ``scales``, ``warm``, ``key``, ``num_iters``, ``failure_prob``,
      ``exact_max_dim``, ``margin`` of ``sound_bounds``.

  Returns:
    ``(bound, info)``; ``info['kind']`` says whether the bound is deterministic or holds
    with probability ``1 - failure_prob``; ``info`` also counts exact / probabilistic norms.
  """
  bounds, info = sound_bounds(net, method=method, modes=(mode,), norm=norm, **kwargs)
  return bounds[mode], info


def sound_bounds(net: LipNet, *, method: str = "liplt", modes=liplt.MODES, norm: str = "l2",
                 scales: rescaling.Scales | None = None,
                 warm: liplt.PowerState | None = None, key: jax.Array | None = None,
                 num_iters: int = 1000, failure_prob: float = 1e-6,
                 exact_max_dim: int = 2048, margin: float = 1e-4
                 ) -> tuple[dict[str, np.ndarray], dict]:
  """``sound_bound`` for several modes at once (the operator norms are computed once).

  Args:
    net, method, norm: as ``sound_bound``.
    modes: the modes wanted.
    scales: ``method='liplt'`` only: positive diagonal scales per block (``None`` entries
      leave a block as is); the bound is that of ``rescaling.rescale(net, scales)``.
    warm: the training ``PowerState``, used only to raise fresh estimates (any vectors give
      valid lower estimates, so warm vectors of another rescaling are fine).
    key: PRNG key of the fresh random starts (default ``jax.random.key(0)``).
    num_iters: power iterations for operators too large to materialise.
    failure_prob: total probability that some probabilistic norm is not an upper bound.
    exact_max_dim: largest smaller-side dimension materialised exactly.
    margin: relative inflation of every norm for float32 rounding.

  Returns:
    ``({mode: bound}, info)``; ``info['rescaling']`` is ``'none'``, ``'aol'`` or
    ``'given'``.
  """
  for mode in modes:
    liplt._check(method, mode, norm)  # pylint: disable=protected-access
  net, rescaled = _rescaled(net, method, scales)
  base = "naive" if method == "naive" else "liplt"
  key = jax.random.key(0) if key is None else key
  with jax.default_matmul_precision("highest"):
    if norm == "linf":
      bounds = {mode: _linf(net, base, mode) for mode in modes}
      info = {"exact_norms": 0, "probabilistic_norms": 0, "failure_probability": 0.0}
    else:
      fn = _liplt_l2 if base == "liplt" else _naive_l2
      readout, info = fn(net, warm, key, num_iters, failure_prob, exact_max_dim)
      bounds = {mode: readout(mode) for mode in modes}
  # A product of at most L + 1 norms enters each term of eq. 19.
  inflate = (1.0 + margin) ** (len(net.blocks) + 1)
  bounds = {m: np.asarray(b, np.float64) * inflate for m, b in bounds.items()}
  info["kind"] = ("guaranteed upper bound" if info["failure_probability"] == 0 else
                  f"upper bound with probability >= {1 - info['failure_probability']:.10g}")
  info.update(norm=norm, method=method, relative_margin=margin, rescaling=rescaled)
  return bounds, info


def _rescaled(net: LipNet, method: str, scales) -> tuple[LipNet, str]:
  """The network whose LipLT bound is computed, and which rescaling it carries."""
  if scales is not None and method != "liplt":
    raise ValueError(f"scales= rescales the LipLT bound: use method='liplt', not {method!r}")
  if method == "liplt_aol":
    return rescaling.rescale(net, jax.jit(rescaling.aol_scales)(net)), "aol"
  if scales is None:
    return net, "none"
  if len(scales) != len(net.blocks):
    raise ValueError(f"scales has {len(scales)} entries for {len(net.blocks)} blocks")
  checked = []
  for k, (b, d) in enumerate(zip(net.blocks, scales)):
    if d is not None:
      d = jnp.broadcast_to(jnp.asarray(d, jnp.float32), b.phi_shape)
      if not bool(jnp.all(jnp.isfinite(d) & (d > 0)) & jnp.all(jnp.isfinite(1.0 / d))):
        raise ValueError(f"scales[{k}] must be finite and positive (a rescaling D > 0)")
    checked.append(d)
  return rescaling.rescale(net, checked), "given"


def _linf(net, method, mode):
  if method == "liplt":
    b, _ = liplt.liplt_bound(net, mode=mode, norm="linf")
  else:
    b, _ = liplt.naive_bound(net, mode=mode, norm="linf")
  return np.asarray(b, np.float64)


def _liplt_l2(net, warm, key, num_iters, failure_prob, exact_max_dim):
  L = len(net.blocks)
  norms = _Norms(exact_max_dim=exact_max_dim, num_iters=num_iters, key=key)
  for e in range(L):
    for t in range(e + 1):
      fn, s_in, s_out = interior_operator(net, t, e)
      w = None if warm is None else warm.liplt[t][e - t][None]
      norms.add((e, t), fn, s_in, s_out, w)
  info = norms.finish(failure_prob)
  table = np.zeros((L, L))
  for (e, t), v in norms.values.items():
    table[e, t] = v
  radii = np.array([b.radius for b in net.blocks], np.float64)
  m = np.zeros(L)
  for e in range(L):
    m[e] = table[e, 0] + sum(radii[j] * table[e, j + 1] * m[j] for j in range(e))
  rows = [np.asarray(r, np.float64) for r in jax.jit(liplt.class_rows)(net)]

  def readout(mode):
    out = _row_norms64(rows[0], mode, "l2")
    for j in range(L):
      out = out + radii[j] * _row_norms64(rows[j + 1], mode, "l2") * m[j]
    return out

  info["interior_bounds"] = m.tolist()
  return readout, info


def _naive_l2(net, warm, key, num_iters, failure_prob, exact_max_dim):
  norms = _Norms(exact_max_dim=exact_max_dim, num_iters=num_iters, key=key)
  fixed = {}
  for i, b in enumerate(net.blocks):
    for j, op in enumerate((b.W, b.G, b.H)):
      if op is None:
        fixed[(i, j)] = 1.0 if j == 1 else 0.0
      elif ops.is_isometry(op):
        fixed[(i, j)] = 1.0
      elif isinstance(op, ops.Scale):
        fixed[(i, j)] = float(np.max(np.abs(np.asarray(op.scale))))
      else:
        w = None if warm is None else warm.naive[i][j]
        norms.add((i, j), op, op.in_shape, op.out_shape, w)
  info = norms.finish(failure_prob)
  vals = {**fixed, **norms.values}
  factor = 1.0
  for i, b in enumerate(net.blocks):
    factor *= vals[(i, 2)] + max(abs(b.alpha), abs(b.beta)) * vals[(i, 1)] * vals[(i, 0)]
  rows = np.asarray(jax.jit(liplt.class_rows)(LipNet((), net.readout))[0], np.float64)
  return lambda mode: _row_norms64(rows, mode, "l2") * factor, info
