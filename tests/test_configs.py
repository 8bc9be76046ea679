"""Every experiment config (and its smoke variant) passes the training config checks."""

import pytest

from crmjax import train
from experiments.configs import cifar, mnist, tiny_imagenet


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
