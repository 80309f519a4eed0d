"""The model options that reproduce microsoft/dion's GPT (`init: reference`, `norm_gains: false`, `rope_dtype:
bfloat16`): checked against an independent functional forward written here from the reference's definition
(models/gpt_model.py at 0a059a4: F.rms_norm without gains, rotary before the QK-norm, bfloat16 cos/sin tables)."""
import math

import pytest
import torch
import torch.nn.functional as F

from models.gpt.model import GPT, GPTConfig

SMALL = dict(vocab_size=96, n_layer=2, n_head=4, model_dim=64, sequence_length=16)
REFERENCE = dict(init="reference", norm_gains=False, rope_dtype="bfloat16")


def reference_forward(weights: dict, inputs, targets, n_head: int):
    """The reference GPT's loss from a name -> tensor map of our parameter names."""
    def rotary(x):  # (B, T, H, D)
        d = x.shape[-1]
        inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
        freqs = torch.outer(torch.arange(x.shape[1]).float(), inv_freq)
        cos, sin = freqs.cos().bfloat16()[None, :, None, :], freqs.sin().bfloat16()[None, :, None, :]
        x1, x2 = x[..., :d // 2], x[..., d // 2:]
        return torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], 3).type_as(x)

    def norm(x):
        return F.rms_norm(x, (x.size(-1),))

    x = F.embedding(inputs, weights["embed.weight"])
    batch, seq, dim = x.shape
    layers = len({name.split(".")[1] for name in weights if name.startswith("blocks.")})
    for i in range(layers):
        w = {name.removeprefix(f"blocks.{i}."): t for name, t in weights.items() if name.startswith(f"blocks.{i}.")}
        h = norm(x)
        q, k, v = (F.linear(h, w[f"attn.{n}.weight"]).view(batch, seq, n_head, -1) for n in "qkv")
        q, k = norm(rotary(q)), norm(rotary(k))
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + F.linear(y.transpose(1, 2).reshape(batch, seq, dim), w["attn.o.weight"])
        x = x + F.linear(F.relu(F.linear(norm(x), w["mlp.fc.weight"])).square(), w["mlp.proj.weight"])
    logits = F.linear(norm(x), weights["lm_head.weight"]).float()
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def test_reference_options_compute_the_reference_forward_and_gradients():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL, **REFERENCE))
    inputs, targets = torch.randint(0, 96, (2, 16)), torch.randint(0, 96, (2, 16))
    loss = model(inputs, targets)
    loss.backward()
    weights = {name: p.detach().clone().requires_grad_() for name, p in model.named_parameters()}
    expected = reference_forward(weights, inputs, targets, n_head=4)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, weights[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_reference_options_leave_only_the_references_parameters():
    model = GPT(GPTConfig(**SMALL, **REFERENCE))
    names = [name for name, _ in model.named_parameters()]
    assert not [n for n in names if "norm" in n], "norm gains present with norm_gains: false"
    assert len(names) == 2 + 6 * SMALL["n_layer"]
    assert model.param_groups()["vector"] == []


def test_reference_init_has_the_reference_scale_and_zeroes_nothing():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=4096, n_layer=2, n_head=4, model_dim=256, sequence_length=16, **REFERENCE))
    for name, p in model.named_parameters():
        fan_out, fan_in = p.shape
        std = 1.0 if name == "embed.weight" else min(1.0, math.sqrt(fan_out / fan_in)) / math.sqrt(fan_in)
        assert p.std().item() == pytest.approx(std, rel=0.05), name
    assert model.blocks[0].mlp.proj.weight.std().item() == pytest.approx(0.5 / math.sqrt(1024), rel=0.05)


def test_default_init_still_zeroes_the_residual_outputs_and_the_head():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL))
    inputs = torch.randint(0, 96, (2, 16))
    assert model(inputs, inputs).item() == pytest.approx(math.log(96), abs=1e-6)
    assert model.lm_head.weight.abs().max() == 0 and model.blocks[0].attn_norm.weight is not None


def test_bfloat16_rope_tables_are_rounded_to_bfloat16():
    coarse = GPT(GPTConfig(**SMALL, rope_dtype="bfloat16")).blocks[0].attn.rotary
    fine = GPT(GPTConfig(**SMALL)).blocks[0].attn.rotary
    assert torch.equal(coarse.cos, coarse.cos.bfloat16().float())
    assert not torch.equal(coarse.cos, fine.cos)
    assert (coarse.cos - fine.cos).abs().max() < 4e-3


@pytest.mark.parametrize("key, value", [("init", "xavier"), ("rope_dtype", "float16")])
def test_bad_choice_names_the_key_and_the_allowed_values(key, value):
    with pytest.raises(ValueError, match=f"{key}: '{value}' is not one of"):
        GPTConfig(**{key: value})
