"""LlamaGen's GPT: a synthetic checkpoint with LlamaGen's exact key names and shapes (written here from the
release layout, not from Tessera's module) loads strictly; and the invariants that fail on a wrong port:
causality, 2-D RoPE scores that depend only on grid offsets, KV-cached == recomputed logits, CFG."""
from pathlib import Path

import pytest
import torch

from tessera.checkpoint import load_strict, read_pickled_state
from tessera.errors import WrongModelError
from tessera.generators.llamagen import LlamaGenConfig, LlamaGenGPT, apply_rope, rope_2d
from tessera.sampling.ar import prefix_logits_fn, sample

CFG = LlamaGenConfig(dim=32, n_layer=2, n_head=4, multiple_of=32, num_classes=10, vocab_size=50, block_size=16)


def _release_keys(n_layer=2, dim=32, hidden=96, vocab=50, classes=10) -> dict[str, tuple]:
    """c2i_*.pt's `model` for this config: names and shapes as released (hidden: 2*4*dim/3 rounded up)."""
    keys = {"tok_embeddings.weight": (vocab, dim), "cls_embedding.embedding_table.weight": (classes + 1, dim),
            "norm.weight": (dim,), "output.weight": (vocab, dim)}
    for i in range(n_layer):
        keys.update({f"layers.{i}.attention.wqkv.weight": (3 * dim, dim), f"layers.{i}.attention.wo.weight": (dim, dim),
                     f"layers.{i}.feed_forward.w1.weight": (hidden, dim),
                     f"layers.{i}.feed_forward.w3.weight": (hidden, dim),
                     f"layers.{i}.feed_forward.w2.weight": (dim, hidden),
                     f"layers.{i}.attention_norm.weight": (dim,), f"layers.{i}.ffn_norm.weight": (dim,)})
    return keys


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    torch.manual_seed(0)
    state = {k: torch.randn(shape) * 0.2 for k, shape in _release_keys().items()}
    path = tmp_path_factory.mktemp("llamagen") / "c2i_tiny.pt"
    torch.save({"model": state}, path)
    return load_strict(LlamaGenGPT(CFG), read_pickled_state(path), path).eval()


def test_a_release_layout_loads_strictly_and_a_wrong_one_is_named(tmp_path):
    keys = _release_keys()
    keys.pop("norm.weight")
    torch.save({"module": {k: torch.zeros(s) for k, s in keys.items()}}, tmp_path / "bad.pt")
    with pytest.raises(WrongModelError, match="norm.weight"):
        load_strict(LlamaGenGPT(CFG), read_pickled_state(tmp_path / "bad.pt"), tmp_path / "bad.pt")


def test_causality_and_the_kv_cache(gpt):
    labels, ids = torch.tensor([3, 7]), torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        full = gpt(labels, ids)  # (2, 11, 50)
        later = ids.clone()
        later[:, 6:] = (later[:, 6:] + 1) % 50
        torch.testing.assert_close(gpt(labels, later)[:, :7], full[:, :7])  # position i sees only <= i
        fn = prefix_logits_fn(gpt, labels)
        cached = [fn(ids[:, :t]) for t in range(ids.shape[1] + 1)]  # token by token through the cache
    torch.testing.assert_close(torch.stack(cached, 1), full, atol=1e-4, rtol=1e-4)


def test_2d_rope_scores_depend_only_on_grid_offsets():
    grid, d = 4, 16
    table = rope_2d(grid, d, 10000.0, cond_tokens=1)
    assert torch.equal(table[0], torch.zeros(d // 2, 2))  # the condition position: LlamaGen's zero table
    q, k = torch.randn(d), torch.randn(d)
    n = grid * grid
    rq = apply_rope(q.expand(1, n, 1, d).contiguous(), table[1:])[0, :, 0]  # (n, d): the same q at every cell
    rk = apply_rope(k.expand(1, n, 1, d).contiguous(), table[1:])[0, :, 0]
    scores = rq @ rk.t()  # (n, n)
    pos = [(a // grid, a % grid) for a in range(n)]
    by_offset = {}
    for a in range(n):
        for b in range(n):
            off = (pos[a][0] - pos[b][0], pos[a][1] - pos[b][1])
            by_offset.setdefault(off, []).append(scores[a, b])
    assert all(torch.allclose(torch.stack(v), v[0].expand(len(v)), atol=1e-4) for v in by_offset.values())
    assert len({round(float(v[0]), 3) for v in by_offset.values()}) > 10  # and offsets do matter


def test_guided_sampling_mixes_the_null_class_and_scale_one_is_conditional(gpt):
    labels, null = torch.tensor([3, 7]), torch.full((2,), gpt.null_class)
    with torch.no_grad():
        plain = sample(prefix_logits_fn(gpt, labels), 2, 16, generator=torch.Generator().manual_seed(1))
        one = sample(prefix_logits_fn(gpt, labels, null), 2, 16, generator=torch.Generator().manual_seed(1),
                     cfg_scale=1.0 + 1e-7)  # the guided path at scale ~1: u + 1 * (c - u) = c
        guided = sample(prefix_logits_fn(gpt, labels, null), 2, 16, generator=torch.Generator().manual_seed(1),
                        cfg_scale=4.0)
    assert torch.equal(one, plain) and not torch.equal(guided, plain)
    assert guided.shape == (2, 16) and 0 <= guided.min() and guided.max() < 50


def _taming_to_llamagen(name: str, levels: int) -> str:
    """taming's first-stage names -> LlamaGen's (its decoder's conv_blocks run lowest resolution first)."""
    import re

    name = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.conv_blocks.\1.res.", name)
    name = re.sub(r"^encoder\.down\.(\d+)\.", r"encoder.conv_blocks.\1.", name)
    if m := re.match(r"^decoder\.up\.(\d+)\.(block|attn|upsample)(.*)$", name):
        kind = {"block": "res", "attn": "attn", "upsample": "upsample"}[m[2]]
        name = f"decoder.conv_blocks.{levels - 1 - int(m[1])}.{kind}{m[3]}"
    return re.sub(r"\.mid\.(block_1|attn_1|block_2)\.", lambda m: f".mid.{['block_1', 'attn_1', 'block_2'].index(m[1])}.",
                  name)


@pytest.mark.parametrize("l2", [False, True])
def test_the_vq_tokenizer_is_tamings_stack_in_llamagens_layout(l2):
    """LlamaGen's VQ is taming's encoder / decoder with attention at the lowest resolution only: taming's own
    modules (attn_resolutions = that resolution), renamed into LlamaGen's layout, load strictly and give the
    same tokens and images; with l2, the nearest normalised code."""
    import torch.nn.functional as F
    from test_taming import reference

    model = reference("taming.modules.diffusionmodules.model")
    Encoder, Decoder = model.Encoder, model.Decoder
    from tessera.tokenizer.llamagen_vq import LlamaGenVQ, LlamaGenVQConfig

    torch.manual_seed(0)
    dd = dict(double_z=False, z_channels=16, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2],
              num_res_blocks=1, attn_resolutions=[8], dropout=0.0)
    enc, dec = Encoder(**dd).eval(), Decoder(**dd).eval()
    quant, post = torch.nn.Conv2d(16, 8, 1), torch.nn.Conv2d(8, 16, 1)
    codebook = torch.randn(64, 8)
    state = {**{f"encoder.{k}": v for k, v in enc.state_dict().items()},
             **{f"decoder.{k}": v for k, v in dec.state_dict().items()},
             **{f"quant_conv.{k}": v for k, v in quant.state_dict().items()},
             **{f"post_quant_conv.{k}": v for k, v in post.state_dict().items()},
             "quantize.embedding.weight": codebook, "quantize.codebook_used": torch.zeros(65536)}
    state = {_taming_to_llamagen(k, 3): v for k, v in state.items()}
    cfg = LlamaGenVQConfig(codebook_size=64, codebook_embed_dim=8, codebook_l2_norm=l2, encoder_ch_mult=(1, 2, 2),
                           decoder_ch_mult=(1, 2, 2), z_channels=16, ch=32, num_res_blocks=1)
    ours = load_strict(LlamaGenVQ(cfg), state, Path("vq")).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = quant(enc(x)).permute(0, 2, 3, 1).reshape(-1, 8)
        codes = F.normalize(codebook, dim=-1) if l2 else codebook
        z = F.normalize(z, dim=-1) if l2 else z
        want = torch.cdist(z, codes).argmin(1).reshape(2, 8, 8)
        tokens = ours.encode(x)
        assert torch.equal(tokens, want) and len(tokens.unique()) > 1
        image = dec(post(codes[tokens].permute(0, 3, 1, 2)))
        torch.testing.assert_close(ours.decode_tokens(tokens), image, atol=1e-4, rtol=1e-4)


TINY_VQ = dict(codebook_size=50, codebook_embed_dim=8, encoder_ch_mult=(1, 2, 2), decoder_ch_mult=(1, 2, 2),
               z_channels=16, ch=32, num_res_blocks=1)


def test_a_llamagen_release_draws_class_conditional_images_with_guidance(gpt, tmp_path):
    from tessera.pipelines.llamagen import LlamaGenPipeline
    from tessera.sampling.ar import sample_next
    from tessera.tokenizer.llamagen_vq import LlamaGenVQ, LlamaGenVQConfig

    torch.manual_seed(1)
    vq = LlamaGenVQ(LlamaGenVQConfig(**TINY_VQ))
    torch.save({"model": gpt.state_dict()}, tmp_path / "c2i_B_256.pt")
    torch.save({"model": vq.state_dict()}, tmp_path / "vq_ds16_c2i.pt")
    small = dict(n_layer=2, n_head=4, dim=32, multiple_of=32, num_classes=10, vocab_size=50, vq=TINY_VQ)
    pipe = LlamaGenPipeline.from_release(tmp_path / "c2i_B_256.pt", tmp_path / "vq_ds16_c2i.pt", "B", 16, **small)
    assert pipe.native_size == 16 and pipe.grid == 4
    out = pipe(class_label=3, num_images_per_prompt=2, guidance_scale=4.0, top_k=20,
               generator=torch.Generator().manual_seed(2), output_type="pt")
    tokens = pipe(class_label=3, num_images_per_prompt=2, guidance_scale=4.0, top_k=20,
                  generator=torch.Generator().manual_seed(2), output_type="latent").images
    g, seq = torch.Generator().manual_seed(2), torch.zeros(2, 0, dtype=torch.long)
    with torch.no_grad():
        for _ in range(16):  # by hand: recompute the whole sequence, guide with the null class, draw
            both = gpt(torch.tensor([3, 3, 10, 10]), torch.cat([seq, seq]) if seq.shape[1] else None)[:, -1]
            c, u = both.chunk(2)
            seq = torch.cat([seq, sample_next(u + 4.0 * (c - u), g, 1.0, 20)[:, None]], dim=1)
    assert torch.equal(tokens.reshape(2, 16), seq) and out.parameters["class_label"] == 3
    # cfg_interval as generate.py counts it: the prefill's token and decode steps 0..K guided (K = 1 here)
    tokens = pipe(class_label=3, num_images_per_prompt=2, guidance_scale=4.0, top_k=20, cfg_interval=1,
                  generator=torch.Generator().manual_seed(2), output_type="latent").images
    g, seq = torch.Generator().manual_seed(2), torch.zeros(2, 0, dtype=torch.long)
    with torch.no_grad():
        for t in range(16):
            both = gpt(torch.tensor([3, 3, 10, 10]), torch.cat([seq, seq]) if seq.shape[1] else None)[:, -1]
            c, u = both.chunk(2)
            seq = torch.cat([seq, sample_next(u + 4.0 * (c - u) if t <= 2 else c, g, 1.0, 20)[:, None]], dim=1)
    assert torch.equal(tokens.reshape(2, 16), seq)
    assert out.images.shape == (2, 3, 16, 16)
    with pytest.raises(Exception, match="class_label"):
        pipe(class_label=10)
    # tessera.load finds such a folder by its file names (here the shapes are the tiny ones, not GPT-B's)
    import tessera

    with pytest.raises(WrongModelError, match="c2i_B_256.pt"):
        tessera.load(str(tmp_path))


def test_the_compiled_one_token_step_equals_the_eager_one(gpt):
    """compile_step(): one graph for every position (the position is a tensor input), the same logits."""
    import copy

    model = copy.deepcopy(gpt)
    labels, ids = torch.tensor([3, 10]), torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        want = torch.stack([prefix_logits_fn(gpt, labels)(ids[:, :t]) for t in range(1, 7)], 1)
        model.compile_step()
        fn = prefix_logits_fn(model, labels)
        got = torch.stack([fn(ids[:, :t]) for t in range(1, 7)], 1)  # (2, 6, 50)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_int8_weight_only_layers_stay_close_to_bf16(gpt):
    """nn/quant.py: per-output-channel int8 weights; a layer within 1% of its bf16 output's scale, the whole
    GPT's logits close enough that the argmax token mostly agrees, and the decode still runs on the cache."""
    import copy

    from tessera.nn.quant import Int8Linear, available, quantize_int8

    if not available():
        pytest.skip("no int8 weight-only matmul in this torch build")
    lin = torch.nn.Linear(64, 96).to(torch.bfloat16)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    q = Int8Linear(lin)
    assert q.weight_int8.dtype == torch.int8 and q.weight_int8.abs().max() == 127
    with torch.no_grad():
        ref = lin(x).float()
        assert (q(x).float() - ref).abs().max() <= 0.01 * ref.abs().max()
    bf16 = copy.deepcopy(gpt).to(torch.bfloat16)
    model = copy.deepcopy(bf16)
    assert quantize_int8(model) == 1 + 2 * 5  # output + per layer wqkv, wo, w1, w2, w3
    labels, ids = torch.tensor([3, 7]), torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        want, got = bf16(labels, ids), model(labels, ids)
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.8


T2I = LlamaGenConfig(dim=32, n_layer=2, n_head=4, multiple_of=32, vocab_size=50, block_size=16, model_type="t2i",
                     cls_token_num=8, caption_dim=12)


def _tiny_t5(folder: Path) -> None:
    """A transformers T5 encoder (random) with a word-level tokenizer, saved as a release's T5 folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = ["<pad>", "</s>", "<unk>", "a", "red", "fox", "blue", "car", "in", "the", "snow", "big", "small"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(5)
    T5EncoderModel(T5Config(vocab_size=len(words), d_model=12, d_kv=4, d_ff=24, num_layers=1, num_heads=3)
                   ).save_pretrained(folder)
    fast.save_pretrained(folder)


def test_text_to_image_padding_is_masked_and_the_cache_matches(tmp_path):
    """t2i: caption positions marked padding change nothing (no position attends to them); the KV-cached
    decode with the mask equals recomputing the masked sequence."""
    torch.manual_seed(0)
    model = LlamaGenGPT(T2I).eval()
    cond, ids = torch.randn(2, 8, 12), torch.randint(0, 50, (2, 6))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, :5], mask[1, :2] = False, False  # left padding
    with torch.no_grad():
        full = model(cond, ids, cond_mask=mask)  # (2, 14, 50)
        noisy = torch.where(mask[..., None], cond, torch.randn_like(cond) * 5)
        torch.testing.assert_close(model(noisy, ids, cond_mask=mask)[:, 7:], full[:, 7:])
        assert (model(noisy, ids)[:, 7:] - full[:, 7:]).abs().max() > 1e-3  # unmasked, the padding is read
        fn = prefix_logits_fn(model, cond, cond_mask=mask)
        cached = torch.stack([fn(ids[:, :t]) for t in range(ids.shape[1] + 1)], 1)
    torch.testing.assert_close(cached, full[:, 7:], atol=1e-4, rtol=1e-4)


def test_a_text_to_image_release_draws_with_its_t5_left_padding_and_null_caption(tmp_path):
    """A t2i folder (t2i_*_stage1_256.pt + vq_ds16_t2i.pt + a T5 folder): the prompt's T5 states, left-padded
    and zeroed, guided by the stored uncond_embedding under the same mask — as a hand-written loop."""
    from tessera.pipelines.llamagen import LlamaGenPipeline, left_padded
    from tessera.sampling.ar import sample_next
    from tessera.text import HFTextEncoder
    from tessera.tokenizer.llamagen_vq import LlamaGenVQ, LlamaGenVQConfig

    torch.manual_seed(1)
    gpt = LlamaGenGPT(T2I).eval()
    with torch.no_grad():
        gpt.cls_embedding.uncond_embedding.normal_()
    vq = LlamaGenVQ(LlamaGenVQConfig(**TINY_VQ))
    torch.save({"model": gpt.state_dict()}, tmp_path / "t2i_B_stage1_256.pt")
    torch.save({"model": vq.state_dict()}, tmp_path / "vq_ds16_t2i.pt")
    _tiny_t5(tmp_path / "flan-t5-tiny")
    small = dict(n_layer=2, n_head=4, dim=32, multiple_of=32, vocab_size=50, cls_token_num=8, caption_dim=12,
                 vq=TINY_VQ)
    pipe = LlamaGenPipeline.from_release(tmp_path / "t2i_B_stage1_256.pt", tmp_path / "vq_ds16_t2i.pt", "B", 16,
                                         **small)
    assert pipe.sampler.cfg_scale == 7.5 and pipe.sampler.top_k == 1000
    tokens = pipe("a red fox", guidance_scale=3.0, top_k=20, generator=torch.Generator().manual_seed(2),
                  output_type="latent").images
    enc = HFTextEncoder(tmp_path / "flan-t5-tiny").encode(["a red fox"])
    assert enc.mask.sum() == 4  # a red fox </s>
    states, valid = left_padded(enc.tokens, enc.mask, 8)
    assert valid[0].tolist() == [False] * 4 + [True] * 4 and torch.equal(states[0, 4:], enc.tokens[0])
    rows = torch.cat([states * valid[..., None], gpt.cls_embedding.uncond_embedding[None]])
    g, seq = torch.Generator().manual_seed(2), torch.zeros(1, 0, dtype=torch.long)
    with torch.no_grad():
        for _ in range(16):  # by hand: the whole masked sequence each time, guided by the null caption
            both = gpt(rows, torch.cat([seq, seq]) if seq.shape[1] else None, cond_mask=torch.cat([valid, valid]))
            c, u = both[:, -1].chunk(2)
            seq = torch.cat([seq, sample_next(u + 3.0 * (c - u), g, 1.0, 20)[:, None]], dim=1)
    assert torch.equal(tokens.reshape(1, 16), seq)
    assert pipe.too_long(["a red fox " * 2]) == [None] and "10 prompt tokens" in pipe.too_long(["a red fox " * 3])[0]
    with pytest.raises(Exception, match="class_label"):
        pipe("a red fox", class_label=3)
