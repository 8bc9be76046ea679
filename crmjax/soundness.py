"""Guaranteed Lipschitz bounds for certificates.

Training uses warm-started power iteration, whose estimates of each interior norm
``||W_e Hhat .. G_j||`` can lie BELOW the true norm. A certificate may not. Here every
operator norm of eq. 19 (and of the naive product) is replaced by an upper bound that is
guaranteed, or holds with a stated probability over a random start:

* **exact**: operators whose smaller side has at most ``exact_max_dim`` dimensions are
  materialised (a batched application of the operator to the basis vectors of its smaller
  side, float32 at the highest matmul precision) and their norm is the square root of the
  top eigenvalue of the float64 Gram matrix. Class rows (``c^T R Hhat .. G_j``) are always
  exact: their norms are taken from the float64 rows themselves (no Gram cancellation).
* **probabilistic, Lanczos** (``estimator='lanczos'``, the default): for a larger operator
  ``M`` (``n_in -> n_out``), ``k = num_iters`` steps of the Lanczos algorithm with full
  reorthogonalisation on ``A = M^T M`` (or ``M M^T`` when ``n_out < n_in``), of order
  ``n = min(n_in, n_out)``, from a start ``b`` uniform on the unit sphere of ``R^n``. The
  Krylov basis and the tridiagonal matrix are float64 on the host; ``A`` is applied in
  float32 at the highest matmul precision (covered by ``margin``, below). The estimate
  ``theta`` is the largest eigenvalue of the ``k x k`` Lanczos matrix ``T_k`` (the largest
  Ritz value), raised to the Rayleigh quotient of its Ritz vector under the real operator
  and to the warm training estimate where given (raising an estimate keeps the guarantee).

  *Theorem* (Kuczynski & Wozniakowski, "Estimating the largest eigenvalue by the power
  and Lanczos algorithms with a random start", SIAM J. Matrix Anal. Appl. 13(4):1094-1122,
  1992, the probabilistic Lanczos bound): for a symmetric positive definite ``n x n``
  matrix ``A`` with largest eigenvalue ``lambda``, ``b`` uniform on the unit sphere and the
  largest Ritz value ``xi_k`` of the Krylov space ``span(b, A b, .., A^{k-1} b)`` (``k``
  products with ``A``; the paper's "Krylov information ``[b, .., A^k b]``"), for every
  ``eps`` in ``(0, 1)``:

      P{ (lambda - xi_k) / lambda > eps } <= 1.648 sqrt(n) exp(-sqrt(eps) (2k - 1)).

  Here ``A = M^T M`` is only positive SEMI-definite; the bound carries over: ``A + tI``
  (``t > 0``) is definite, has the same Krylov spaces and Ritz values ``xi_k + t``, so
  ``{(lambda - xi_k)/lambda > eps}`` lies in the limit inferior of the events for ``A + tI``
  as ``t -> 0`` and Fatou's lemma gives the same bound (``lambda = 0`` is trivial). Solving
  for the failure probability ``delta`` of one operator,

      rel_err = (ln(1.648 sqrt(n) / delta) / (2k - 1))^2,   ||M|| <= sqrt(theta / (1 - rel_err))

  with probability at least ``1 - delta`` (``lanczos_rel_err``; ``rel_err >= 1``, i.e. too
  few steps, is an error). At ``n = 10^4``, ``delta = 10^-7``: 300 steps give ``rel_err =
  1.2e-3`` (norms inflated by 6e-4), 1000 steps ``1.1e-4``. The same statement bounds
  ``(lambda - xi_k) / (lambda - lambda_min)``, as J. Urschel ("Uniform error estimates for
  the Lanczos method", arXiv:2003.09362) quotes it for ``T_m (m x m)`` after ``m`` steps;
  for a PSD ``A`` that ratio is the larger one, so either reading gives the bound used here.
* **probabilistic, power method** (``estimator='power'``: the bound before Lanczos, kept so
  that old and new certificates can be compared): ``k`` power iterations from a random
  start and ``sigma_est / sqrt(1 - rel_err)`` with ``delta = 0.824 sqrt(n) (1 -
  rel_err)^((k - 1) / 2)`` (a conservative form of the power-method bound of the same paper,
  whose failure decays like ``sqrt(n) (1 - eps)^k``; ``power_rel_err``). It needs ~30x the
  steps of Lanczos for the same ``rel_err``.

Each probabilistic norm gets the failure probability ``failure_prob / (number of
probabilistic norms)``, so that all of them hold together with probability at least ``1 -
failure_prob`` (union bound). The random starts must not depend on the network: ``key``
(an int seed, or a ``jax.random`` key) defaults to 63 bits of operating-system entropy
(``secrets``), is recorded as ``info['key']``, and passing it back reproduces the bound bit
for bit.

**l_inf** needs no iteration: ``max(|A_n| .. |A_1| 1)`` is an upper bound (exact for
single operators); the bound is ``liplt.liplt_bound`` / ``naive_bound`` with ``norm='linf'``.

**Rounding margin.** Every bound is multiplied by ``(1 + margin)^f`` (default ``margin =
1e-4``), ``f`` the largest number of norms multiplied in one term: ``L + 1`` for LipLT (eq.
19: ``m_e`` multiplies ``e + 1`` interior norms, the readout one more) and ``2L + 1`` for
the naive bound (``||c^T R||`` and ``||G_k|| ||W_k||`` per block). It covers the float32
rounding of the materialisation and of the Lanczos products, and of the logits, which
``crmjax.certify`` computes at the highest matmul precision.

**Rescaled LipLT** (``method='liplt_aol'``, or ``method='liplt'`` with ``scales=``): the
same guaranteed computation on ``rescaling.rescale(net, D)``, a valid bound of ``net`` for
every positive diagonal ``D`` (``crmjax.rescaling``); ``'liplt_aol'`` takes the AOL scales,
``scales=`` any others (e.g. ``crmjax.refinement.optimize_scales``). The float32 rounding of
``1 / d`` makes ``G D^{-1} D`` differ from ``G`` by a relative ~1e-7 per block, far inside
the margin.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import secrets
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg  # a dependency of jax
import tqdm

from crmjax import liplt, rescaling
from crmjax import operators as ops
from crmjax.network import LipNet

LANCZOS_CONSTANT = 1.648  # Kuczynski & Wozniakowski 1992, the Lanczos failure bound
POWER_CONSTANT = 0.824  # the same paper, the power-method failure bound
ESTIMATORS = ("lanczos", "power")
# Defaults chosen by measurement on a 2-core CPU (docs/results.md, "Bounds of networks at
# initialisation"): Lanczos costs about one product with A^T A per step (milliseconds for
# 4C3F) plus the float64 reorthogonalisation; an exact norm costs a float64 Gram of n_small^2 n_large flops and an
# eigendecomposition of n_small^3.
EXACT_MAX_DIM = 1024
NUM_ITERS = 1000
_BREAKDOWN = 1e-12  # relative size of a Lanczos residual treated as an invariant subspace
# Computations on fewer numbers run eagerly: compiling them would cost more than it saves
# (tests build many tiny networks; every new one would compile a new program).
_EAGER_MAX = 1 << 16
LANCZOS_MEMORY = 1 << 30  # bytes of float64 Krylov bases held at once (operators are grouped)

Spec = tuple[Callable, tuple, tuple]  # (fn, in_shape, out_shape) of a linear operator


@dataclasses.dataclass(frozen=True)
class SoundSettings:
  """How a sound bound computes the norms it cannot materialise: one value, passed whole
  (``sound_bounds(..., settings=...)``, ``crmjax.certify.evaluate``, the report).

  Attributes:
    estimator: ``'lanczos'`` or ``'power'`` (``ESTIMATORS``).
    iterations: Lanczos steps (or power iterations) per operator too large to materialise.
    key: seed of the random starts: an int, a ``jax.random`` key, or ``None`` for fresh
      operating-system entropy per bound (``info['key']`` records the int used).
    failure_probability: total probability that some probabilistic norm is not an upper
      bound.
    exact_size: largest smaller-side dimension materialised exactly.
    progress: tqdm progress bars (stderr) over the exact norms and the Lanczos steps.
  """

  estimator: str = "lanczos"
  iterations: int = NUM_ITERS
  key: int | jax.Array | None = None
  failure_probability: float = 1e-6
  exact_size: int = EXACT_MAX_DIM
  progress: bool = False


DEFAULT_SETTINGS = SoundSettings()


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


# ----------------------------------------------------------------- failure probability


def lanczos_rel_err(*, n: int, num_iters: int, delta: float) -> float:
  """The relative eigenvalue error ``rel_err`` of ``k`` Lanczos steps at failure ``delta``.

  Solves ``delta = 1.648 sqrt(n) exp(-sqrt(rel_err) (2k - 1))`` (module docstring): with
  probability at least ``1 - delta`` the largest Ritz value is at least ``(1 - rel_err)``
  times the largest eigenvalue of the ``n x n`` matrix. Returns 1.0 (no guarantee) for
  ``k < 2`` or when no ``rel_err < 1`` reaches ``delta``.
  """
  if num_iters < 2:
    return 1.0
  root = math.log(LANCZOS_CONSTANT * math.sqrt(n) / delta) / (2 * num_iters - 1)
  return min(1.0, max(root, 0.0) ** 2)


def power_rel_err(*, n: int, num_iters: int, delta: float) -> float:
  """The relative error of ``k`` power iterations at failure ``delta`` (``estimator='power'``).

  Solves ``delta = 0.824 sqrt(n) (1 - rel_err)^((k - 1) / 2)``; 1.0 (no guarantee) for
  ``k < 2`` or ``delta >= 0.824 sqrt(n)``.
  """
  if num_iters < 2:
    return 1.0
  base = delta / (POWER_CONSTANT * math.sqrt(n))
  return 1.0 if base >= 1 else 1.0 - base ** (2.0 / (num_iters - 1))


def new_key() -> int:
  """A seed of 63 bits of operating-system entropy (``secrets``): independent of any network."""
  return secrets.randbits(63)


def seed_of(key: int | jax.Array | Sequence[int] | None) -> int:
  """The int seed of the random starts: ``key`` itself, ``new_key()`` for ``None``, or the
  key data of a ``jax.random`` key (new-style or raw ``uint32``) read as one integer."""
  if key is None:
    return new_key()
  if isinstance(key, (int, np.integer)):
    if key < 0:
      raise ValueError(f"key must be a non-negative int seed, got {key}")
    return int(key)
  arr = jnp.asarray(key) if isinstance(key, jax.Array) else np.asarray(key)
  if isinstance(arr, jax.Array) and jax.dtypes.issubdtype(arr.dtype, jax.dtypes.prng_key):
    arr = jax.random.key_data(arr)
  words = np.asarray(arr).astype(np.uint64).ravel()
  return int(sum(int(w) << (32 * i) for i, w in enumerate(words[::-1])))


# ------------------------------------------------------------------------ exact norms


def _gram_top_eigenvalue(mat: np.ndarray) -> float:
  """Largest squared singular value of a float matrix, in float64."""
  m = np.asarray(mat, np.float64)
  gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
  return float(np.linalg.eigvalsh(gram)[-1])


def _jit(fn, size: int):
  """``jax.jit(fn)``, or ``fn`` itself (eager) when it handles at most ``_EAGER_MAX`` numbers."""
  return fn if size <= _EAGER_MAX else jax.jit(fn)


def _net_size(net: LipNet) -> int:
  """The number of entries of the largest single operator of ``net`` (for ``_jit``)."""
  sizes = [ops.size(b.W.in_shape) * ops.size(b.W.out_shape) for b in net.blocks]
  return max(sizes + [ops.size(net.readout.in_shape) * net.num_classes])


def exact_norm(fn, in_shape, out_shape, *, chunk: int = 1024) -> float:
  """The l2 norm of a linear map, materialised along its smaller side (float64 Gram)."""
  n_in, n_out = ops.size(in_shape), ops.size(out_shape)
  if n_in <= n_out:
    f = _jit(lambda b: fn(b).reshape(b.shape[0], -1), n_in * n_out)
    cols = [
      np.asarray(f(jnp.eye(n_in, dtype=jnp.float32)[i : i + chunk].reshape(-1, *in_shape)))
      for i in range(0, n_in, chunk)
    ]
    return math.sqrt(max(_gram_top_eigenvalue(np.concatenate(cols)), 0.0))
  _, vjp = jax.vjp(fn, jnp.zeros((1, *in_shape)))
  f = _jit(jax.vmap(lambda c: vjp(c.reshape(1, *out_shape))[0].reshape(-1)), n_in * n_out)
  rows = [
    np.asarray(f(jnp.eye(n_out, dtype=jnp.float32)[i : i + chunk])) for i in range(0, n_out, chunk)
  ]
  return math.sqrt(max(_gram_top_eigenvalue(np.concatenate(rows)), 0.0))


# -------------------------------------------------------------------------- Lanczos


def _gram_apply(specs: Sequence[Spec]):
  """Jitted ``(v_1, .., v_m) -> (A_1 v_1, .., A_m v_m)`` on flat float32 vectors, with
  ``A_i = M_i^T M_i`` on the input side of ``M_i`` or ``M_i M_i^T`` on its output side,
  whichever is smaller (``_side``)."""

  def apply(vs):
    out = []
    for (fn, s_in, s_out), v in zip(specs, vs):
      if _side(s_in, s_out) == "in":
        y, vjp = jax.vjp(fn, v.reshape(1, *s_in))
        out.append(vjp(y)[0].reshape(-1))
      else:
        _, vjp = jax.vjp(fn, jnp.zeros((1, *s_in), jnp.float32))
        out.append(fn(vjp(v.reshape(1, *s_out))[0]).reshape(-1))
    return tuple(out)

  return jax.jit(apply)


def _side(s_in, s_out) -> str:
  return "in" if ops.size(s_in) <= ops.size(s_out) else "out"


def _dot(a: np.ndarray, b: np.ndarray) -> float:
  # einsum, not BLAS: OpenBLAS threads busy-wait on a loaded machine (10x slower there)
  return float(np.einsum("i,i->", a, b))


def _norm(v: np.ndarray) -> float:
  return math.sqrt(_dot(v, v))


class _Lanczos:
  """Host-side Lanczos with full reorthogonalisation (float64) for one symmetric PSD ``A``."""

  def __init__(self, n: int, num_iters: int, rng: np.random.Generator):
    self.n, self.k, self.rng = n, min(num_iters, n), rng
    self.q = np.empty((self.k, n), np.float64)
    self.q[0] = self._unit(rng.standard_normal(n))
    self.alpha, self.beta, self.scale = [], [], 0.0

  @staticmethod
  def _unit(v):
    return v / _norm(v)

  def _orthogonalise(self, w, j):
    """Full reorthogonalisation against ``q_0..q_j``: classical Gram-Schmidt, repeated once
    when the norm drops below ``1/sqrt(2)`` of its value (Daniel-Gragg-Kaufman-Stewart;
    "twice is enough")."""
    basis = self.q[: j + 1]
    for _ in range(2):
      before = _norm(w)
      w = w - np.einsum("ij,i->j", basis, np.einsum("ij,j->i", basis, w))
      if _norm(w) > 0.7071 * before:
        break
    return w

  def step(self, j: int, w: np.ndarray) -> None:
    """Takes ``w = A q_j`` and appends ``alpha_j`` (and ``beta_j``, ``q_{j+1}``)."""
    q = self.q[j]
    a = _dot(q, w)
    self.alpha.append(a)
    if j + 1 == self.k:
      return
    w = w - a * q - (self.beta[-1] * self.q[j - 1] if j else 0.0)
    w = self._orthogonalise(w, j)
    b = _norm(w)
    self.scale = max(self.scale, abs(a), b)  # a lower estimate of ||A||
    if not b > _BREAKDOWN * self.scale:
      # An invariant subspace: continue in a fresh direction (the space only grows, so the
      # largest Ritz value can only rise; T_k gets a zero coupling).
      w, b = self._orthogonalise(self.rng.standard_normal(self.n), j), 0.0
    self.beta.append(b)
    self.q[j + 1] = self._unit(w)

  def orthogonality(self) -> float:
    """``max |Q Q^T - I|`` of the ``k`` basis vectors: the loss of orthogonality (float64).

    The failure bound (module docstring) holds for the Ritz values of the exact Krylov space;
    an unorthogonal basis (Lanczos without reorthogonalisation: Paige's ghost copies of
    converged Ritz values) voids it. One BLAS product of ``k^2 n`` flops.
    """
    q = self.q[: self.k]
    return float(np.abs(q @ q.T - np.eye(self.k)).max())

  def ritz(self) -> tuple[float, np.ndarray]:
    """The largest eigenvalue of ``T_k`` and its Ritz vector (unit, float64)."""
    if self.k == 1:
      vals, vecs = np.array([self.alpha[0]]), np.ones((1, 1))
    else:  # LAPACK bisection + inverse iteration on the tridiagonal matrix (no dense eigh)
      vals, vecs = scipy.linalg.eigh_tridiagonal(
        np.asarray(self.alpha),
        np.asarray(self.beta[: self.k - 1]),
        select="i",
        select_range=(self.k - 1, self.k - 1),
      )
    return float(vals[-1]), self._unit(np.einsum("ij,i->j", self.q[: self.k], vecs[:, -1]))


def lanczos_norms(
  specs: Sequence[Spec],
  *,
  key: int | jax.Array | None = None,
  num_iters: int = NUM_ITERS,
  progress: bool = False,
  memory: int = LANCZOS_MEMORY,
) -> list[dict]:
  """Lanczos estimates (lower estimates) of the l2 norms of several linear operators.

  Each ``A_i`` (``M_i^T M_i`` or ``M_i M_i^T``, the smaller side) gets ``min(num_iters, n_i)``
  Lanczos steps with full reorthogonalisation from its own start, uniform on the unit
  sphere (module docstring). Operators run together in groups whose float64 Krylov bases
  (``8 k n_i`` bytes each) fit in ``memory`` bytes; within a group the products with all
  ``A_i`` are one jitted call per step.

  Args:
    specs: ``(fn, in_shape, out_shape)`` per operator (``fn`` maps ``(1, *in_shape)`` to
      ``(1, *out_shape)``, linearly).
    key: seed of the random starts (``seed_of``); operator ``i`` draws from
      ``np.random.default_rng([seed, i])``.
    num_iters: Lanczos steps ``k``.
    progress: show a tqdm bar over the steps (stderr).
    memory: bytes of Krylov bases held at once (an operator larger than that runs alone).

  Returns:
    Per operator ``{'sigma': sqrt(estimate), 'ritz': largest Ritz value, 'rayleigh':
    Rayleigh quotient of its Ritz vector, 'n': order of A, 'steps': k, 'orthogonality':
    max |Q Q^T - I| of the Krylov basis}``; the estimate is ``max(ritz, rayleigh)``, a value
    that ``rel_err`` bounds from below (theorem).
  """
  seed = seed_of(key)
  specs = list(specs)
  if num_iters < 1:
    raise ValueError(f"num_iters must be >= 1, got {num_iters}")
  dims = [
    ops.size(s_in) if _side(s_in, s_out) == "in" else ops.size(s_out) for _, s_in, s_out in specs
  ]
  groups, used = [], memory + 1
  for i, n in enumerate(dims):
    size = 8 * min(num_iters, n) * n
    if used + size > memory:
      groups.append([])
      used = 0
    groups[-1].append(i)
    used += size
  res = [None] * len(specs)
  bar = tqdm.tqdm(
    total=sum(max(min(num_iters, dims[i]) for i in g) for g in groups),
    desc="Lanczos",
    unit=" steps",
    disable=not progress,
    file=sys.stderr,
    leave=False,
  )
  with jax.default_matmul_precision("highest"), bar:
    for group in groups:
      runs = [_Lanczos(dims[i], num_iters, np.random.default_rng([seed, i])) for i in group]
      apply = _gram_apply([specs[i] for i in group])
      for j in range(max(r.k for r in runs)):
        outs = apply(tuple(jnp.asarray(r.q[min(j, r.k - 1)], jnp.float32) for r in runs))
        for r, o in zip(runs, outs):
          if j < r.k:
            r.step(j, np.asarray(o, np.float64))
        bar.update()
      ritz = [r.ritz() for r in runs]
      outs = apply(tuple(jnp.asarray(y, jnp.float32) for _, y in ritz))
      for i, (theta, y), o, r in zip(group, ritz, outs, runs):
        rayleigh = _dot(y, np.asarray(o, np.float64))
        res[i] = {
          "sigma": math.sqrt(max(theta, rayleigh, 0.0)),
          "ritz": theta,
          "rayleigh": rayleigh,
          "n": r.n,
          "steps": r.k,
          "orthogonality": r.orthogonality(),
        }
  return res


def _power_norms(specs: Sequence[Spec], *, seed: int, num_iters: int) -> list[float]:
  """``num_iters`` power iterations on ``M^T M`` (input side) from random unit starts."""
  rng = np.random.default_rng(seed)
  us = []
  for _, s_in, _ in specs:
    u = rng.standard_normal((1, *s_in))
    us.append(jnp.asarray(u / np.linalg.norm(u), jnp.float32))
  fn = lambda us: tuple(f(u) for (f, _, _), u in zip(specs, us))
  us = jax.jit(lambda u: liplt.power_iterate(fn, u, num_iters))(tuple(us))
  return [float(np.linalg.norm(np.asarray(y, np.float64))) for y in jax.jit(fn)(us)]


def _warm_norms(specs: Sequence[Spec], warm: Sequence[jax.Array]) -> list[float]:
  """``||M u|| / ||u||`` for given vectors ``u`` (lower estimates of ``||M||``)."""
  fn = lambda us: tuple(f(u) for (f, _, _), u in zip(specs, us))
  ys = jax.jit(fn)(tuple(warm))
  return [
    float(
      np.linalg.norm(np.asarray(y, np.float64))
      / max(np.linalg.norm(np.asarray(u, np.float64)), 1e-300)
    )
    for y, u in zip(ys, warm)
  ]


class _Norms:
  """Collects upper bounds of operator norms: exact when small, else probabilistic."""

  def __init__(
    self, *, exact_max_dim, estimator, num_iters, seed, progress, cache=None, fingerprint=""
  ):
    self.exact_max_dim, self.estimator, self.num_iters = exact_max_dim, estimator, num_iters
    self.seed, self.progress, self.cache, self.fingerprint = seed, progress, cache, fingerprint
    self.exact, self.pending, self.values, self.details = [], [], {}, []

  def add(self, name, fn, in_shape, out_shape, warm=None):
    spec = (fn, tuple(in_shape), tuple(out_shape))
    if min(ops.size(in_shape), ops.size(out_shape)) <= self.exact_max_dim:
      self.exact.append((name, spec))
    else:
      self.pending.append((name, spec, warm))

  def finish(self, failure_prob: float) -> dict:
    specs = [spec for _, spec, _ in self.pending]
    if self.estimator == "lanczos":
      dims = [min(ops.size(s[1]), ops.size(s[2])) for s in specs]
      steps = [min(self.num_iters, n) for n in dims]
    else:
      dims, steps = [ops.size(s[1]) for s in specs], [self.num_iters] * len(specs)
    delta = failure_prob / max(len(self.pending), 1)
    rel = lanczos_rel_err if self.estimator == "lanczos" else power_rel_err
    errs = [rel(n=n, num_iters=k, delta=delta) for n, k in zip(dims, steps)]
    for n, k, err in zip(dims, steps, errs):
      if err >= 1.0:
        raise ValueError(
          f"{k} {self.estimator} iterations cannot reach failure probability "
          f"{failure_prob} for an operator of order {n}: raise num_iters"
        )
    for name, spec in tqdm.tqdm(
      self.exact, desc="exact norms", disable=not self.progress, file=sys.stderr, leave=False
    ):
      key = (self.fingerprint, name)
      if self.cache is None or key not in self.cache:
        value = exact_norm(*spec)
        if self.cache is not None:
          self.cache[key] = value
      self.values[name] = value if self.cache is None else self.cache[key]
      self.details.append(
        {
          "operator": name,
          "how": "exact",
          "value": self.values[name],
          "n": min(ops.size(spec[1]), ops.size(spec[2])),
          "rel_err": 0.0,
        }
      )
    info = {
      "estimator": self.estimator,
      "num_iters": self.num_iters,
      "key": self.seed,
      "exact_max_dim": self.exact_max_dim,
      "exact_norms": len(self.exact),
      "probabilistic_norms": len(self.pending),
      "failure_probability": 0.0,
      "max_rel_err": 0.0,
      "max_relative_inflation": 0.0,
      "norms": self.details,
    }
    if not self.pending:
      return info
    if self.estimator == "lanczos":
      est = [
        r["sigma"]
        for r in lanczos_norms(
          specs, key=self.seed, num_iters=self.num_iters, progress=self.progress
        )
      ]
    else:
      est = _power_norms(specs, seed=self.seed, num_iters=self.num_iters)
    if all(w is not None for *_, w in self.pending):
      warm = _warm_norms(specs, [w for *_, w in self.pending])
      est = [max(a, b) for a, b in zip(est, warm)]
    for (name, _, _), sigma, n, err in zip(self.pending, est, dims, errs):
      self.values[name] = sigma / math.sqrt(1.0 - err)
      self.details.append(
        {
          "operator": name,
          "how": self.estimator,
          "value": self.values[name],
          "n": n,
          "rel_err": err,
          "estimate": sigma,
        }
      )
    worst = max(errs)
    info.update(
      failure_probability=failure_prob,
      max_rel_err=worst,
      max_relative_inflation=1.0 / math.sqrt(1.0 - worst) - 1.0,
    )
    return info


# ----------------------------------------------------------------------- the bounds


def _row_norms64(rows: np.ndarray, mode: str, norm: str):
  rows = np.asarray(rows, np.float64)
  vec = (lambda a: np.linalg.norm(a, axis=-1)) if norm == "l2" else (lambda a: np.abs(a).sum(-1))
  if mode == "per_class":
    return vec(rows)
  if mode == "global":
    if norm == "l2":
      return math.sqrt(max(_gram_top_eigenvalue(rows), 0.0))
    return float(vec(rows).max())
  return np.stack([vec(rows[i][None] - rows) for i in range(rows.shape[0])])


def sound_bound(
  net: LipNet, *, method: str = "liplt", mode: str = "pairwise", norm: str = "l2", **kwargs
) -> tuple[np.ndarray, dict]:
  """A guaranteed upper bound (float64) for certificates; see the module docstring.

  Args:
    net: the network (eq. 17 form).
    method: ``'liplt'`` (eq. 19), ``'naive'`` or ``'liplt_aol'`` (eq. 19 of the AOL-rescaled
      network, module docstring).
    mode: ``'pairwise'`` ``(K, K)``, ``'per_class'`` ``(K,)`` or ``'global'`` ``()``.
    norm: ``'l2'`` or ``'linf'``.
    **kwargs: ``scales``, ``warm``, ``key``, ``estimator``, ``num_iters``, ``failure_prob``,
      ``exact_max_dim``, ``margin``, ``progress``, ``exact_cache``, ``settings`` of
      ``sound_bounds``.

  Returns:
    ``(bound, info)``; ``info['kind']`` says whether the bound is deterministic or holds
    with probability ``1 - failure_prob``; ``info`` also counts exact / probabilistic norms
    and records the estimator and the ``key`` that reproduces the bound.
  """
  bounds, info = sound_bounds(net, method=method, modes=(mode,), norm=norm, **kwargs)
  return bounds[mode], info


def sound_bounds(
  net: LipNet,
  *,
  method: str = "liplt",
  modes=liplt.MODES,
  norm: str = "l2",
  scales: rescaling.Scales | None = None,
  warm: liplt.PowerState | None = None,
  key: int | jax.Array | None = None,
  estimator: str = "lanczos",
  num_iters: int = NUM_ITERS,
  failure_prob: float = 1e-6,
  exact_max_dim: int = EXACT_MAX_DIM,
  margin: float = 1e-4,
  progress: bool = False,
  exact_cache: dict | None = None,
  settings: SoundSettings | None = None,
) -> tuple[dict[str, np.ndarray], dict]:
  """``sound_bound`` for several modes at once (the operator norms are computed once).

  Args:
    net, method, norm: as ``sound_bound``.
    modes: the modes wanted.
    scales: ``method='liplt'`` only: positive diagonal scales per block (``None`` entries
      leave a block as is); the bound is that of ``rescaling.rescale(net, scales)``.
    warm: the training ``PowerState``, used only to raise the estimates (any vectors give
      valid lower estimates, so warm vectors of another rescaling are fine).
    key: seed of the random starts: an int, a ``jax.random`` key, or ``None`` for fresh
      operating-system entropy (``new_key``); ``info['key']`` records the int used.
    estimator: ``'lanczos'`` (default) or ``'power'`` (the former bound, for comparison).
    num_iters: Lanczos steps (or power iterations) for operators too large to materialise.
    failure_prob: total probability that some probabilistic norm is not an upper bound.
    exact_max_dim: largest smaller-side dimension materialised exactly.
    margin: relative inflation per multiplied norm for float32 rounding (module docstring).
    progress: tqdm progress bars (stderr) over the exact norms and the Lanczos steps.
    exact_cache: a dict to share exact norms between calls (e.g. the same network bounded
      with two estimators); entries are keyed by a SHA-256 fingerprint of the (rescaled)
      network's arrays and structure, so a cache shared across networks stays correct.
    settings: when given, its fields replace ``key``, ``estimator``, ``num_iters``,
      ``failure_prob``, ``exact_max_dim`` and ``progress``.

  Returns:
    ``({mode: bound}, info)``; ``info`` holds ``kind``, ``method``, ``norm``, ``estimator``,
    ``key``, ``failure_probability``, ``exact_norms``, ``probabilistic_norms``,
    ``max_rel_err``, ``norms`` (per operator: how, value, order ``n``, ``rel_err``), the
    eq. 19 table (``interior_norms``, ``interior_bounds``) or naive ``layer_norms``, and
    ``rescaling`` (``'none'``, ``'aol'`` or ``'given'``).
  """
  if settings is not None:
    key, estimator, num_iters = settings.key, settings.estimator, settings.iterations
    failure_prob, exact_max_dim = settings.failure_probability, settings.exact_size
    progress = settings.progress
  for mode in modes:
    liplt._check(method, mode, norm)  # pylint: disable=protected-access
  if estimator not in ESTIMATORS:
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
  if not 0.0 < failure_prob < 1.0:
    raise ValueError(f"failure_prob must be in (0, 1), got {failure_prob}")
  if margin < 0:
    raise ValueError(f"margin must be >= 0, got {margin}")
  net, rescaled = _rescaled(net, method, scales)
  base = "naive" if method == "naive" else "liplt"
  seed = seed_of(key)
  with jax.default_matmul_precision("highest"):
    if norm == "linf":
      bounds = _linf(net, base, modes)
      info = {
        "estimator": "none (l_inf: |A_n|..|A_1| 1)",
        "key": seed,
        "exact_norms": 0,
        "probabilistic_norms": 0,
        "failure_probability": 0.0,
        "max_rel_err": 0.0,
      }
    else:
      norms = _Norms(
        exact_max_dim=exact_max_dim,
        estimator=estimator,
        num_iters=num_iters,
        seed=seed,
        progress=progress,
        cache=exact_cache,
        fingerprint="" if exact_cache is None else fingerprint(net) + base,
      )
      fn = _liplt_l2 if base == "liplt" else _naive_l2
      readout, info = fn(net, warm, norms, failure_prob)
      bounds = {mode: readout(mode) for mode in modes}
  factors = num_factors(len(net.blocks), method=base)
  inflate = (1.0 + margin) ** factors
  bounds = {m: np.asarray(b, np.float64) * inflate for m, b in bounds.items()}
  info["kind"] = bound_kind(info["failure_probability"])
  info.update(
    norm=norm, method=method, relative_margin=margin, margin_factors=factors, rescaling=rescaled
  )
  return bounds, info


def bound_kind(failure_probability: float) -> str:
  """``info['kind']`` of a bound that fails with at most ``failure_probability``."""
  if failure_probability == 0:
    return "guaranteed upper bound"
  return f"upper bound with probability >= {1 - failure_probability:.10g}"


def fingerprint(net: LipNet) -> str:
  """SHA-256 of a network's arrays (bytes, shapes, dtypes) and structure (static fields)."""
  h = hashlib.sha256()
  leaves, treedef = jax.tree.flatten(net)
  h.update(str(treedef).encode())
  for leaf in leaves:
    a = np.asarray(leaf)
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def num_factors(num_blocks: int, *, method: str) -> int:
  """The most norms multiplied in one term: ``L + 1`` (LipLT) or ``2L + 1`` (naive)."""
  return num_blocks + 1 if method != "naive" else 2 * num_blocks + 1


def _rescaled(net: LipNet, method: str, scales) -> tuple[LipNet, str]:
  """The network whose LipLT bound is computed, and which rescaling it carries."""
  if scales is not None and method != "liplt":
    raise ValueError(f"scales= rescales the LipLT bound: use method='liplt', not {method!r}")
  if method == "liplt_aol":
    return rescaling.rescale(net, _jit(rescaling.aol_scales, _net_size(net))(net)), "aol"
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


def _linf(net: LipNet, method: str, modes) -> dict[str, np.ndarray]:
  """The l_inf LipLT / naive bound with its readout in float64 (``liplt``'s l_inf bound)."""
  size = _net_size(net)
  if method == "liplt":
    L = len(net.blocks)
    table = np.asarray(
      _jit(lambda n: liplt.interior_table(n, norm="linf")[0], size)(net), np.float64
    )
    radii = np.array([b.radius for b in net.blocks], np.float64)
    m = np.zeros(L)
    for e in range(L):
      m[e] = table[e, 0] + sum(radii[j] * table[e, j + 1] * m[j] for j in range(e))
    rows = [np.asarray(r, np.float64) for r in _jit(liplt.class_rows, size)(net)]

    def readout(mode):
      out = _row_norms64(rows[0], mode, "linf")
      for j in range(L):
        out = out + radii[j] * _row_norms64(rows[j + 1], mode, "linf") * m[j]
      return out
  else:
    norms = np.asarray(_jit(lambda n: liplt.layer_norms(n, norm="linf")[0], size)(net), np.float64)
    factor = 1.0
    for (w, g, h), b in zip(norms, net.blocks):
      factor *= h + max(abs(b.alpha), abs(b.beta)) * g * w
    rows = np.asarray(_jit(liplt.class_rows, size)(LipNet((), net.readout))[0], np.float64)
    readout = lambda mode: _row_norms64(rows, mode, "linf") * factor
  return {mode: np.asarray(readout(mode), np.float64) for mode in modes}


def _liplt_l2(net, warm, norms: _Norms, failure_prob):
  L = len(net.blocks)
  for e in range(L):
    for t in range(e + 1):
      fn, s_in, s_out = interior_operator(net, t, e)
      w = None if warm is None else warm.liplt[t][e - t][None]
      norms.add(f"A[{e},{t}]", fn, s_in, s_out, w)
  info = norms.finish(failure_prob)
  table = np.zeros((L, L))
  for e in range(L):
    for t in range(e + 1):
      table[e, t] = norms.values[f"A[{e},{t}]"]
  radii = np.array([b.radius for b in net.blocks], np.float64)
  m = np.zeros(L)
  for e in range(L):
    m[e] = table[e, 0] + sum(radii[j] * table[e, j + 1] * m[j] for j in range(e))
  rows = [np.asarray(r, np.float64) for r in _jit(liplt.class_rows, _net_size(net))(net)]

  def readout(mode):
    out = _row_norms64(rows[0], mode, "l2")
    for j in range(L):
      out = out + radii[j] * _row_norms64(rows[j + 1], mode, "l2") * m[j]
    return out

  info.update(interior_norms=table.tolist(), interior_bounds=m.tolist())
  return readout, info


def _naive_l2(net, warm, norms: _Norms, failure_prob):
  fixed = {}
  for i, b in enumerate(net.blocks):
    for j, op in enumerate((b.W, b.G, b.H)):
      name = f"block{i}.{'WGH'[j]}"
      if op is None:
        fixed[name] = 1.0 if j == 1 else 0.0
      elif ops.is_isometry(op):
        fixed[name] = 1.0
      elif isinstance(op, ops.Scale):
        fixed[name] = float(np.max(np.abs(np.asarray(op.scale))))
      else:
        w = None if warm is None else warm.naive[i][j]
        norms.add(name, op, op.in_shape, op.out_shape, w)
  info = norms.finish(failure_prob)
  vals = {**fixed, **norms.values}
  table = [[vals[f"block{i}.{c}"] for c in "WGH"] for i in range(len(net.blocks))]
  factor = 1.0
  for (w, g, h), b in zip(table, net.blocks):
    factor *= h + max(abs(b.alpha), abs(b.beta)) * g * w
  rows = np.asarray(_jit(liplt.class_rows, _net_size(net))(LipNet((), net.readout))[0], np.float64)
  info["layer_norms"] = table
  return lambda mode: _row_norms64(rows, mode, "l2") * factor, info
