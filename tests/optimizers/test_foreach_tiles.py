"""Cache tiling of element-wise foreach updates (optimizers/common/foreach_tiles.py): the tiles cover every element once,
tiling is refused where it is invalid, and every tiled update function computes what it computes untiled."""
from __future__ import annotations

import pytest
import torch

from optimizers.common import foreach_tiles
from optimizers.common.foreach_tiles import cache_tiles, tileable
from optimizers.common.scalar_updates import adamw_update, lion_update
from optimizers.prodigy import prodigy_apply_update, prodigy_moments_update
from optimizers.schedule_free import schedule_free_adamw_update
from optimizers.sophia import gnb_hessian_update, sophia_update

# Sizes chosen so that tiles of 1000 elements cut tensors in the middle, and several small tensors share a tile.
SHAPES = [(37, 61), (5,), (3000,), (7, 11), (1,), (1200,)]


def test_tiles_cover_every_element_once_in_order():
    tensors = [torch.arange(torch.Size(s).numel(), dtype=torch.float32).reshape(s) + 10_000 * i
               for i, s in enumerate(SHAPES)]
    states = [t.clone() for t in tensors]
    tiles = list(cache_tiles([tensors, states], 1000))
    sizes = [sum(piece.numel() for piece in pieces) for pieces, _ in tiles]
    assert all(size == 1000 for size in sizes[:-1]) and 0 < sizes[-1] <= 1000
    flat = torch.cat([piece for pieces, _ in tiles for piece in pieces])
    assert torch.equal(flat, torch.cat([t.reshape(-1) for t in tensors]))
    # Parallel lists are cut at the same places, and the pieces are views: writing them writes the tensors.
    for pieces, state_pieces in tiles:
        assert [p.numel() for p in pieces] == [s.numel() for s in state_pieces]
        for piece in state_pieces:
            piece.zero_()
    assert all(not s.any() for s in states)


def test_tiling_is_refused_where_it_is_invalid_or_pointless():
    big = [torch.zeros(3000), torch.zeros(500)]
    assert tileable([big, [torch.zeros(3000), torch.zeros(500)]], 1000)
    assert not tileable([big, [torch.zeros(3000), torch.zeros(501)]], 1000)     # sizes differ
    assert not tileable([big, [torch.zeros(3000)]], 1000)                       # lengths differ
    assert not tileable([[torch.zeros(100, 40).t()]], 1000)                     # not contiguous
    assert not tileable([[torch.zeros(900)]], 1000)                             # fits one tile already
    assert not tileable([[]], 1000)
    assert not tileable([big, [torch.zeros(3000, dtype=torch.float64), torch.zeros(500)]], 10_000)


def _lists(count, seed=0, positive=()):
    generator = torch.Generator().manual_seed(seed)
    lists = []
    for index in range(count):
        tensors = [torch.randn(s, generator=generator) for s in SHAPES]
        if index in positive:
            tensors = [t.abs() for t in tensors]
        lists.append(tensors)
    return lists


CASES = {
    "adamw": (adamw_update, 4, (3,), dict(lr=1e-2, beta1=0.9, beta2=0.95, weight_decay=0.1, epsilon=1e-8, step=3)),
    "lion": (lion_update, 3, (), dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1)),
    "schedule_free": (schedule_free_adamw_update, 4, (3,),
                      dict(lr=1e-2, beta1=0.9, beta2=0.95, weight_decay=0.1, epsilon=1e-8, step=3,
                           averaging_weight=0.25)),
    "sophia": (sophia_update, 4, (3,), dict(lr=1e-2, beta1=0.96, rho=0.05, tokens_per_step=64, weight_decay=0.1,
                                           epsilon=1e-15)),
    "gnb_hessian": (gnb_hessian_update, 2, (0,), dict(beta2=0.99)),
    "prodigy_moments": (prodigy_moments_update, 3, (2,), dict(d=1e-3, beta1=0.9, beta2=0.99)),
    "prodigy_apply": (prodigy_apply_update, 3, (2,), dict(dlr=1e-3, d=1e-3, epsilon=1e-8,
                                                          decoupled_weight_decay=0.1)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_tiled_update_equals_untiled(name, monkeypatch):
    fn, count, positive, kwargs = CASES[name]
    tiled_lists = _lists(count, positive=positive)
    untiled_lists = [[t.clone() for t in tensors] for tensors in tiled_lists]
    monkeypatch.setattr(foreach_tiles, "TILE_ELEMENTS", 1000)
    calls = []
    monkeypatch.setattr(foreach_tiles, "cache_tiles",
                        lambda lists, size: calls.append(size) or list(cache_tiles(lists, size)))
    fn(*tiled_lists, **kwargs)
    fn.untiled(*untiled_lists, **kwargs)
    assert calls == [1000], "the update did not run tile by tile"
    for tiled_tensors, untiled_tensors in zip(tiled_lists, untiled_lists):
        for a, b in zip(tiled_tensors, untiled_tensors):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # The update changed something: the comparison is not between two untouched copies.
    originals = _lists(count, positive=positive)
    assert any(not torch.equal(a, b) for tensors, before in zip(tiled_lists, originals) for a, b in zip(tensors, before))


def test_prodigy_moments_without_first_moment_tiles_the_rest(monkeypatch):
    grads, _, exp_avg_sqs = _lists(3, positive=(2,))
    expected = [v.clone() for v in exp_avg_sqs]
    monkeypatch.setattr(foreach_tiles, "TILE_ELEMENTS", 1000)
    prodigy_moments_update(grads, None, exp_avg_sqs, d=1e-3, beta1=0.0, beta2=0.99)
    prodigy_moments_update.untiled(grads, None, expected, d=1e-3, beta1=0.0, beta2=0.99)
    for a, b in zip(exp_avg_sqs, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0.0)


# ----------------------------------------------------------------------------------- advanced family, per tensor

@pytest.mark.parametrize("cls_name, options", [
    ("Adam_Adv", {}), ("Adam_Adv", dict(use_AdEMAMix=True, grams=True)), ("Adam_Adv", dict(use_atan2=True)),
    ("Adopt_Adv", {}), ("Simplified_AdEMAMix", dict(alpha=2.0)), ("Lion_Adv", {}),
])
def test_advanced_family_tiled_steps_equal_untiled(cls_name, options, monkeypatch):
    import optimizers.advanced as advanced
    cls = getattr(advanced, cls_name)

    def run(tile_elements):
        monkeypatch.setattr(foreach_tiles, "TILE_ELEMENTS", tile_elements)
        generator = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in SHAPES]
        optimizer = cls(params, lr=1e-2, weight_decay=0.1, **options)
        tiled_calls = []
        original = optimizer._step_tensor
        optimizer._step_tensor = lambda *args: tiled_calls.append(args[1].numel()) or original(*args)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            optimizer.step()
        return params, optimizer, tiled_calls

    tiled_params, tiled_optimizer, tiled_calls = run(1000)
    untiled_params, untiled_optimizer, untiled_calls = run(10 ** 9)
    assert len(untiled_calls) == 3 * len(SHAPES) and len(tiled_calls) > len(untiled_calls)
    assert max(tiled_calls) <= 1000
    for a, b in zip(tiled_params, untiled_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(tiled_params, untiled_params):
        for key, value in tiled_optimizer.state[a].items():
            other = untiled_optimizer.state[b][key]
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(value, other, rtol=1e-6, atol=1e-7)
            else:
                assert value == other


def test_advanced_family_does_not_tile_tensor_reductions(monkeypatch):
    # cautious_mask rescales by the kept fraction of the whole tensor: slicing would change the result.
    from optimizers.advanced import Adam_Adv
    monkeypatch.setattr(foreach_tiles, "TILE_ELEMENTS", 1000)
    params = [torch.nn.Parameter(torch.randn(3000))]
    optimizer = Adam_Adv(params, cautious_mask=True)
    params[0].grad = torch.randn(3000)
    assert optimizer._cache_tiles(params[0], params[0], params[0].grad, {"step": 1}) is None
    plain = Adam_Adv(params)
    plain.step()
    assert plain._cache_tiles(params[0], params[0], params[0].grad, plain.state[params[0]]) is not None


@pytest.mark.parametrize("options", [dict(), dict(betas=(0.0, 0.99), decouple=False, safeguard_warmup=True)])
def test_prodigy_tiled_statistics_equal_untiled(options, monkeypatch):
    from optimizers.prodigy import Prodigy

    def run(tile_elements):
        monkeypatch.setattr(foreach_tiles, "TILE_ELEMENTS", tile_elements)
        generator = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in SHAPES]
        params[2].data.zero_()  # an all-zero initial parameter keeps p0 as a scalar 0
        optimizer = Prodigy(params, lr=1.0, weight_decay=0.1, d0=1e-3, **options)
        tiled = []
        original = optimizer._tiled_statistics
        optimizer._tiled_statistics = lambda *args, **kwargs: tiled.append(1) or original(*args, **kwargs)
        targets = [torch.randn(p.shape, generator=generator) for p in params]
        for _ in range(3):  # gradients of 0.5 ||p - target||^2: consistent directions, so d grows
            for p, target in zip(params, targets):
                p.grad = p.detach() - target
            optimizer.step()
        return params, optimizer.param_groups[0], tiled

    tiled_params, tiled_group, tiled_calls = run(1000)
    untiled_params, untiled_group, untiled_calls = run(10 ** 9)
    assert len(tiled_calls) == 3 and untiled_calls == []
    assert tiled_group["d"] > 1e-3  # the estimate moved, so the statistics matter
    for key in ("d", "d_hat", "d_numerator", "d_denom"):
        assert tiled_group[key] == pytest.approx(untiled_group[key], rel=1e-5)
    for a, b in zip(tiled_params, untiled_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
