"""Every registered optimizer refuses a param-group key it does not read (a typo or another library's key would
otherwise be ignored silently), and accepts its own keys per group."""
import pytest
import torch

from optimizers.registry import OPTIMIZERS, option_fields


def _params():
    return [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4))]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("key", ["split_sizes", "beta1"])
def test_unknown_param_group_key_is_refused_naming_it(name, key):
    cls = OPTIMIZERS[name].load()
    extra = {"tokens_per_step": 64} if name == "sophia" else {}
    with pytest.raises(ValueError, match=f"unknown param-group key\\(s\\) '{key}'"):
        cls([{"params": _params()[:1], key: 0.9}], **extra)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_known_group_keys_are_accepted_per_group(name):
    cls = OPTIMIZERS[name].load()
    extra = {"tokens_per_step": 64} if name == "sophia" else {}
    lr = option_fields(name)["lr"].default
    optimizer = cls([{"params": _params()[:1], "lr": lr / 2, "weight_decay": 0.0}], **extra)
    assert optimizer.param_groups[0]["lr"] == lr / 2
