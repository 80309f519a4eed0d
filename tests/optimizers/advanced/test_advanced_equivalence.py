"""Each advanced optimizer with every feature off equals its plain counterpart: torch.optim.AdamW, the project's
Lion, prodigyopt.Prodigy, and slow step-by-step transcriptions (written here from the papers) of ADOPT, Simplified
AdEMAMix, AdEMAMix and Prodigy-Lion."""
from __future__ import annotations

import math

import prodigyopt
import pytest
import torch

from optimizers.advanced import Adam_Adv, Adopt_Adv, Lion_Adv, Prodigy_Adv, Prodigy_Lion_Adv, Simplified_AdEMAMix
from optimizers.lion import Lion

SHAPES = [(12, 20), (33,), (7, 5, 3)]


def twin_params(seed: int = 0, zero_first: bool = False):
    torch.manual_seed(seed)
    base = [torch.randn(shape) for shape in SHAPES]
    if zero_first:
        base[0].zero_()
    return [p.clone().requires_grad_() for p in base], [p.clone().requires_grad_() for p in base]


def random_gradients(steps: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(shape, generator=generator) for shape in SHAPES] for _ in range(steps)]


def run(params, optimizer, gradients):
    for step_gradients in gradients:
        for p, g in zip(params, step_gradients):
            p.grad = g.clone()
        optimizer.step()


def run_quadratic(params, optimizer, steps: int, seed: int = 2):
    """Gradients of 0.5 |p - target|^2 plus noise: the distance to travel lets Prodigy's d grow."""
    generator = torch.Generator().manual_seed(seed)
    targets = [torch.randn(shape, generator=generator) * 3 for shape in SHAPES]
    for _ in range(steps):
        for p, target in zip(params, targets):
            p.grad = p.detach() - target + 0.1 * torch.randn(p.shape, generator=generator)
        optimizer.step()


def run_reference(params, reference_step, gradients):
    """reference_step(step_index (1-based), param_index, param data, grad) updates the data in place."""
    with torch.no_grad():
        for step, step_gradients in enumerate(gradients, start=1):
            for index, (p, g) in enumerate(zip(params, step_gradients)):
                reference_step(step, index, p, g)


@pytest.mark.parametrize("beta1", [0.9, 0.0])
def test_adam_adv_equals_torch_adamw(beta1):
    mine, ref = twin_params()
    gradients = random_gradients(8)
    run(mine, Adam_Adv(mine, lr=1e-2, betas=(beta1, 0.99), eps=1e-8, weight_decay=0.1), gradients)
    run(ref, torch.optim.AdamW(ref, lr=1e-2, betas=(beta1, 0.99), eps=1e-8, weight_decay=0.1), gradients)
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_lion_adv_equals_project_lion():
    mine, ref = twin_params()
    gradients = random_gradients(8)
    run(mine, Lion_Adv(mine, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.5), gradients)
    run(ref, Lion(ref, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.5), gradients)
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_prodigy_adv_equals_prodigyopt():
    # Tolerance 1e-5 (relative): d grows ~1000x in 15 steps and both sum float32 dot products in a different order;
    # the ordering of the d update (see DAdaptation) changes the denominator by eps (d_new - d_old), far below that.
    mine, ref = twin_params(zero_first=True)
    options = dict(lr=1.0, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05, d0=1e-3, slice_p=3)
    mine_opt = Prodigy_Adv(mine, **options)
    ref_opt = prodigyopt.Prodigy(ref, **options)
    run_quadratic(mine, mine_opt, 15)
    run_quadratic(ref, ref_opt, 15)
    assert mine_opt.param_groups[0]["d"] > 1.0  # d did adapt
    assert mine_opt.param_groups[0]["d"] == pytest.approx(ref_opt.param_groups[0]["d"], rel=1e-5)
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_prodigy_adv_without_first_moment_equals_prodigyopt_at_fixed_d():
    # prodigyopt's beta1 = 0 branch scales the gradient by the d estimated in the same step, which a per-parameter
    # (fused) update cannot know; with d fixed (tiny d_coef keeps d_hat < d0) the two agree.
    mine, ref = twin_params()
    options = dict(lr=1.0, betas=(0.0, 0.99), eps=1e-8, weight_decay=0.1, d0=1e-2, d_coef=1e-12, slice_p=1)
    mine_opt, ref_opt = Prodigy_Adv(mine, **options), prodigyopt.Prodigy(ref, **options)
    run_quadratic(mine, mine_opt, 10)
    run_quadratic(ref, ref_opt, 10)
    assert "exp_avg" not in mine_opt.state[mine[0]]
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_adopt_adv_equals_paper_algorithm():
    mine, ref = twin_params()
    gradients = random_gradients(10)
    lr, beta1, beta2, eps, wd = 1e-2, 0.9, 0.999, 1e-6, 0.1
    run(mine, Adopt_Adv(mine, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd), gradients)
    m = [torch.zeros(s) for s in SHAPES]
    v = [torch.zeros(s) for s in SHAPES]

    def adopt_step(step, i, p, g):
        if step == 1:
            v[i] = g * g
            return
        t = step - 1
        normalized = torch.clamp(g / torch.clamp(v[i].sqrt(), min=eps), -t ** 0.25, t ** 0.25)
        m[i] = beta1 * m[i] + (1 - beta1) * normalized
        p.mul_(1 - lr * wd).sub_(lr * m[i])
        v[i] = beta2 * v[i] + (1 - beta2) * g * g
    run_reference(ref, adopt_step, gradients)
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_adopt_adv_first_step_only_initializes_second_moment():
    mine, ref = twin_params()
    optimizer = Adopt_Adv(mine, lr=1.0, weight_decay=0.5)
    run(mine, optimizer, random_gradients(1))
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_simplified_ademamix_equals_reference_transcription():
    mine, ref = twin_params()
    gradients = random_gradients(10)
    lr, beta1, beta2, eps, wd, alpha, warmup, min_beta1 = 1e-3, 0.99, 0.95, 1e-8, 0.1, 2.0, 6, 0.9
    run(mine, Simplified_AdEMAMix(mine, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd, alpha=alpha,
                                  beta1_warmup_steps=warmup, min_beta1=min_beta1), gradients)
    m = [torch.zeros(s) for s in SHAPES]
    v = [torch.zeros(s) for s in SHAPES]
    denominator_sum = [0.0] * len(SHAPES)

    def warmed_beta1(step):
        if step >= warmup:
            return beta1
        a = step / warmup
        half_life = lambda b: math.log(0.5) / math.log(b + 1e-8) - 1  # noqa: E731
        return 0.5 ** (1 / ((1 - a) * half_life(min_beta1) + a * half_life(beta1) + 1))

    def reference_step(step, i, p, g):
        m[i] = warmed_beta1(step) * m[i] + g
        v[i] = beta2 * v[i] + (1 - beta2) * g * g
        denominator_sum[i] = beta2 * denominator_sum[i] + (1 - beta2)
        update = (alpha * g + m[i]) / (v[i].sqrt() + eps * math.sqrt(denominator_sum[i]))
        update = update * math.sqrt(denominator_sum[i]) + wd * p
        p.sub_(lr * update)
    run_reference(ref, reference_step, gradients)
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_adam_adv_ademamix_equals_paper_algorithm():
    mine, ref = twin_params()
    gradients = random_gradients(10)
    lr, beta1, beta2, beta3, alpha, eps, wd, warmup = 1e-2, 0.9, 0.999, 0.999, 5.0, 1e-8, 0.1, 6
    run(mine, Adam_Adv(mine, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd, alpha=alpha, beta3_ema=beta3,
                       ademamix_warmup_steps=warmup, use_AdEMAMix=True), gradients)
    m1 = [torch.zeros(s) for s in SHAPES]
    m2 = [torch.zeros(s) for s in SHAPES]
    v = [torch.zeros(s) for s in SHAPES]

    def reference_step(step, i, p, g):
        fraction = min(step / warmup, 1.0)
        alpha_t = min(step * alpha / warmup, alpha)
        beta3_t = min(math.exp(math.log(beta1) * math.log(beta3)
                               / ((1 - fraction) * math.log(beta3) + fraction * math.log(beta1))), beta3)
        m1[i] = beta1 * m1[i] + (1 - beta1) * g
        m2[i] = beta3_t * m2[i] + (1 - beta3_t) * g
        v[i] = beta2 * v[i] + (1 - beta2) * g * g
        m1_hat, v_hat = m1[i] / (1 - beta1 ** step), v[i] / (1 - beta2 ** step)
        p.sub_(lr * ((m1_hat + alpha_t * m2[i]) / (v_hat.sqrt() + eps) + wd * p))
    run_reference(ref, reference_step, gradients)
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_prodigy_lion_adv_equals_reference_transcription():
    mine, ref = twin_params()
    gradients = random_gradients(10)
    lr, beta1, beta2, wd, d0, slice_p = 1.0, 0.9, 0.99, 0.1, 1e-3, 2
    optimizer = Prodigy_Lion_Adv(mine, lr=lr, betas=(beta1, beta2), weight_decay=wd, d0=d0, slice_p=slice_p)
    run(mine, optimizer, gradients)
    beta3 = math.sqrt(beta2)
    m = [torch.zeros(s) for s in SHAPES]
    s = [torch.zeros(p.numel())[::slice_p] for p in ref]
    p0 = [p.detach().flatten()[::slice_p].clone() for p in ref]
    d, d_max, running_numerator = d0, d0, 0.0
    with torch.no_grad():
        for step_gradients in gradients:
            numerator, denominator = 0.0, 0.0
            for i, (p, g) in enumerate(zip(ref, step_gradients)):
                dlr = d * lr
                g_sliced = g.flatten()[::slice_p]
                numerator += (d / d0) * dlr * torch.dot(g_sliced, p0[i] - p.flatten()[::slice_p]).item()
                s[i] = beta3 * s[i] + (d / d0) * dlr * g_sliced
                denominator += s[i].abs().sum().item()
                update = torch.sign(beta1 * m[i] + (1 - beta1) * d * g)
                m[i] = beta2 * m[i] + (1 - beta2) * d * g
                p.mul_(1 - dlr * wd).sub_(dlr * update)
            running_numerator = beta3 * running_numerator + numerator
            d_hat = running_numerator / denominator
            d = max(d, d_hat) if d == d0 else d
            d_max = max(d_max, d_hat)
            d = min(d_max, d)
    assert optimizer.param_groups[0]["d"] == pytest.approx(d, rel=1e-6)
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_prodigy_lion_adv_with_frozen_d_equals_lion_with_lr_d0():
    mine, ref = twin_params()
    gradients = random_gradients(8)
    # A tiny d_coef keeps d_hat below d0, so d stays d0.
    optimizer = Prodigy_Lion_Adv(mine, lr=0.5, betas=(0.9, 0.99), weight_decay=0.2, d0=1e-2, d_coef=1e-12)
    run(mine, optimizer, gradients)
    run(ref, Lion(ref, lr=0.5 * 1e-2, betas=(0.9, 0.99), weight_decay=0.2), gradients)
    assert optimizer.param_groups[0]["d"] == 1e-2
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
