"""The GPT model on its own: causality, rotary embedding, QK-norm, initialization, the 160M size, and equality with
an independent re-implementation of one block written out here (plain tensor math, no model code)."""
import math

import pytest
import torch
import torch.nn.functional as F

from models.gpt.model import GPT, PRESETS, Block, GPTConfig, Rotary

SMALL = GPTConfig(vocab_size=96, n_layer=2, n_head=2, model_dim=32, sequence_length=16)


def trained_like(config: GPTConfig = SMALL, seed: int = 0) -> GPT:
    """A model whose zero-initialized matrices (o, proj, lm_head) and unit gains are replaced by random values, so
    that every path of the forward pass contributes to the logits."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith(("o.weight", "proj.weight", "lm_head.weight")):
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[1]))
    return model


def tokens(config: GPTConfig = SMALL, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (batch, config.sequence_length),
                         generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("position", [0, 5, 15])
def test_changing_token_t_leaves_logits_before_t_unchanged_and_changes_logits_from_t(position):
    model = trained_like()
    inputs = tokens()
    changed = inputs.clone()
    changed[:, position] = (changed[:, position] + 1) % SMALL.vocab_size
    with torch.no_grad():
        before, after = model(inputs), model(changed)
    assert torch.equal(before[:, :position], after[:, :position])
    # From t on the logits see the change (so the test above is not passing on a model that ignores its input).
    assert (before[:, position:] - after[:, position:]).abs().amax(-1).min() > 1e-3


def test_rotary_scores_depend_only_on_relative_position():
    head_dim, seq = 8, 12
    rotary = Rotary(head_dim, 64)
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn((1, 1, 1, head_dim), generator=generator), torch.randn((1, 1, 1, head_dim), generator=generator)

    def score(i: int, j: int) -> float:
        # q at position i, k at position j: place them in a sequence long enough and rotate.
        x = torch.zeros((1, max(i, j) + 1, 2, head_dim))
        x[0, i, 0], x[0, j, 1] = q[0, 0, 0], k[0, 0, 0]
        rotated = rotary(x)
        return float(rotated[0, i, 0] @ rotated[0, j, 1])

    for i, j in [(3, 1), (7, 7), (2, 9)]:
        for shift in (1, 5, 20):
            assert score(i + shift, j + shift) == pytest.approx(score(i, j), abs=1e-5)
    # ... and does depend on the relative position (a rotary that does nothing would pass the lines above).
    assert abs(score(5, 1) - score(5, 4)) > 1e-2
    assert rotary(torch.ones((1, seq, 1, head_dim)))[0, 0].tolist() == [[1.0] * head_dim]  # position 0: identity


def test_rotary_preserves_norms_per_head():
    rotary = Rotary(8, 32)
    x = torch.randn((2, 32, 3, 8), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(rotary(x).norm(dim=-1), x.norm(dim=-1))


def capture_attention_inputs(model: GPT, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v) as passed to scaled_dot_product_attention in the first block: (batch, heads, seq, head_dim)."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((q, k, v))
        return real(q, k, v, **kwargs)

    F.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        F.scaled_dot_product_attention = real
    return seen[0]


def test_v_is_the_plain_projection_and_q_k_are_normalized_then_rotated():
    model = trained_like()
    inputs = tokens()
    q, k, v = capture_attention_inputs(model, inputs)
    block = model.blocks[0]
    with torch.no_grad():
        x = block.attn_norm(model.embed(inputs))
        batch, seq, _ = x.shape
        heads = SMALL.n_head
        v_expected = block.attn.v(x).view(batch, seq, heads, -1).transpose(1, 2)
        q_raw = block.attn.q(x).view(batch, seq, heads, -1)
    torch.testing.assert_close(v, v_expected, rtol=0, atol=0)  # no rotary, no norm on v
    # Rotary preserves the norm, so ||q|| per head is that of RMSNorm(q_raw) * gain: sqrt(head_dim) for unit gains.
    with torch.no_grad():
        normalized = block.attn.q_norm(q_raw)
    torch.testing.assert_close(q.norm(dim=-1), normalized.transpose(1, 2).norm(dim=-1), rtol=1e-5, atol=1e-5)
    fresh = GPT(SMALL)
    q0, k0, _ = capture_attention_inputs(fresh, inputs)
    head_dim = SMALL.head_dim
    torch.testing.assert_close(q0.norm(dim=-1), torch.full(q0.shape[:-1], math.sqrt(head_dim)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(k0.norm(dim=-1), torch.full(k0.shape[:-1], math.sqrt(head_dim)), rtol=1e-4, atol=1e-4)


def test_qk_norm_gains_scale_the_attention_logits():
    model = trained_like()
    inputs = tokens()
    q, k, _ = capture_attention_inputs(model, inputs)
    with torch.no_grad():
        model.blocks[0].attn.q_norm.weight.mul_(2.0)
    q2, k2, _ = capture_attention_inputs(model, inputs)
    torch.testing.assert_close(q2, 2.0 * q)
    torch.testing.assert_close(k2, k)


def test_initial_loss_is_ln_vocab_with_the_zero_initialized_head():
    torch.manual_seed(0)
    model = GPT(SMALL)
    inputs = tokens()
    with torch.no_grad():
        loss = model(inputs, torch.roll(inputs, -1, dims=1))
    assert loss.item() == pytest.approx(math.log(SMALL.vocab_size), abs=1e-6)
    for block in model.blocks:
        assert not block.attn.o.weight.any() and not block.mlp.proj.weight.any()
        # Hidden matrices: std 1/sqrt(fan_in).
        assert block.mlp.fc.weight.std().item() == pytest.approx(1 / math.sqrt(SMALL.model_dim), rel=0.05)


def test_160m_preset_has_the_documented_parameter_count():
    config = PRESETS["160m"]
    with torch.device("meta"):
        model = GPT(config)
    d, layers, vocab = config.model_dim, config.n_layer, config.vocab_size
    per_block = 4 * d * d + 2 * 4 * d * d + 2 * d + 2 * config.head_dim  # attention, MLP, two norms, QK-norm
    assert model.num_parameters() == layers * per_block + d + vocab * d  # + final norm + LM head
    assert model.num_parameters() == 123_590_400
    assert model.num_parameters(exclude_embedding=False) == 162_223_872  # the README's "162M parameters"


def rms_norm(t: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    eps = torch.finfo(t.dtype).eps  # nn.RMSNorm's default
    return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * gain


def reference_block(block: Block, x: torch.Tensor, n_head: int) -> torch.Tensor:
    """One pre-norm block written from the architecture description with plain tensor operations."""
    def rotate(t):  # (batch, seq, heads, head_dim); pairs (i, i + head_dim/2) rotate by angle pos * 10000^(-2i/d)
        batch, seq, heads, hd = t.shape
        freq = 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        angle = torch.arange(seq, dtype=torch.float64)[:, None] * freq[None, :]
        cos, sin = angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]
        a, b = t[..., :hd // 2], t[..., hd // 2:]
        return torch.cat((a * cos + b * sin, b * cos - a * sin), dim=-1)

    batch, seq, d = x.shape
    hd = d // n_head
    attn = block.attn
    h = rms_norm(x, block.attn_norm.weight, )
    q = (h @ attn.q.weight.T).view(batch, seq, n_head, hd)
    k = (h @ attn.k.weight.T).view(batch, seq, n_head, hd)
    v = (h @ attn.v.weight.T).view(batch, seq, n_head, hd)
    q, k = rotate(rms_norm(q, attn.q_norm.weight, )), rotate(rms_norm(k, attn.k_norm.weight, ))
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(hd)
    mask = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    weights = scores.masked_fill(mask, float("-inf")).softmax(-1)
    y = torch.einsum("bhij,bjhd->bihd", weights, v).reshape(batch, seq, d)
    x = x + y @ attn.o.weight.T
    h = rms_norm(x, block.mlp_norm.weight, )
    return x + (torch.relu(h @ block.mlp.fc.weight.T) ** 2) @ block.mlp.proj.weight.T


def test_block_equals_an_independent_reimplementation():
    model = trained_like().double()
    block = model.blocks[0]
    x = torch.randn((2, SMALL.sequence_length, SMALL.model_dim), generator=torch.Generator().manual_seed(3),
                    dtype=torch.float64)
    with torch.no_grad():
        # The model's rotary tables are float32 (round-off ~1e-7 on outputs of order 1); a wrong formula is O(1).
        torch.testing.assert_close(block(x), reference_block(block, x, SMALL.n_head), rtol=1e-6, atol=1e-6)


def test_model_equals_embedding_blocks_final_norm_and_head():
    model = trained_like().double()
    inputs = tokens()
    x = model.embed.weight[inputs]
    with torch.no_grad():
        for block in model.blocks:
            x = reference_block(block, x, SMALL.n_head)
        expected = rms_norm(x, model.final_norm.weight) @ model.lm_head.weight.T
        torch.testing.assert_close(model(inputs), expected.float(), rtol=1e-5, atol=1e-5)  # logits are float32


def test_chunked_cross_entropy_equals_the_full_loss_and_gradients():
    """loss_chunk_tokens computes the LM head and the loss in chunks (never the full fp32 logits): same loss to 1e-6
    and the same gradient for every parameter."""
    import dataclasses
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=97, n_layer=2, n_head=2, model_dim=16, sequence_length=12)
    full, chunked = GPT(config), GPT(dataclasses.replace(config, loss_chunk_tokens=7))  # 7 does not divide 2 x 12
    chunked.load_state_dict(full.state_dict())
    with torch.no_grad():  # every weight nonzero, so every gradient flows (the zero-initialized ones included)
        for p in full.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    chunked.load_state_dict(full.state_dict())
    tokens = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(2))
    losses = [model(tokens[:, :-1], tokens[:, 1:]) for model in (full, chunked)]
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-6, abs=1e-6)
    for loss in losses:
        loss.backward()
    for (name, p), q in zip(full.named_parameters(), chunked.parameters()):
        assert p.grad.abs().max() > 0, name
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("name, width, depth", [("1b", 2048, 24), ("7b", 4096, 32), ("70b", 8192, 80)])
def test_planning_presets_have_their_width_depth_and_parameter_count(name, width, depth):
    """12 d^2 per block (q, k, v, o, and the 4x MLP), the untied embedding and LM head, and the norm gains; built on
    the meta device (scripts/estimate.py's shapes)."""
    config = PRESETS[name]
    assert (config.model_dim, config.n_layer, config.head_dim) == (width, depth, 128)
    with torch.device("meta"):
        model = GPT(config)
    gains = depth * (2 * width + 2 * config.head_dim) + width
    assert model.num_parameters(exclude_embedding=False) == 12 * depth * width ** 2 + 2 * 50304 * width + gains
