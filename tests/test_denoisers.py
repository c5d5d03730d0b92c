"""The diffusion denoisers (U-Net, DiT): shapes, conditioning semantics, export round trip, learning."""
import pytest
import torch

from tessera.checkpoint import export_model, load_model
from tessera.generators.dit import DiT, DiTConfig
from tessera.generators.unet import UNet, UNetConfig
from tessera.nn.conditioning import timestep_embedding
from tessera.registry import build
from tessera.sampling.diffusion import DiffusionConfig, Schedule, diffusion_loss, guided_denoiser, sample
from tessera.text import TinyTextEncoder


def cond_batch(prompts):
    enc = TinyTextEncoder(dim=16, max_tokens=8).encode(prompts)
    return enc.tokens, enc.mask


def perturbed(m, seed: int = 0):
    """Zero-initialised output layers make a fresh denoiser a constant 0; give every weight some noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m.eval()


TINY = ["unet-tiny", "dit-tiny"]


@pytest.mark.parametrize("preset", TINY)
def test_fresh_denoiser_predicts_zero_and_shapes(preset, seeded):
    m = build(preset).eval()
    x, t = torch.randn(2, 4, 8, 8, generator=seeded), torch.tensor([0, 999])
    c, mk = cond_batch(["a red fox", "blue"])
    assert torch.equal(m(x, t, c, mk), torch.zeros_like(x))  # zero-initialised output layer
    out = perturbed(m)(x, t, c, mk)
    assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().mean() > 0


@pytest.mark.parametrize("preset", TINY)
def test_timestep_and_text_change_the_output(preset, seeded):
    m = perturbed(build(preset))
    x = torch.randn(1, 4, 8, 8, generator=seeded)
    c, mk = cond_batch(["a red fox"])
    c2, mk2 = cond_batch(["a green frog"])
    base = m(x, torch.tensor([10]), c, mk)
    assert not torch.allclose(base, m(x, torch.tensor([900]), c, mk))
    assert not torch.allclose(base, m(x, torch.tensor([10]), c2, mk2))
    e = timestep_embedding(torch.tensor([0, 5]), 16)
    assert e.shape == (2, 16) and torch.allclose(e[0, :8], torch.ones(8))  # cos(0) = 1


@pytest.mark.parametrize("preset", TINY)
def test_padding_and_null_condition(preset, seeded):
    m = perturbed(build(preset))
    x, t = torch.randn(1, 4, 8, 8, generator=seeded), torch.tensor([300])
    alone = m(x, t, *cond_batch(["blue"]))
    c, mk = cond_batch(["blue", "a much longer prompt here"])
    torch.testing.assert_close(alone, m(x.repeat(2, 1, 1, 1), t.repeat(2), c, mk)[:1], atol=1e-5, rtol=0)
    dropped = m(x.repeat(2, 1, 1, 1), t.repeat(2), c, mk, drop=torch.tensor([True, True]))
    torch.testing.assert_close(dropped[0], dropped[1], atol=1e-5, rtol=0)  # captions ignored
    torch.testing.assert_close(dropped[:1], m(x, t), atol=1e-5, rtol=0)  # no prompt = null condition


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_export_round_trip_and_unconditional_pixels(kind, tmp_path, seeded):
    if kind == "unet":
        m = UNet(UNetConfig(in_channels=3, sample_size=8, base_channels=16, channel_mult=(1, 2),
                            attn_levels=(False, True), heads=2, cond_dim=0))
    else:
        m = DiT(DiTConfig(in_channels=3, sample_size=8, patch_size=4, dim=32, depth=1, heads=2, cond_dim=0))
    m = perturbed(m)
    x, t = torch.randn(2, 3, 8, 8, generator=seeded), torch.tensor([1, 2])
    export_model(m, tmp_path / "u")
    m2 = load_model(tmp_path / "u")
    assert m2.config == m.config and torch.equal(m(x, t), m2(x, t))


def test_dit_blocks_start_as_identity_adaln_zero(seeded):
    """adaLN-Zero in the adaLN-single form: zero shared modulation, zero tables, zero cross-attention
    output, so a fresh block returns its input unchanged whatever the timestep and prompt."""
    m = build("dit-tiny").eval()
    h = torch.randn(2, 16, m.config.dim, generator=seeded)
    mod = m.ada(torch.randn(2, m.config.dim, generator=seeded)).view(2, 6, -1)
    ctx, mk = cond_batch(["a red fox", "blue"])
    for block in m.blocks:
        assert torch.equal(block(h, mod, m.caption(ctx), mk), h)
    perturbed(m)
    assert not torch.allclose(m.blocks[0](h, mod, m.caption(ctx), mk), h)


def test_dit_unpatchify_inverts_patch_order(seeded):
    m = build("dit-tiny")
    x = torch.randn(2, 4, 8, 8, generator=seeded)
    p = x.unfold(2, 2, 2).unfold(3, 2, 2)  # (B, C, gh, gw, p, p)
    tokens = p.permute(0, 2, 3, 4, 5, 1).reshape(2, 16, 2 * 2 * 4)  # (B, N, p*p*C), DiT's order
    assert torch.equal(m.unpatchify(tokens), x)


@pytest.mark.parametrize("preset", TINY)
def test_denoiser_learns_one_image(preset):
    """150 steps on a single latent: the loss falls and DDIM sampling lands near it (v-prediction: with
    epsilon-prediction the x_0 estimate at high noise is ill-conditioned and needs far more steps)."""
    torch.manual_seed(0)
    m = build(preset)
    s = Schedule(DiffusionConfig(schedule="cosine", prediction="v"))
    x0 = torch.linspace(-1, 1, 4 * 8 * 8).view(1, 4, 8, 8)
    c, mk = cond_batch(["target"])
    opt = torch.optim.AdamW(m.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    fn = lambda x, t: m(x, t, c.expand(8, -1, -1), mk.expand(8, -1))  # noqa: E731
    first = None
    for _ in range(150):
        loss = diffusion_loss(fn, s, x0.expand(8, -1, -1, -1), generator=g).mean()
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.3 * first
    m.eval()
    with torch.no_grad():
        out = sample(guided_denoiser(m, c, mk), s, torch.randn(1, 4, 8, 8, generator=g), steps=20)
    assert float((out - x0).abs().mean()) < 0.3  # random noise starts ~1.0 away
