import pytest
import torch

from tessera.registry import build
from tessera.sampling.ar import cached_logits_fn, recompute_logits_fn, sample, top_k_top_p_filter
from tessera.text import PromptError, TinyTextEncoder


def cond_batch(prompts):
    enc = TinyTextEncoder(dim=16, max_tokens=8).encode(prompts)
    return enc.tokens, enc.mask


def test_forward_shapes_and_causality(seeded):
    m = build("ar-tiny").eval()
    cond, mask = cond_batch(["a red fox", "blue"])
    tokens = torch.randint(0, 64, (2, 16), generator=seeded)
    logits = m(tokens[:, :-1], cond, mask)
    assert logits.shape == (2, 16, 64) and torch.isfinite(logits).all()
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 64
    logits2 = m(changed[:, :-1], cond, mask)
    assert torch.allclose(logits[:, :11], logits2[:, :11], atol=1e-6)  # s_0..s_10 predictions blind to s_10
    assert not torch.allclose(logits[:, 11:], logits2[:, 11:])


def test_padding_does_not_change_predictions(seeded):
    m = build("ar-tiny").eval()
    tokens = torch.randint(0, 64, (1, 15), generator=seeded)
    alone = m(tokens, *cond_batch(["blue"]))
    c, mk = cond_batch(["blue", "a much longer prompt here"])
    padded = m(torch.cat([tokens, tokens]), c, mk)[:1]
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=0)


def test_null_condition_ignores_caption(seeded):
    m = build("ar-tiny").eval()
    tokens = torch.randint(0, 64, (2, 15), generator=seeded)
    c, mk = cond_batch(["a red fox", "a green frog jumps"])
    out = m(tokens[:1].repeat(2, 1), c, mk, drop=torch.tensor([True, True]))
    torch.testing.assert_close(out[0], out[1])


@pytest.mark.parametrize("guided", [False, True])
def test_kv_cache_sampling_equals_recompute(guided):
    torch.manual_seed(1)
    m = build("ar-tiny").eval()
    cond, mask = cond_batch(["a red fox", "two blue birds on a wire"])
    kw = dict(temperature=1.0, top_k=20, top_p=0.95, cfg_scale=3.0 if guided else 1.0, cfg_interval=10)
    a = sample(cached_logits_fn(m, 2, cond, mask, guided), 2, 16, generator=torch.Generator().manual_seed(7), **kw)
    b = sample(recompute_logits_fn(m, 2, cond, mask, guided), 2, 16, generator=torch.Generator().manual_seed(7), **kw)
    assert a.shape == (2, 16) and torch.equal(a, b)
    c = sample(cached_logits_fn(m, 2, cond, mask, guided), 2, 16, generator=torch.Generator().manual_seed(8), **kw)
    assert not torch.equal(a, c)


def test_unconditional_first_token_random_and_cache_equivalence():
    torch.manual_seed(2)
    m = build("ar-tiny", cond_dim=0).eval()
    g = torch.Generator().manual_seed(3)
    first = torch.randint(0, 64, (3,), generator=g)
    a = sample(cached_logits_fn(m, 3), 3, 16, generator=torch.Generator().manual_seed(4), first_tokens=first)
    b = sample(recompute_logits_fn(m, 3), 3, 16, generator=torch.Generator().manual_seed(4), first_tokens=first)
    assert torch.equal(a, b) and torch.equal(a[:, 0], first)


def test_cached_logits_match_full_pass(seeded):
    m = build("ar-tiny").eval()
    cond, mask = cond_batch(["a red fox", "blue"])
    tokens = torch.randint(0, 64, (2, 16), generator=seeded)
    full = m(tokens, cond, mask)  # (2, 17, V)
    fn = cached_logits_fn(m, 2, cond, mask)
    for t in range(17):
        torch.testing.assert_close(fn(tokens[:, :t]), full[:, t], atol=1e-5, rtol=1e-5)


def test_top_k_top_p_filter():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(top_k_top_p_filter(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(top_k_top_p_filter(logits, top_p=0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(top_k_top_p_filter(logits, top_p=0.81)).tolist() == [[False, False, False, True]]
    assert torch.isinf(top_k_top_p_filter(logits, top_p=0.1)).tolist() == [[False, True, True, True]]


def test_cfg_combines_rows():
    calls = []

    def fn(tokens):
        calls.append(tokens.shape[0])
        cond = torch.tensor([[0.0, 1.0]]).repeat(2, 1)
        uncond = torch.tensor([[1.0, 0.0]]).repeat(2, 1)
        return torch.cat([cond, uncond])

    out = sample(fn, 2, 3, generator=torch.Generator().manual_seed(0), temperature=0, cfg_scale=2.0)
    assert calls == [4, 4, 4] and out.tolist() == [[1, 1, 1], [1, 1, 1]]


def test_prompt_rules():
    with pytest.raises(PromptError, match="129 words"):
        TinyTextEncoder(max_tokens=200).encode([" ".join(["w"] * 129)])
    m = build("ar-tiny")
    c = TinyTextEncoder(dim=16, max_tokens=32).encode([" ".join(["w"] * 9)]).tokens
    with pytest.raises(ValueError, match="at most 8"):
        m(torch.zeros(1, 0, dtype=torch.long), c, torch.ones(1, 9, dtype=torch.bool))
