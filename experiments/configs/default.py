"""Shared defaults of every experiment (the paper's MNIST settings); see mnist.py."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.dataset = "mnist"
  c.data_dir = ""  # '' = TFDS, then $CRMJAX_DATA_DIR, the download cache, the vendored data/
  c.download = True  # no local copy: download it (TFDS, else the checksummed archive); False:
  # strictly offline (fail with the ways to provide the data)
  c.download_url = ""  # base URL of a mirror of the archives ('' = $CRMJAX_DOWNLOAD_URL or
  # the canonical sources)
  c.train_subset = 0  # 0 = the whole split
  c.test_subset = 0
  c.model = "4C3F"
  c.normalize = ()  # ((mean...), (std...)) per channel, a fixed first layer inside the bound
  c.seed = 0
  c.init = "flax"  # flax (LeCun normal, zero bias) | torch (PyTorch's default, the reference's)

  c.loss = "crm"  # crm | ce | gloro
  c.bound = "liplt"  # liplt | naive | liplt_aol (LipLT of the AOL-rescaled network)
  c.bound_mode = "pairwise"  # pairwise | per_class | global
  c.train_iters = 10  # warm-started iterations (products with A^T A) per training step
  c.train_solver = "power"  # power | lanczos (same cost per iteration, closer estimates)
  # Compute the bound on one step in N, its gradient weighted by N; the steps between reuse
  # its value and cost about a cross-entropy step (1: every step).
  c.bound_every_steps = 1
  # The bound of the rescaled network rescale(net, D), D > 0 per neuron optimised to minimise
  # it (Theorem 3.2 refinement; crmjax.refinement.refresh_scales), refreshed every
  # `every_steps` steps from the first CRM step and fixed in between (0: off, needs
  # bound=liplt). A refresh: `steps` Adam steps (`learning_rate`) on log D, warm-started,
  # `step_iters` power iterations per step; `warmup_iters` / `final_iters` per candidate.
  c.rescaling = ml_collections.ConfigDict(
    {
      "every_steps": 0,
      "steps": 20,
      "learning_rate": 0.01,
      "step_iters": 5,
      "warmup_iters": 20,
      "final_iters": 20,
    }
  )
  c.crm = ml_collections.ConfigDict()
  c.crm.lam = 30.0
  c.crm.temperature = 5.0
  c.crm.r0 = 2.2
  # Where r0 starts its ramp (crm.ramp_epochs > 0); None: no r0 ramp, r0 from the start.
  c.crm.r0_start = ml_collections.FieldReference(None, field_type=float)
  # Correctly classified points certified below a floor get no penalty, only cross-entropy;
  # the floor rises linearly from 0 when the penalty switches on to r_floor at the last step
  # (0: all points below r0 are penalised, as in the paper).
  c.crm.r_floor = 0.0
  c.crm.penalty = "exp"  # g of eq. 8: exp (g(r) = exp(-t r) / t) | linear (g(r) = -r)
  c.crm.warmup_epochs = 5  # plain cross-entropy before the penalty switches on
  c.crm.ramp_epochs = 0  # 0 = constant lambda / r0 after the warm-up, else a linear ramp
  c.crm.normalize = "correct"  # penalty mean over: correct (correctly classified) | batch

  c.batch_size = 512
  c.num_epochs = 20
  c.learning_rate = 1e-3
  c.final_learning_rate = 1e-6  # exponential decay to this rate at the end ...
  c.lr_decay_start_epoch = 0  # ... starting at this epoch (0: over the whole run)
  c.lr_schedule = "exponential"  # exponential (above) | cosine | one_cycle
  c.lr_warmup_epochs = 0  # linear warm-up (cosine) / rise (one_cycle) length
  c.weight_decay = 0.0  # > 0: AdamW
  c.grad_clip_norm = 0.0  # > 0: clip gradients to this global norm
  # > 0: keep a moving average of the weights (decay per step), evaluated, certified and
  # saved in the checkpoint (crmjax.train_state.params_ema); 0: the trained weights
  c.ema_decay = 0.0
  # Host-side training augmentation (crmjax.input_pipeline.Augment): random crop by zero
  # padding, flip, then a random rotation (degrees) and integer translation (fraction of the
  # side) whose uncovered pixels take `fill` ([0, 1] pixel units).
  c.augment = ml_collections.ConfigDict(
    {"crop_padding": 0, "flip": False, "rotation_degrees": 0.0, "translation": 0.0, "fill": 0.0}
  )

  c.eps = 1.58  # certified l2 radius in [0, 1] pixel space (also GloRo's training eps)
  c.report_eps = ()  # more radii at which the final evaluation reports certified accuracy
  c.eval_batch_size = 1000
  c.eval_iters = 200  # warm-started power iterations of the estimate (per-epoch and final)
  c.sound_eval = True  # certify with guaranteed bounds at the end of training
  c.sound_iters = 1000  # Lanczos steps of the sound bound (operators too large to materialise)
  c.eval_every_epochs = 1  # test clean / certified (estimate) accuracy into metrics.jsonl
  c.epoch_eval_subset = 0  # 0 = the whole test split for the per-epoch curves

  c.log_every_steps = 20
  c.tensorboard = True  # TensorBoard event files in the workdir (tensorboardX, no TensorFlow)
  c.checkpoint_every_steps = 200
  c.max_checkpoints = 3
  c.progress_bar = True
  c.stop_after_steps = 0  # > 0: checkpoint and exit after this many steps (preemptible jobs)
  c.distributed = False  # call jax.distributed.initialize() (multi-host)
  # With distributed: the coordinator "host:port", the number of processes and this one's
  # index; ''/0/-1 leave them to JAX (a SLURM, Open MPI or TPU cluster, $JAX_COORDINATOR_ADDRESS).
  c.coordinator_address = ""
  c.num_processes = 0
  c.process_id = -1
  return c


def check_variant(variant: str, known: tuple[str, ...] = ("", "smoke")) -> str:
  """Returns ``variant`` (the text after ``:`` in ``--config=file.py:variant``) if known.

  Raises:
    ValueError: naming the known variants, for any other.
  """
  if variant not in known:
    raise ValueError(
      f"unknown variant {variant!r}: use one of {list(known)} (--config=<file>.py:<variant>)"
    )
  return variant


def apply_variant(
  c: ml_collections.ConfigDict,
  variant: str,
  *,
  train_subset: int,
  test_subset: int,
  batch_size: int,
) -> ml_collections.ConfigDict:
  """The ``smoke`` variant of a dataset config: one tiny epoch, CRM from the start."""
  if check_variant(variant) == "smoke":
    c.train_subset, c.test_subset, c.batch_size, c.num_epochs = (
      train_subset,
      test_subset,
      batch_size,
      1,
    )
    c.crm.warmup_epochs, c.train_iters, c.sound_iters = 0, 1, 20
    c.eval_every_epochs = 0
    c.progress_bar = False
  return c
