"""Proposition 3.1 layers: sqrt(rho)-Lipschitz by construction, and their LMI holds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crmjax import controlled as C
from crmjax import layers as L
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
    for seed, (scale, act) in enumerate([(0.1, L.Act()), (1.0, L.Act()), (10.0, L.Act()),
                                         (1.0, L.Act("tanh")),
                                         (3.0, L.Act("leaky_relu", 0.3))]):
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
      t = np.asarray(C.conv_scaling(p["kernel"], (5, 4, 2), stride=stride, padding=1,
                                    rho=rho, q=jnp.exp(p["log_q"]) if "log_q" in p else None))
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
          assert np.linalg.eigvalsh(lmi).min() >= -1e-6 * max(1.0, scale ** 2)


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
    np.testing.assert_allclose(jnp.sum(op(x) * y), jnp.sum(x * C.transpose(op)(y)),
                               rtol=1e-10)
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
      np.asarray(x[1:] - x[:-1]), axis=1)
  assert y.dtype == jnp.float32 and ratio.max() <= TOL
  with pytest.raises(ValueError, match="0 <= alpha"):
    C.ControlledDense(4, act=L.Act("custom", fn=jnp.tanh, slopes=(-0.5, 1.0))).init(
        jax.random.key(0), jnp.zeros((1, 3)))
  with pytest.raises(ValueError, match="rescaling"):
    C.ControlledDense(4, rescaling="bjorck").init(jax.random.key(0), jnp.zeros((1, 3)))
