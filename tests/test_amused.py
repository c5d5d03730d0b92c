"""aMUSEd in Tessera's own networks (generators/uvit.py, tokenizer/vqmodel.py, pipelines/amused.py), against
diffusers' UVit2DModel and AmusedPipeline with small random weights saved by diffusers itself."""
import json

import diffusers
import numpy as np
import pytest
import torch
from test_stable_diffusion import byte_level_vocab
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

import tessera
from tessera.errors import ModelNotFoundError, WrongModelError

UVIT = dict(hidden_size=32, cond_embed_dim=24, micro_cond_encode_dim=2, micro_cond_embed_dim=10,
            encoder_hidden_size=32, vocab_size=40, codebook_size=32, in_channels=12, block_out_channels=24,
            num_res_blocks=1, block_num_heads=2, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
            sample_size=4)


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def amused_folder(tmp_path_factory):
    """A diffusers AmusedPipeline folder: CLIP with projection, a U-ViT with down / up sampling, a VQ f2."""
    torch.manual_seed(0)
    tok = byte_level_vocab()
    text = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=37, projection_dim=24, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)).eval()
    uvit = _perturb(diffusers.UVit2DModel(**UVIT, downsample=True, upsample=True))
    vq = _perturb(diffusers.VQModel(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                                    up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=8,
                                    num_vq_embeddings=32, vq_embed_dim=8, norm_num_groups=8, lookup_from_codebook=True))
    ref = diffusers.AmusedPipeline(vqvae=vq, tokenizer=tok, text_encoder=text, transformer=uvit,
                                   scheduler=diffusers.AmusedScheduler(mask_token_id=39))
    ref.set_progress_bar_config(disable=True)
    root = tmp_path_factory.mktemp("amused") / "pipe"
    ref.save_pretrained(root)
    return root, ref


@pytest.mark.parametrize("variant", ["down-up, no biases", "biases, no norm gains, no kv mapper"])
def test_uvit_logits_equal_diffusers(variant, tmp_path):
    """The U-ViT read strictly from diffusers' save_pretrained gives diffusers' logits, [B,V,h,w] -> [B,hw,V]."""
    from tessera.pipelines.amused import load_transformer

    torch.manual_seed(1)
    kw = dict(UVIT, downsample=True, upsample=True) if variant.startswith("down") else \
        dict(UVIT, use_bias=True, ln_elementwise_affine=False, block_out_channels=32)
    ref = _perturb(diffusers.UVit2DModel(**kw))
    ref.save_pretrained(tmp_path / "transformer")
    ours = load_transformer(tmp_path / "transformer", dtype=torch.float32)
    assert ours.kind == "amused-uvit"
    ids = torch.randint(0, 40, (2, 4, 4))
    text, pooled = torch.randn(2, 7, 32), torch.randn(2, 24)
    micro = torch.tensor([[64.0, 64, 0, 0, 6], [32, 48, 2, 1, 5]])
    with torch.no_grad():
        want = ref(ids, text, pooled, micro).flatten(2).transpose(1, 2)  # (B, hw, V)
        got = ours(ids, text, pooled, micro)
    assert got.shape == (2, 16, 32) and want.std() > 0.1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the micro-conditions reach the logits
        assert (ours(ids, text, pooled, micro.flip(0)) - got).abs().max() > 1e-3


def _call(pipe, **kw):
    args = dict(num_inference_steps=4, guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(5), height=32,
                width=32)
    return np.asarray(pipe("a red apple", **{**args, **kw}).images[0]).astype(int)


def test_amused_folder_gives_diffusers_image(amused_folder):
    """Must show: the same seed gives diffusers' AmusedPipeline image (fp32, within 2/255), with guidance, without
    it, with a negative prompt and at another size; another seed gives another image."""
    folder, ref = amused_folder
    pipe = tessera.load(str(folder), dtype=torch.float32)
    assert type(pipe).__name__ == "AmusedPipeline" and pipe.native_size == 8
    want = _call(ref)
    got = _call(pipe)
    assert got.shape == (32, 32, 3) and want.std() > 10
    assert np.abs(got - want).max() <= 2
    for kw in (dict(guidance_scale=1.0), dict(negative_prompt="blurry"), dict(height=16, width=48, num_inference_steps=3)):
        assert np.abs(_call(pipe, **kw) - _call(ref, **kw)).max() <= 2, kw
    assert np.abs(_call(pipe, generator=torch.Generator("cpu").manual_seed(6)) - got).max() > 20
    from tessera.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="latents"):  # a bad starting grid is named, not a crash
        pipe("a red apple", latents=torch.full((1, 16, 16), 35), height=32, width=32)


def test_amused_folder_loads_strictly(amused_folder, tmp_path):
    """A weight missing from transformer/, an unknown config key or a missing component is an error naming it."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder, _ = amused_folder
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    weights = bad / "transformer" / "diffusion_pytorch_model.safetensors"
    sd = load_file(weights)
    sd.pop("mlm_layer.conv2.weight")
    save_file(sd, weights)
    with pytest.raises(WrongModelError, match="mlm_layer.conv2.weight"):
        tessera.load(str(bad), dtype=torch.float32)
    shutil.rmtree(bad / "transformer")
    shutil.copytree(folder / "transformer", bad / "transformer")
    config = json.loads((bad / "transformer" / "config.json").read_text())
    (bad / "transformer" / "config.json").write_text(json.dumps({**config, "use_flash_rope": True}))
    with pytest.raises(WrongModelError, match="use_flash_rope"):
        tessera.load(str(bad), dtype=torch.float32)
    shutil.rmtree(bad / "vqvae")
    with pytest.raises(ModelNotFoundError, match="vqvae"):
        tessera.load(str(bad), dtype=torch.float32)


def test_the_whole_system_runs_an_amused_folder(amused_folder, tmp_path):
    """`tessera generate --model DIR --paradigm masked` and `tessera serve --model DIR`: safety, enhancement, SR
    and the record around aMUSEd."""
    from click.testing import CliRunner

    from tessera.cli import main
    from tessera.pipelines.records import read_record

    folder, _ = amused_folder
    r = CliRunner().invoke(main, ["generate", "a red apple", "--model", str(folder), "--paradigm", "masked", "--size",
                                  "64", "--steps", "3", "--seed", "5", "--dtype", "float32", "-o", str(tmp_path / "x.png")])
    assert r.exit_code == 0, r.output
    record = read_record(tmp_path / "x.png")
    assert record["model"] == str(folder) and record["seed"] == 5 and record["steps"] == 3 and record["size"] == 64
    r = CliRunner().invoke(main, ["generate", "a red apple", "--model", str(folder), "--paradigm", "diffusion",
                                  "-o", str(tmp_path / "y.png")])
    assert r.exit_code != 0 and "masked" in r.output and not (tmp_path / "y.png").exists()
    from fastapi.testclient import TestClient

    from tessera.serve.app import ServeConfig, create_app

    app = create_app(ServeConfig(data_dir=str(tmp_path / "serve"), models={"masked": str(folder)}, preload=("masked",),
                                 dtype="float32"))
    with TestClient(app) as c:  # `tessera serve --model DIR`
        r = c.post("/v1/images/generations", json={"prompt": "a blue car", "size": "128x128", "steps": 2, "seed": 4,
                                                    "paradigm": "masked"})
        assert r.status_code == 200, r.text
        assert r.json()["tessera"]["model"] == str(folder)


def test_bf16_pipeline_prepacks_the_uvit_and_keeps_its_logits(amused_folder):
    """In bf16 on a CPU the U-ViT and CLIP are prepacked for oneDNN (the VQ decoder is not); the packed U-ViT,
    with the step-constant condition computed once (`prepare`), gives the plain layers' logits."""
    from tessera.nn import onednn

    folder, _ = amused_folder
    pipe = tessera.load(str(folder), dtype="bfloat16")
    if not onednn.available():
        pytest.skip("no oneDNN in this torch build")
    assert onednn.is_packed(pipe.generator) and not onednn.is_packed(pipe.tokenizer)
    torch.manual_seed(2)
    ids = torch.randint(0, 40, (2, 4, 4))
    text, pooled = torch.randn(2, 77, 32, dtype=torch.bfloat16), torch.randn(2, 24, dtype=torch.bfloat16)
    micro = torch.tensor([[8.0, 8, 0, 0, 6]] * 2, dtype=torch.bfloat16)
    with torch.no_grad():
        packed = pipe.generator(ids, prepared=pipe.generator.prepare(text, pooled, micro)).float()
        with pipe.unpacked():
            assert not onednn.is_packed(pipe.generator)
            plain = pipe.generator(ids, text, pooled, micro).float()
    assert onednn.is_packed(pipe.generator)
    torch.testing.assert_close(packed, plain, atol=0.05 * plain.abs().max().item(), rtol=0)
    image = pipe("a red apple", num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(1)).images[0]
    assert image.size == (8, 8)
