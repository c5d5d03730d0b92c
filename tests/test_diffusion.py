"""The diffusion process: schedules, forward process, and DDPM / DDIM steps against diffusers."""
import pytest
import torch

from tessera.sampling.diffusion import (
    DiffusionConfig,
    Schedule,
    ddim_step,
    ddpm_step,
    diffusion_loss,
    guided_denoiser,
    sample,
)

diffusers = pytest.importorskip("diffusers")

SCHEDULES = {"linear": ("linear", dict(beta_start=0.00085, beta_end=0.012)),
             "cosine": ("squaredcos_cap_v2", {})}


def _pair(kind: str, prediction: str = "epsilon", clip: float = 0.0):
    ours = Schedule(DiffusionConfig(schedule=kind, prediction=prediction, clip_sample=clip,
                                    **SCHEDULES[kind][1]))
    theirs = dict(num_train_timesteps=1000, beta_schedule=SCHEDULES[kind][0], clip_sample=clip > 0,
                  clip_sample_range=clip or 1.0, prediction_type="v_prediction" if prediction == "v" else "epsilon",
                  **SCHEDULES[kind][1])
    return ours, theirs


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_matches_diffusers(kind):
    ours, theirs = _pair(kind)
    ref = diffusers.DDPMScheduler(**theirs)
    torch.testing.assert_close(ours.alphas_cumprod.float(), ref.alphas_cumprod, atol=1e-6, rtol=1e-5)
    x0, noise, t = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("prediction,clip", [("epsilon", 0.0), ("epsilon", 1.0), ("v", 0.0)])
def test_ddim_step_matches_diffusers(kind, eta, prediction, clip):
    ours, theirs = _pair(kind, prediction, clip)
    ref = diffusers.DDIMScheduler(**theirs)
    ref.set_timesteps(20)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    assert ours.inference_timesteps(20).tolist() == ref.timesteps.tolist()
    for t in ref.timesteps.tolist():
        out, z = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
        expect = ref.step(out, t, x, eta=eta, variance_noise=z).prev_sample
        got = ddim_step(out, t, x, ours, t - 1000 // 20, eta, z)
        torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)
        x = expect


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("prediction,clip", [("epsilon", 0.0), ("epsilon", 1.0), ("v", 0.0)])
@pytest.mark.parametrize("steps", [1000, 25])
def test_ddpm_step_matches_diffusers(kind, prediction, clip, steps):
    ours, theirs = _pair(kind, prediction, clip)
    ref = diffusers.DDPMScheduler(**theirs)
    ref.set_timesteps(steps)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for t in ref.timesteps.tolist()[-30:]:  # the last (most sensitive) steps, incl. t = 0
        out = torch.randn(x.shape, generator=g)
        seed = int(torch.randint(0, 2**31, (1,), generator=g))
        expect = ref.step(out, t, x, generator=torch.Generator().manual_seed(seed)).prev_sample
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        got = ddpm_step(out, t, x, ours, t - 1000 // steps, z)
        torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)
        x = expect


def test_v_and_eps_targets_recover_x0():
    s = Schedule(DiffusionConfig(prediction="v"))
    x0, noise, t = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.tensor([1, 400, 998])
    xt = s.add_noise(x0, noise, t)
    x0_hat, eps_hat = s.split(s.target(x0, noise, t), xt, t)
    torch.testing.assert_close(x0_hat, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(eps_hat, noise, atol=1e-4, rtol=1e-4)


def test_perfect_denoiser_recovers_data_and_loss_is_zero():
    """With the true eps for a single known x_0, DDIM(eta=0) lands on x_0 and the loss is 0."""
    s = Schedule(DiffusionConfig(schedule="cosine"))
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1

    def oracle(x, t):  # eps implied by x_t and the known x_0
        a = s.abar(t, x)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    g = torch.Generator().manual_seed(0)
    out = sample(oracle, s, torch.randn(x0.shape, generator=g), steps=10, method="ddim")
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)
    out = sample(oracle, s, torch.randn(x0.shape, generator=g), steps=50, method="ddpm", generator=g)
    torch.testing.assert_close(out, x0, atol=1e-3, rtol=1e-3)
    assert float(diffusion_loss(oracle, s, x0, generator=g).max()) < 1e-8


def test_sampler_is_reproducible_and_reports_progress():
    s = Schedule(DiffusionConfig())
    fn = lambda x, t: 0.1 * x  # noqa: E731
    seen = []
    a = sample(fn, s, torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(5)), 7, "ddpm",
               generator=torch.Generator().manual_seed(9), callback=lambda i, n: seen.append((i, n)))
    b = sample(fn, s, torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(5)), 7, "ddpm",
               generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b) and seen == [(i, 7) for i in range(1, 8)]
    with pytest.raises(ValueError, match="steps=0"):
        sample(fn, s, torch.zeros(1, 1), 0)
    with pytest.raises(ValueError, match="schedule='quadratic'"):
        DiffusionConfig(schedule="quadratic")


def test_guidance_is_one_batched_call():
    calls = []

    def model(x, t, cond, mask, drop):
        calls.append(x.shape[0])
        null = torch.zeros(x.shape[0]) if drop is None else drop.float()
        return x * 0 + (cond.sum((1, 2)) * (1 - null) + 7 * null).view(-1, 1)

    cond, mask = torch.ones(2, 3, 4), torch.ones(2, 3, dtype=torch.bool)
    fn = guided_denoiser(model, cond, mask, cfg_scale=2.0)
    out = fn(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long))
    assert calls == [4]  # conditional and unconditional halves in one forward
    assert torch.allclose(out, torch.full((2, 5), 7 + 2.0 * (12 - 7)))
    neg = torch.full((2, 2, 4), 0.5)
    out = guided_denoiser(model, cond, mask, 2.0, neg, torch.ones(2, 2, dtype=torch.bool))(
        torch.zeros(2, 5), torch.zeros(2, dtype=torch.long))
    assert torch.allclose(out, torch.full((2, 5), 4 + 2.0 * (12 - 4)))  # negative prompt replaces the null
