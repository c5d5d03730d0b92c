"""Masked generator (Muse / MaskGIT): network semantics, the decoding schedule, fixed tokens, CFG."""
import math

import pytest
import torch

from tessera.registry import build
from tessera.sampling.masked import guided_logits_fn, masked_counts, random_mask, sample
from tessera.text import TinyTextEncoder


def cond_batch(prompts):
    enc = TinyTextEncoder(dim=16, max_tokens=8).encode(prompts)
    return enc.tokens, enc.mask


def test_network_is_bidirectional_and_conditioned(seeded):
    m = build("masked-tiny").eval()
    c, mk = cond_batch(["a red fox", "blue"])
    tokens = torch.randint(0, 64, (2, 16), generator=seeded)
    logits = m(tokens, c, mk)
    assert logits.shape == (2, 16, 64) and torch.isfinite(logits).all()
    changed = tokens.clone()
    changed[:, 12] = m.config.mask_id
    assert not torch.allclose(m(changed, c, mk)[:, :12], logits[:, :12])  # earlier positions see later ones
    swapped = m(tokens, c.flip(0), mk.flip(0))
    assert not torch.allclose(swapped, logits)
    dropped = m(tokens[:1].repeat(2, 1), c, mk, drop=torch.tensor([True, True]))
    torch.testing.assert_close(dropped[0], dropped[1], atol=1e-5, rtol=0)  # captions ignored
    with pytest.raises(ValueError, match="expected 16 tokens"):
        m(tokens[:, :5], c, mk)


def test_schedule_counts_follow_cosine_exactly():
    for n, steps in [(256, 8), (256, 12), (256, 24), (10, 12)]:
        counts = masked_counts(n, steps)[0].tolist()
        assert counts[-1] == 0 and all(a > b or a == 0 for a, b in zip([n] + counts, counts))
        for i, m in enumerate(counts):  # floor(n cos(pi/2 (i+1)/S)), unless it must drop by one more
            assert m == min(math.floor(n * math.cos(math.pi / 2 * (i + 1) / steps)), max(([n] + counts)[i] - 1, 0))
    assert masked_counts(256, 12)[0].tolist()[:3] == [253, 247, 236]  # 256 cos(pi k / 24)


@pytest.mark.parametrize("steps", [8, 12])
def test_decoding_reveals_per_schedule_and_never_touches_known_tokens(steps, seeded):
    n, vocab, mask_id = 64, 50, 50
    start = torch.randint(0, vocab, (3, n), generator=seeded)
    unknown = torch.zeros(3, n, dtype=torch.bool)
    unknown[0] = True                       # generate everything
    unknown[1, 10:40] = True                # inpaint a band
    unknown[2, torch.randperm(n, generator=seeded)[:17]] = True  # scattered holes
    start_masked = torch.where(unknown, torch.full_like(start, mask_id), start)
    seen = []

    def logits_fn(x):
        seen.append((x == mask_id).sum(1).clone())
        return torch.randn(x.shape + (vocab,), generator=seeded) * 3

    out = sample(logits_fn, start_masked, mask_id, steps, generator=torch.Generator().manual_seed(0))
    assert (out != mask_id).all() and (out < vocab).all()
    assert torch.equal(out[~unknown], start[~unknown])  # fixed tokens never change
    expected = masked_counts(unknown.sum(1), steps)  # (B, S)
    got = torch.stack(seen[1:] + [(out == mask_id).sum(1)], dim=1)
    assert torch.equal(got, expected)


def test_decoding_is_reproducible_and_cfg_is_one_forward(seeded):
    m = build("masked-tiny").eval()
    c, mk = cond_batch(["a red fox"])
    calls = []

    def model(x, cond, mask, drop=None):
        calls.append(x.shape[0])
        return m(x, cond, mask, drop)

    fn = guided_logits_fn(model, c, mk, cfg_scale=3.0)
    start = torch.full((1, 16), m.config.mask_id)
    a = sample(fn, start, m.config.mask_id, 6, generator=torch.Generator().manual_seed(1))
    b = sample(fn, start, m.config.mask_id, 6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and calls == [2] * 12  # one batched forward (cond + uncond) per step


def test_random_mask_counts():
    g = torch.Generator().manual_seed(0)
    masked = random_mask(4, 256, torch.tensor([0.0, 0.1, 0.5, 1.0]), g)
    assert masked.sum(1).tolist() == [1, 26, 128, 256]


def test_categorical_matches_its_distribution_and_never_draws_zero_probability():
    from tessera.sampling.categorical import categorical
    p = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])
    g = torch.Generator().manual_seed(0)
    draws = categorical(p.expand(200_000, -1), g)
    freq = torch.bincount(draws, minlength=6).double() / draws.numel()
    assert freq[[0, 2, 5]].sum() == 0  # zero-probability ids, incl. the first and the last
    assert torch.allclose(freq, p.double(), atol=0.005), freq  # 5 sigma at p = 0.5 is 0.0056
    # unnormalised rows and rows with all mass on one id
    q = torch.tensor([[0.0, 0.0, 3.0], [2.0, 0.0, 0.0]])
    assert categorical(q, g).tolist() == [2, 0]


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_the_amused_rule_equals_diffusers_amused_scheduler_step_for_step(schedule):
    from diffusers import AmusedScheduler

    from tessera.sampling.masked import amused_step, amused_temperatures

    steps, mask_id, b, n, v = 6, 20, 2, 36, 20
    ref = AmusedScheduler(mask_token_id=mask_id, masking_schedule=schedule)
    ref.set_timesteps(steps, temperature=(2.0, 0.0))
    temps = amused_temperatures(steps, (2.0, 0.0))
    logits_g = torch.Generator().manual_seed(0)
    theirs = torch.full((b, n), mask_id)
    theirs[:, :3] = 5  # known tokens (inpainting) stay
    ours = theirs.clone()
    g_ref, g_ours = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    for i, t in enumerate(ref.timesteps):
        logits = torch.randn(b, n, v, generator=logits_g) * 3
        theirs = ref.step(logits, int(t), theirs, generator=g_ref).prev_sample
        ours, _ = amused_step(logits, ours, i, steps, mask_id, temps, g_ours, schedule)
        assert torch.equal(ours, theirs), i
    assert not (ours == mask_id).any() and torch.equal(ours[:, :3], torch.full((b, 3), 5))
