"""Speed benchmark settings: the paper's models at batch 512 and 32 with their recipes' iterations.

``--config=experiments/configs/benchmark.py:smoke`` is a CPU check of a few minutes
(batch 64, 3 timed steps; 8C2F at batch 16, cross-entropy only, see ``skip``; depths up
to 16). Per-model fields are keyed by model name: override them with brackets, e.g.
``"--config.skip['8C2F']=()"`` or ``"--config.train_iters['4C3F']=1"``.
"""

import ml_collections

from experiments.configs import cifar, default, mnist_fast, tiny_imagenet

# name: (dataset, warm-started iterations per CRM step, their solver, steps per bound
# computation). The input shape and the number of classes are the dataset's
# (crmjax.data.dataset_info); the paper's models take the rest from their training config.
MODELS = {
  c.model: (c.dataset, c.train_iters, c.train_solver, c.bound_every_steps)
  for c in (mnist_fast.get_config(), cifar.get_config(), tiny_imagenet.get_config())
}
MODELS.update({name: MODELS["4C3F"] for name in ("Res4C3F", "MLP")})  # MNIST-size


def _per_model(index: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({name: spec[index] for name, spec in MODELS.items()})


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.models = ("4C3F", "6C2F", "8C2F")
  c.datasets = _per_model(0)  # the input shape and classes of each model's data
  c.train_iters = _per_model(1)  # the recipe's CRM column; another column uses 1 iteration
  c.train_solvers = _per_model(2)  # power | lanczos, as in the model's training recipe
  # The recipe's CRM column computes the bound on one step in N and is timed per step over
  # such a cycle (1: every step); the other columns compute it every step.
  c.bound_every = _per_model(3)
  c.batch_size = 512
  c.batch_sizes = ml_collections.ConfigDict({name: 0 for name in MODELS})  # 0 = batch_size
  # Every model is timed again at this batch (0: not): the batch of the fast MNIST recipe
  # (mnist_fast.py), where the bound, whose cost does not depend on the batch, is the largest
  # share of a step.
  c.small_batch_size = 32
  # columns not measured per model (printed as 'skipped'): any of benchmark.COLUMNS
  c.skip = ml_collections.ConfigDict({name: () for name in MODELS})
  c.steps = 20  # timed steps (the median is reported)
  c.warmup_steps = 3  # untimed steps after compilation
  c.num_devices = 0  # 0 = every device JAX has (data parallel, as in training)
  c.seed = 0
  c.output = "benchmark.json"
  c.breakdown = False  # also time the model's forward and the bound's forward+backward
  # (at the paper's power iterations and at 0)

  # The CRM loss of the training step (the paper's settings; warm-up off so the step
  # measured is the regularized one). No eps: the CRM step does not read it.
  c.crm = default.get_config().crm
  c.crm.warmup_epochs = 0

  # Depth scaling of the bounds alone: equal-width conv nets of each depth.
  c.depth_sweep = False
  c.sweep = ml_collections.ConfigDict()
  c.sweep.depths = (4, 8, 16, 32)
  c.sweep.width = 16  # channels of every conv (3x3, stride 1, padding 1)
  c.sweep.input_shape = (16, 16, 1)
  c.sweep.num_classes = 10
  c.sweep.train_iters = 1

  if default.check_variant(variant) == "smoke":
    c.batch_size = 64
    c.small_batch_size = 0
    c.batch_sizes["8C2F"] = 16
    # 8C2F's LipLT bound does not depend on the batch and takes seconds per call on a CPU
    # (~16 s at 1 power iteration on the 2 shared cores): the smoke run times its
    # cross-entropy step only.
    c.skip["8C2F"] = ("crm_liplt", "crm_liplt_1it", "crm_naive", "liplt_bound")
    c.steps, c.warmup_steps = 3, 1
    c.depth_sweep = True
    c.sweep.depths = (4, 8, 16)  # 32 adds ~1 min on a CPU
  return c
