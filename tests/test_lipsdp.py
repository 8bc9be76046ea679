"""LipSDP-Neuron: exact on a rank-one net, and lower <= LipSDP, LipLT <= naive."""

import jax
import numpy as np
import pytest

pytest.importorskip("cvxpy")

from crmjax import liplt, lipsdp, network  # noqa: E402
from experiments import tightness  # noqa: E402
from experiments.configs import tightness as tightness_config  # noqa: E402


def test_exact_on_a_single_neuron_and_on_relu_identity():
  rng = np.random.default_rng(0)
  w0, w1 = rng.normal(size=(1, 5)), rng.normal(size=(3, 1))
  got = lipsdp.lipsdp_neuron([w0, w1])
  np.testing.assert_allclose(got["bound"], np.linalg.norm(w0) * np.linalg.norm(w1), rtol=1e-4)
  assert got["lmi_max_eig"] <= 1e-8
  ident = lipsdp.lipsdp_neuron([np.eye(4), np.eye(4)])  # x -> relu(x): constant 1
  np.testing.assert_allclose(ident["bound"], 1.0, rtol=1e-4)


def test_certified_rho_is_the_smallest_valid_rho_for_t():
  rng = np.random.default_rng(1)
  ws = [rng.normal(size=(6, 4)) / 2, rng.normal(size=(5, 6)) / 2.5, rng.normal(size=(2, 5)) / 2.2]
  res = lipsdp.lipsdp_neuron(ws)
  M = lipsdp.lmi_matrix(ws, res["rho"], res["t"])
  assert np.linalg.eigvalsh(M)[-1] <= 1e-8 * res["rho"]
  M = lipsdp.lmi_matrix(ws, res["rho"] * (1 - 1e-4), res["t"])
  assert np.linalg.eigvalsh(M)[-1] > 0
  np.testing.assert_allclose(res["rho"], res["solver_rho"], rtol=1e-3)


def test_one_hidden_layer_between_lower_and_naive():
  c = tightness_config.get_config("smoke")
  layers, params = tightness.build((12,), input_dim=6, num_classes=3, seed=0)
  lower = tightness.lower_estimate(layers, params, 6, key=jax.random.key(0), chains=256, rounds=3)
  weights, _ = lipsdp.weights_of(layers, params)
  sdp = lipsdp.lipsdp_neuron(weights)["bound"]
  naive = lipsdp.naive(weights)
  net = network.from_layers(layers, params, (6,))
  lt, _ = jax.jit(lambda n: liplt.liplt_bound(n, mode="global", num_iters=c.eval_iters))(net)
  lt = float(lt)
  assert lower <= sdp * (1 + 1e-6) and sdp <= naive * (1 + 1e-6)
  assert lower <= lt * (1 + 1e-4) and lt <= naive * (1 + 1e-4)
  assert sdp < 0.9 * naive  # LipSDP is not trivially the naive bound here
  md = tightness.table(
    [
      {
        "hidden": [12],
        "lower": lower,
        "lipsdp": sdp,
        "liplt": lt,
        "liplt_aol": lt,
        "naive": naive,
        "lower_s": 0.0,
        "lipsdp_s": 0.0,
        "liplt_s": 0.0,
        "liplt_aol_s": 0.0,
        "naive_s": 0.0,
      }
    ]
  )
  assert md.count("\n") == 2 and "| 12 |" in md


def test_errors():
  with pytest.raises(ValueError, match="hidden layer"):
    lipsdp.lipsdp_neuron([np.eye(3)])
