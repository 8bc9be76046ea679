"""The convolution operators' custom VJPs against plain autodiff and explicit float64 matrices.

``operators.conv2d`` and ``operators.conv2d_transpose`` replace JAX's rules for the kernel
gradient of a transposed convolution (slow on XLA:CPU) by the forward convolution's kernel
gradient. These tests check that nothing else changes: values, first and second derivatives
equal autodiff of ``lax.conv_general_dilated`` in float64, and the transpose is the adjoint of
the explicit convolution matrix of ``tests/reference.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crmjax import layers as L
from crmjax import liplt, network
from crmjax import operators as ops
from tests import reference

# (input h, w, c), kernel (kh, kw, c, o), strides, padding
CASES = [
  ((6, 6, 2), (3, 3, 2, 3), (1, 1), ((1, 1), (1, 1))),
  ((8, 8, 2), (4, 4, 2, 3), (2, 2), ((1, 1), (1, 1))),
  ((7, 9, 3), (3, 2, 3, 2), (2, 3), ((0, 1), (1, 0))),
  ((9, 7, 1), (5, 4, 1, 2), (3, 2), ((2, 0), (1, 1))),
]


def _lax_conv(x, k, strides, padding):
  return jax.lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=ops._DN)


def _lax_transpose(g, k, x_shape, strides, padding):
  _, vjp = jax.vjp(lambda x: _lax_conv(x, k, strides, padding), jnp.zeros(x_shape, g.dtype))
  return vjp(g)[0]


def _arrays(in_shape, k_shape, strides, padding, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, *in_shape))
  k = rng.standard_normal(k_shape)
  y_shape = jax.eval_shape(lambda: _lax_conv(x, k, strides, padding)).shape
  g = rng.standard_normal(y_shape)
  h = rng.standard_normal(x.shape)
  return x, k, g, h


@pytest.mark.parametrize("in_shape,k_shape,strides,padding", CASES)
def test_conv2d_values_and_gradients_are_those_of_lax(in_shape, k_shape, strides, padding):
  with jax.enable_x64(True):
    x, k, g, _ = _arrays(in_shape, k_shape, strides, padding)
    np.testing.assert_allclose(
      ops.conv2d(x, k, strides, padding), _lax_conv(x, k, strides, padding), rtol=1e-12
    )
    loss = lambda fn: lambda x, k: jnp.sum(jnp.sin(fn(x, k, strides, padding)) * g)
    got = jax.grad(loss(ops.conv2d), argnums=(0, 1))(x, k)
    want = jax.grad(loss(_lax_conv), argnums=(0, 1))(x, k)
    for a, b in zip(got, want):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


# reference.conv_matrix takes one stride and one symmetric padding: the square cases.
@pytest.mark.parametrize("in_shape,k_shape,strides,padding", CASES[:2])
def test_conv2d_transpose_is_the_adjoint_of_the_explicit_matrix(
  in_shape, k_shape, strides, padding
):
  with jax.enable_x64(True):
    _, k, g, _ = _arrays(in_shape, k_shape, strides, padding)
    M, out_shape = reference.conv_matrix(k, in_shape, strides[0], padding[0][0])
    got = ops.conv2d_transpose(g, k, (2, *in_shape), strides, padding)
    want = (g.reshape(2, -1) @ M).reshape(2, *in_shape)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("in_shape,k_shape,strides,padding", CASES)
def test_conv2d_transpose_derivatives_are_those_of_lax(in_shape, k_shape, strides, padding):
  """First derivatives in the transpose's input and kernel, and a second derivative (the
  kernel gradient differentiated again) equal autodiff of the plain lax transpose."""
  with jax.enable_x64(True):
    x, k, g, h = _arrays(in_shape, k_shape, strides, padding)
    xs = x.shape

    def loss(fn):
      return lambda g, k: jnp.sum(jnp.cos(fn(g, k, xs, strides, padding)) * h)

    got = jax.grad(loss(ops.conv2d_transpose), argnums=(0, 1))(g, k)
    want = jax.grad(loss(_lax_transpose), argnums=(0, 1))(g, k)
    for a, b in zip(got, want):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)

    def second(fn):
      return lambda k: jnp.sum(jax.grad(loss(fn), argnums=1)(g, k) ** 2)

    np.testing.assert_allclose(
      jax.grad(second(ops.conv2d_transpose))(k), jax.grad(second(_lax_transpose))(k), rtol=1e-9
    )


def test_conv2d_under_vmap_and_jit():
  in_shape, k_shape, strides, padding = CASES[1]
  x, k, g, _ = _arrays(in_shape, k_shape, strides, padding)
  x, k, g = (jnp.asarray(a, jnp.float32) for a in (x, k, g))
  f = jax.jit(jax.vmap(lambda xi: ops.conv2d(xi[None], k, strides, padding)[0]))
  np.testing.assert_allclose(f(x), _lax_conv(x, k, strides, padding), rtol=1e-5, atol=1e-5)
  t = jax.vmap(lambda gi: ops.conv2d_transpose(gi[None], k, (1, *in_shape), strides, padding)[0])
  np.testing.assert_allclose(
    t(g), _lax_transpose(g, k, x.shape, strides, padding), rtol=1e-5, atol=1e-5
  )


def test_adjoint_operator_is_the_transpose():
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    op = ops.Conv(jnp.asarray(rng.standard_normal((4, 4, 2, 3))), (8, 8, 2), (2, 2), ((1, 1),) * 2)
    M, _ = reference.conv_matrix(op.kernel, op.in_shape, 2, 1)
    y = rng.standard_normal((5, *op.out_shape))
    got = ops.Adjoint(op)(y).reshape(5, -1)
    np.testing.assert_allclose(got, y.reshape(5, -1) @ M, rtol=1e-12, atol=1e-12)


LAYERS = (
  L.Conv(3, 3, 1, 1),
  L.Act(),
  L.Conv(4, 4, 2, 1),
  L.Act(),
  L.Flatten(),
  L.Dense(6),
  L.Act(),
  L.Dense(4),
)


@pytest.mark.parametrize("mode", ["pairwise", "per_class", "global"])
def test_bound_gradient_equals_autodiff_of_plain_convolutions(mode, monkeypatch):
  """The LipLT bound's value and parameter gradient (class rows, table and power iteration
  through strided convolutions) with the custom VJPs equal those of plain lax autodiff."""
  with jax.enable_x64(True):
    params = L.Sequential(LAYERS).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    state = liplt.init_state(network.from_layers(LAYERS, params, (8, 8, 1)), jax.random.key(1))
    state = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), state)

    def value_and_grad():
      def f(p):
        net = network.from_layers(LAYERS, p, (8, 8, 1))
        return jnp.sum(liplt.liplt_bound(net, state, mode=mode, num_iters=3)[0])

      return jax.value_and_grad(f)(params)

    got = value_and_grad()
    monkeypatch.setattr(ops, "conv2d", _lax_conv)
    want = value_and_grad()
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
