"""Independent float64 numpy references: explicit matrices, exact SVD norms, eq. 19 by hand.

Nothing here imports crmjax's operators or bounds: convolutions are built as explicit
matrices with loops, the Proposition 3.1 scaling ``T`` from those matrices, and the LipLT
recursion is written out term by term (layer specs are read only for their attributes).
"""

from __future__ import annotations

import itertools

import numpy as np

from crmjax import layers as L
from crmjax.controlled import Controlled


def conv_matrix(kernel, in_shape, stride, pad):
  """The (out, in) matrix of a zero-padded 2-D convolution, HWC flattening, HWIO kernel."""
  kernel = np.asarray(kernel, np.float64)
  h, w, c = in_shape
  kh, kw, ci, co = kernel.shape
  assert ci == c
  oh = (h + 2 * pad - kh) // stride + 1
  ow = (w + 2 * pad - kw) // stride + 1
  M = np.zeros((oh, ow, co, h, w, c))
  for i, j, a, b in itertools.product(range(oh), range(ow), range(kh), range(kw)):
    y, x = i * stride + a - pad, j * stride + b - pad
    if 0 <= y < h and 0 <= x < w:
      M[i, j, :, y, x, :] += kernel[a, b].T
  return M.reshape(oh * ow * co, h * w * c), (oh, ow, co)


def avg_pool_matrix(in_shape, window, strides, pads, count_include_pad=True):
  """The (out, in) matrix of 2-D average pooling with zero padding ``((t, b), (l, r))``."""
  h, w, c = in_shape
  (kh, kw), (sh, sw), ((pt, pb), (pl, pr)) = window, strides, pads
  oh, ow = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
  M = np.zeros((oh, ow, c, h, w, c))
  for i, j in itertools.product(range(oh), range(ow)):
    taps = [
      (i * sh + a - pt, j * sw + b - pl)
      for a, b in itertools.product(range(kh), range(kw))
      if 0 <= i * sh + a - pt < h and 0 <= j * sw + b - pl < w
    ]
    d = kh * kw if count_include_pad else len(taps)
    for y, x in taps:
      M[i, j, :, y, x, :] += np.eye(c) / d
  return M.reshape(oh * ow * c, h * w * c), (oh, ow, c)


def layer_matrix(layer, params, shape):
  if isinstance(layer, L.Conv) and not isinstance(layer.kernel_size, int):
    raise TypeError(f"{layer}: the reference builds square, symmetric convolutions only")
  if isinstance(layer, L.Conv):
    return conv_matrix(params["kernel"], shape, layer.stride, layer.padding)
  if isinstance(layer, L.BatchNorm):
    s = np.broadcast_to(np.asarray(params["scale"], np.float64), shape).ravel()
    return np.diag(s), shape
  if isinstance(layer, L.AvgPool):
    return avg_pool_matrix(
      shape, layer.window, layer.strides, layer.padding, layer.count_include_pad
    )
  if isinstance(layer, L.GlobalAvgPool):
    h, w, c = shape
    return np.tile(np.eye(c), (1, h * w)) / (h * w), (c,)
  if isinstance(layer, L.Dropout):
    n = int(np.prod(shape))
    return np.eye(n), shape
  if isinstance(layer, L.Dense):
    k = np.asarray(params["kernel"], np.float64)
    return k.T, (k.shape[1],)
  if isinstance(layer, L.Flatten):
    n = int(np.prod(shape))
    return np.eye(n), (n,)
  if isinstance(layer, L.Normalize):
    s = np.broadcast_to(1.0 / np.asarray(layer.std, np.float64), shape).ravel()
    return np.diag(s), shape
  raise TypeError(layer)


def controlled_matrices(layer, params, shape):
  """(W, G, sqrt(rho)) of a Proposition 3.1 layer, ``T`` from the explicit matrices.

  ``T_i = 2 rho / (alpha + beta)^2 / ((|W| |W|^T q)_i / q_i)`` for convolutions and with
  ``|W W^T|`` in place of ``|W| |W|^T`` for dense layers; ``G = -(alpha + beta) / sqrt(rho)
  W^T diag(T)``.
  """
  a, b = layer.act.slope_bounds
  kernel = np.asarray(params["kernel"], np.float64)
  if layer.kind == "dense":
    W = kernel.T
    gram = np.abs(W @ W.T)
  else:
    pad = (layer.kernel_size - 1) // 2 if layer.padding is None else layer.padding
    W, _ = conv_matrix(kernel, shape, layer.stride, pad)
    Wa, _ = conv_matrix(np.abs(kernel), shape, layer.stride, pad)
    gram = Wa @ Wa.T
  q = np.ones(W.shape[0])
  if layer.rescaling == "sll":
    q = np.broadcast_to(
      np.exp(np.asarray(params["log_q"], np.float64)),
      (W.shape[0] // kernel.shape[-1], kernel.shape[-1]),
    ).ravel()
  t = 2 * layer.rho / (a + b) ** 2 / np.maximum(gram @ q / q, 1e-12)
  s = np.sqrt(layer.rho)
  return W, -(a + b) / s * W.T * t[None, :], s


def blocks_of(layers, params, input_shape):
  """[(W, G, H, alpha, beta)], R as float64 matrices (G None = I, H None = 0)."""
  blocks, pending, shape = [], np.eye(int(np.prod(input_shape))), tuple(input_shape)
  for i, layer in enumerate(layers):
    p = params.get(f"layer_{i}", {})
    if isinstance(layer, L.Act):
      blocks.append((pending, None, None) + tuple(layer.slope_bounds))
      pending = np.eye(pending.shape[0])
    elif isinstance(layer, L.Residual):
      k = [j for j, l in enumerate(layer.layers) if isinstance(l, L.Act)][0]
      W, s = np.eye(int(np.prod(shape))), shape
      for j, l in enumerate(layer.layers[:k]):
        M, s = layer_matrix(l, p.get(f"layer_{j}", {}), s)
        W = M @ W
      G = np.eye(int(np.prod(s)))
      for j, l in enumerate(layer.layers[k + 1 :], start=k + 1):
        M, s = layer_matrix(l, p.get(f"layer_{j}", {}), s)
        G = M @ G
      blocks.append((W @ pending, G, pending) + tuple(layer.layers[k].slope_bounds))
      pending = np.eye(pending.shape[0])
    elif isinstance(layer, Controlled):
      W, G, s = controlled_matrices(layer, p, shape)
      blocks.append((W @ pending, G, s * pending) + tuple(layer.act.slope_bounds))
      pending = np.eye(pending.shape[0])
    else:
      M, shape = layer_matrix(layer, p, shape)
      pending = M @ pending
  return blocks, pending


def op_norm(A, norm):
  if norm == "l2":
    return np.linalg.norm(A, 2) if A.size else 0.0
  return np.abs(A).sum(axis=1).max()


def readout_norms(A, mode, norm):
  K = A.shape[0]
  if mode == "global":
    return op_norm(A, norm)
  if mode == "per_class":
    return np.array([op_norm(A[i : i + 1], norm) for i in range(K)])
  return np.array(
    [
      [0.0 if i == j else op_norm(A[i : i + 1] - A[j : j + 1], norm) for j in range(K)]
      for i in range(K)
    ]
  )


def _hhat(W, G, H, a, b):
  n = W.shape[1]
  Gm = np.eye(W.shape[0]) if G is None else G
  Hm = np.zeros((Gm.shape[0], n)) if H is None else H
  return Hm + 0.5 * (a + b) * Gm @ W, Gm


def liplt_reference(blocks, R, *, mode="pairwise", norm="l2"):
  """Theorem 3.3 / eq. 19 written out with explicit products and exact norms."""
  hh = [_hhat(*blk) for blk in blocks]
  r = [0.5 * (b - a) for (_, _, _, a, b) in blocks]

  def chain(e, start):  # W_e Hhat_{e-1} .. Hhat_{start}, e < L
    P = blocks[e][0]
    for k in range(e - 1, start - 1, -1):
      P = P @ hh[k][0]
    return P

  m = []
  for e in range(len(blocks)):
    val = op_norm(chain(e, 0), norm)
    for j in range(e):
      val += r[j] * op_norm(chain(e, j + 1) @ hh[j][1], norm) * m[j]
    m.append(val)

  def rprod(start):
    P = R
    for k in range(len(blocks) - 1, start - 1, -1):
      P = P @ hh[k][0]
    return P

  out = readout_norms(rprod(0), mode, norm)
  for j in range(len(blocks)):
    out = out + r[j] * readout_norms(rprod(j + 1) @ hh[j][1], mode, norm) * m[j]
  return out, np.array(m)


def naive_reference(blocks, R, *, mode="pairwise", norm="l2"):
  factor = 1.0
  for W, G, H, a, b in blocks:
    nG = 1.0 if G is None else op_norm(G, norm)
    nH = 0.0 if H is None else op_norm(H, norm)
    factor *= nH + max(abs(a), abs(b)) * nG * op_norm(W, norm)
  return readout_norms(R, mode, norm) * factor
