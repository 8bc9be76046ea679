"""Every experiment config (and its smoke variant) passes the training config checks."""

import json

import pytest

from crmjax import config_schema, liplt, models
from experiments.configs import (
  benchmark,
  bounds,
  certify,
  cifar,
  default,
  epoch_curves,
  mnist,
  mnist_60,
  mnist_fast,
  mnist_reference,
  residual,
  tightness,
  tiny_imagenet,
)


@pytest.mark.parametrize("module", [mnist, mnist_fast, mnist_60, cifar, tiny_imagenet])
@pytest.mark.parametrize("variant", ["", "smoke"])
def test_configs_validate(module, variant):
  config = module.get_config(variant)
  config_schema.validate_config(config, num_devices=1)
  if variant == "smoke":
    assert config.num_epochs <= 2 and config.train_subset > 0


def test_mnist_recipes_differ_only_where_their_docstrings_say():
  recipes = (mnist_reference, mnist_fast, mnist, mnist_60)
  ref, fast, main, long = (m.get_config().to_dict() for m in recipes)
  config_schema.validate_config(mnist_reference.get_config(), num_devices=1)
  changed = {k for k in ref if ref[k] != fast[k]}
  assert changed == {
    "batch_size",
    "lr_schedule",
    "learning_rate",
    "lr_warmup_epochs",
    "lr_decay_start_epoch",
    "train_solver",
    "train_iters",
    "bound_every_steps",
    "ema_decay",
    "crm",  # temperature 20, not the reference's 5
  }
  crm = {k for k in ref["crm"] if ref["crm"][k] != fast["crm"][k]}
  assert crm == {"temperature"}
  assert (ref["crm"]["temperature"], fast["crm"]["temperature"]) == (5, 20)
  # The main command: the fast recipe at batch 16, the bound every step, the peak 2e-3 *
  # sqrt(16 / 32); the 60-epoch recipe: the fast one stretched, the bound on one step in 4.
  assert {k for k in fast if fast[k] != main[k]} == {
    "batch_size",
    "bound_every_steps",
    "learning_rate",
  }
  assert (main["batch_size"], main["bound_every_steps"], main["learning_rate"]) == (16, 1, 1.4e-3)
  assert (fast["batch_size"], fast["bound_every_steps"], fast["learning_rate"]) == (32, 5, 2e-3)
  assert {k for k in fast if fast[k] != long[k]} == {"num_epochs", "bound_every_steps"}
  assert (long["batch_size"], long["num_epochs"], long["bound_every_steps"]) == (32, 60, 4)
  # The smoke runs the tests train are the same for the main and the fast recipe.
  assert mnist.get_config("smoke").to_dict() == mnist_fast.get_config("smoke").to_dict()


def test_unknown_variant_is_refused():
  for module in (mnist, mnist_fast, mnist_60, cifar, tiny_imagenet):
    with pytest.raises(ValueError, match="unknown variant"):
      module.get_config("huge")


@pytest.mark.parametrize("variant", ["", "smoke"])
def test_residual_config_trains_valid_configs_of_registered_models(variant):
  config = residual.get_config(variant)
  config_schema.validate_config(config.train, num_devices=1)
  assert set(config.models) <= set(models.ARCHITECTURES)
  assert set(config.train_bounds) <= set(liplt.ALL_METHODS)
  with pytest.raises(ValueError, match="unknown variant"):
    residual.get_config("huge")


@pytest.mark.parametrize("module", [benchmark, bounds, certify, epoch_curves, residual, tightness])
def test_every_experiment_config_has_a_smoke_variant_and_refuses_unknown_ones(module):
  assert module.get_config("smoke") != module.get_config("")
  with pytest.raises(ValueError, match=r"unknown variant 'huge': use one of \['', 'smoke'\]"):
    module.get_config("huge")


def test_check_variant_returns_known_variants_and_names_them_otherwise():
  assert default.check_variant("") == "" and default.check_variant("smoke") == "smoke"
  assert default.check_variant("tiny", ("", "tiny")) == "tiny"
  with pytest.raises(ValueError, match=r"use one of \['', 'tiny'\]"):
    default.check_variant("smoke", ("", "tiny"))


def test_stored_config_fills_the_fields_added_since_with_their_former_behaviour():
  current = json.loads(mnist.get_config("smoke").to_json_best_effort())
  old = json.loads(json.dumps(current))
  for field in config_schema.ADDED_FIELDS:
    *groups, name = field.split(".")
    section = old
    for group in groups:
      section = section[group]
    del section[name]
  del old["rescaling"]  # a group added since, whole
  config = config_schema.stored_config(old)
  for field, value in config_schema.ADDED_FIELDS.items():
    section = config
    for part in field.split(".")[:-1]:
      section = section[part]
    assert section[field.split(".")[-1]] == value, field
  assert "rescaling" not in old and "init" not in old  # the input is not modified
  config_schema.validate_config(config, num_devices=1)
  # Fields present are kept, a whole current config comes back unchanged.
  assert config_schema.stored_config(current).to_dict() == current
