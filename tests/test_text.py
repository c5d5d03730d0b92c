import pytest
import torch

from tessera.text import PromptError, TinyTextEncoder, load_text_encoder


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder("minilm")


def test_minilm_loads_offline_and_encodes(minilm):
    out = minilm.encode(["a photo of a dog", "a red sports car parked on the street"])
    assert minilm.dim == 384
    assert out.tokens.shape[0] == 2 and out.tokens.shape[2] == 384
    assert out.mask.dtype == torch.bool and out.mask[0].sum() < out.mask[1].sum()
    torch.testing.assert_close(out.pooled.norm(dim=-1), torch.ones(2))
    again = minilm.encode(["a photo of a dog"])
    n = int(again.mask.sum())
    torch.testing.assert_close(again.tokens[0, :n], out.tokens[0, :n], atol=1e-5, rtol=1e-4)


def test_minilm_weights_are_pretrained(minilm):
    """Random weights would not rank paraphrases above unrelated sentences."""
    p = minilm.encode(["a photo of a dog", "a picture of a puppy", "a red sports car on a highway"]).pooled
    assert float(p[0] @ p[1]) > float(p[0] @ p[2]) + 0.2


def test_long_prompts_are_rejected_not_cut(minilm):
    with pytest.raises(PromptError, match="129 words"):
        minilm.encode([" ".join(["cat"] * 129)])
    assert minilm.encode([" ".join(["cat"] * 128)]).tokens.shape[1] >= 128


def test_missing_hf_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="downloads are off"):
        load_text_encoder(str(tmp_path / "no-such-model"))


def test_tiny_encoder_deterministic():
    a = TinyTextEncoder().encode(["hello world", "x"])
    b = TinyTextEncoder().encode(["hello world", "x"])
    assert torch.equal(a.tokens, b.tokens) and a.mask.tolist() == [[True, True], [True, False]]
