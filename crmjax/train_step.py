"""The CRM train step: the loss with its Lipschitz bound, and the refreshed rescaling.

``make_train_step`` is the pure step ``(state, images, labels) -> (state, metrics)`` that
``jit_step`` compiles data parallel; ``crmjax.train`` runs it in the resumable loop.

With ``config.rescaling.every_steps = N > 0`` the loss's bound is LipLT (eq. 19) of the
rescaled network ``rescaling.rescale(net, D)``, with positive diagonal scales ``D`` (one per
neuron; any ``D > 0`` keeps the bound valid, paper Theorem 3.2's refinement) re-optimised
every N steps by ``refinement.refresh_scales`` and fixed in between (``make_refresh``).

With ``config.bound_every_steps = N > 1`` the bound is computed (and its warm-started
iteration advanced) on one step in N only; the N - 1 steps between reuse its ``(K, K)``
values as constants (``make_train_step(..., stale=True)``), so they cost about a
cross-entropy step. The step that computes it weights the bound's gradient by N, so that its
sum over the N steps that use the bound is that of computing it every step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding

from crmjax import liplt, losses, models, refinement, rescaling, train_state

# ---------------------------------------------------------------------- schedules


def penalty_schedules(
  config: ml_collections.ConfigDict, steps_per_epoch: int
) -> tuple[optax.Schedule, optax.Schedule]:
  """``lambda(step)`` (0 before the warm-up ends, then constant or a linear ramp) and ``r0(step)``
  (``crm.r0_start`` through the warm-up, then linear to ``crm.r0`` over the ramp; ``crm.r0``
  throughout when ``crm.r0_start`` is None)."""
  start = config.crm.warmup_epochs * steps_per_epoch
  ramp = max(config.crm.ramp_epochs * steps_per_epoch, 1)
  r0_start = config.crm.r0_start
  r0_start = config.crm.r0 if r0_start is None else r0_start
  if config.crm.ramp_epochs:
    lam = optax.linear_schedule(0.0, config.crm.lam, ramp)
    r0 = optax.linear_schedule(r0_start, config.crm.r0, ramp)
  else:
    lam, r0 = optax.constant_schedule(config.crm.lam), optax.constant_schedule(config.crm.r0)
  lam = optax.join_schedules([optax.constant_schedule(0.0), lam], [start])
  r0 = optax.join_schedules([optax.constant_schedule(r0_start), r0], [start])
  return lam, r0


def floor_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """``r_floor(step)`` of ``losses.crm_loss``: 0 until the penalty switches on, then linear to
  ``crm.r_floor`` at the last step (``num_epochs * steps_per_epoch - 1``). A floor from the
  first CRM step would leave every point unpenalised (all radii start near 0) and the bound
  would never be pushed down."""
  start = config.crm.warmup_epochs * steps_per_epoch
  span = max(config.num_epochs * steps_per_epoch - 1 - start, 1)
  return optax.linear_schedule(0.0, config.crm.r_floor, span, transition_begin=start)


def pairwise_bound(
  model: models.Model,
  params,
  power: liplt.PowerState,
  *,
  method: str,
  mode: str,
  num_iters: int,
  solver: str = "power",
  scales: Sequence[jax.Array] | None = None,
) -> tuple[jax.Array, liplt.PowerState]:
  """The ``(K, K)`` pairwise Lipschitz matrix of the model's logits (any bound mode).

  ``scales``: positive diagonal rescalings ``D`` (one array per block, its ``phi_shape``):
  the bound is then that of ``rescaling.rescale(net, D)``, a valid bound of the model for
  every ``D > 0`` (Theorem 3.3 of the rescaled network); no gradient reaches ``D``.
  """
  net = model.lipnet(params)
  if scales is not None:
    net = rescaling.rescale(net, [jax.lax.stop_gradient(d) for d in scales])
  bound, power = liplt.lipschitz_bound(
    net, power, method=method, mode=mode, num_iters=num_iters, solver=solver
  )
  return liplt.as_pairwise(bound, mode=mode, num_classes=model.num_classes), power


# ------------------------------------------------------------ the refreshed rescaling


def initial_log_scales(model: models.Model, params) -> list[jax.Array]:
  """``log D = 0`` (``D = I``: the plain bound) per block: the rescaling before the first
  refresh (which starts from the better of it and AOL, ``refinement.refresh_scales``)."""
  return refinement.unit_log_scales(model.lipnet(params))


def make_refresh(model: models.Model, config: ml_collections.ConfigDict) -> Callable:
  """The pure refresh ``(params, power, log_d) -> (log_d, power, info)`` of the rescaling.

  ``refinement.refresh_scales`` of ``model.lipnet(params)`` with the ``config.rescaling``
  settings and the training ``bound_mode`` as objective: ``steps`` Adam steps on ``log D``
  warm-started from the current ``log_d`` and the training ``PowerState``; returns the new
  ``log D`` (same tree and dtypes: the train step does not recompile) and the power state
  converged for it, which the following train steps continue from.
  """
  r = config.rescaling
  settings = {k: r[k] for k in ("learning_rate", "steps", "warmup_iters", "final_iters")}

  def refresh_scales(params, power, log_d):
    net = model.lipnet(params)
    return refinement.refresh_scales(
      net, log_d, power, mode=config.bound_mode, num_iters=r.step_iters, **settings
    )

  return refresh_scales


def jit_refresh(refresh_fn: Callable, replicated: NamedSharding) -> Callable:
  return jax.jit(refresh_fn, in_shardings=replicated, out_shardings=replicated)


def refreshes_at(step: int, *, every: int, first: int) -> bool:
  """Whether ``D`` is refreshed before ``step``: every ``every`` steps from ``first``, the
  first step whose loss uses the bound (after the CRM warm-up)."""
  return every > 0 and step >= first and (step - first) % every == 0


# ------------------------------------------------------------------------ the step


def training_bound(model: models.Model, config, params, power, log_d, *, every: int):
  """``(lip, value, power)``: the configured pairwise bound of the loss, whose gradient is
  weighted by ``every`` (the steps that reuse it, ``bound_every_steps``), its value (no
  gradient) and the advanced power state."""
  lip, power = pairwise_bound(
    model,
    params,
    power,
    method=config.bound,
    mode=config.bound_mode,
    num_iters=config.train_iters,
    solver=config.train_solver,
    scales=None if log_d is None else [jnp.exp(l) for l in log_d],
  )
  value = jax.lax.stop_gradient(lip)
  if every > 1:  # the value of lip; the gradient of every * lip
    lip = value + every * (lip - value)
  return lip, value, power


def make_train_step(
  model: models.Model,
  tx: optax.GradientTransformation,
  config: ml_collections.ConfigDict,
  *,
  regularized: bool,
  steps_per_epoch: int,
  stale: bool = False,
) -> Callable:
  """The pure train step ``(state, images, labels) -> (state, metrics)``.

  ``regularized=False`` is plain cross-entropy (the CRM warm-up, and the ``ce`` loss);
  otherwise the configured CRM or GloRo loss with the configured bound, whose iteration
  (``config.train_solver``: power or Lanczos) advances ``config.train_iters`` warm-started
  steps. Regularised with
  ``config.rescaling.every_steps > 0``, the step is ``(state, images, labels, log_d) ->
  (state, metrics)``: the bound is that of ``rescale(net, exp(log_d))``, ``log_d`` fixed
  (no gradient; ``make_refresh`` updates it).

  With ``config.bound_every_steps = N > 1`` the regularised step also returns the bound it
  computed, ``metrics['pairwise_bound']`` (``(K, K)``, no gradient), and its gradient is
  weighted by N; ``stale=True`` builds the step of the N - 1 steps between, ``(state,
  images, labels, bound) -> (state, metrics)``, whose loss reads that bound as a constant
  (the power state is not advanced).
  """
  lam_fn, r0_fn = penalty_schedules(config, steps_per_epoch)
  floor_fn = floor_schedule(config, steps_per_epoch)
  every = config.bound_every_steps if regularized else 1

  def loss_fn(params, power, images, labels, step, log_d=None, reused=None):
    logits = model.apply(params, images)
    if not regularized:
      correct = jnp.mean(jnp.argmax(logits, axis=1) == labels)
      ce = losses.cross_entropy(logits, labels)
      return ce, ({"ce": ce, "accuracy": correct}, power)
    if reused is None:
      lip, value, power = training_bound(model, config, params, power, log_d, every=every)
    else:
      lip = value = jax.lax.stop_gradient(reused)
    if config.loss == "gloro":
      loss, aux = losses.gloro_loss(logits, labels, lip, eps=config.eps)
    else:
      loss, aux = losses.crm_loss(
        logits,
        labels,
        lip,
        lam=lam_fn(step),
        temperature=config.crm.temperature,
        r0=r0_fn(step),
        penalty=losses.PENALTIES[config.crm.penalty],
        normalize=config.crm.normalize,
        r_floor=floor_fn(step),
      )
    K = lip.shape[0]
    aux["lip"] = jnp.sum(value) / (K * (K - 1))
    if every > 1 and reused is None:
      aux["pairwise_bound"] = value
    return loss, (aux, power)

  def update(state: train_state.TrainState, images, labels, log_d, reused=None):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (aux, power)), grads = grad_fn(
      state.params, state.power, images, labels, state.step, log_d, reused
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, power=power)
    return new, {"loss": loss, **aux}

  if regularized and stale:

    def train_step(state: train_state.TrainState, images, labels, reused):
      return update(state, images, labels, None, reused)

  elif regularized and config.rescaling.every_steps:

    def train_step(state: train_state.TrainState, images, labels, log_d):
      return update(state, images, labels, log_d)

  else:

    def train_step(state: train_state.TrainState, images, labels):
      return update(state, images, labels, None)

  return train_step


def jit_step(
  step_fn: Callable, replicated: NamedSharding, batch: NamedSharding, *, extra: bool = False
) -> Callable:
  """``step_fn`` jitted; ``extra``: it takes a replicated 4th argument (the rescaling's
  ``log_d``, or the reused bound of a ``stale`` step)."""
  return jax.jit(
    step_fn,
    in_shardings=(replicated, batch, batch) + ((replicated,) if extra else ()),
    out_shardings=(replicated, replicated),
    donate_argnums=(0,),
  )
