"""Every experiment config (and its smoke variant) passes the training config checks."""

import pytest

from crmjax import liplt, models, train
from experiments.configs import cifar, mnist, residual, tiny_imagenet


@pytest.mark.parametrize("module", [mnist, cifar, tiny_imagenet])
@pytest.mark.parametrize("variant", ["", "smoke"])
def test_configs_validate(module, variant):
  config = module.get_config(variant)
  train.validate_config(config, num_devices=1)
  if variant == "smoke":
    assert config.num_epochs <= 2 and config.train_subset > 0


def test_unknown_variant_is_refused():
  for module in (mnist, cifar, tiny_imagenet):
    with pytest.raises(ValueError, match="unknown variant"):
      module.get_config("huge")


@pytest.mark.parametrize("variant", ["", "smoke"])
def test_residual_config_trains_valid_configs_of_registered_models(variant):
  config = residual.get_config(variant)
  train.validate_config(config.train, num_devices=1)
  assert set(config.models) <= set(models.ARCHITECTURES)
  assert set(config.train_bounds) <= set(liplt.ALL_METHODS)
  with pytest.raises(ValueError, match="unknown variant"):
    residual.get_config("huge")
