"""A small random Stable Diffusion pipeline saved by diffusers (tiny CLIP text model, a byte-level CLIP BPE
vocabulary written here, small U-Net and VAE) loads with `tessera.load(DIR)` into Tessera's own networks,
and the same seed, steps and guidance give the same image as diffusers' StableDiffusionPipeline (fp32)."""
import json

import diffusers
import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import tessera
from tessera.errors import WrongModelError


def byte_level_vocab() -> CLIPTokenizer:
    """CLIP's byte-level alphabet, each symbol alone and word-final, no merges: a real CLIPTokenizer."""
    from tokenizers import pre_tokenizers

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars])}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def tiny_components(in_channels: int):
    """A tiny CLIP text model with its tokenizer, SD-layout U-Net (4 or 9 input channels) and VAE (16 px images)."""
    tokenizer = byte_level_vocab()
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                        pad_token_id=tokenizer.pad_token_id)).eval()
    unet = _perturb(diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=in_channels, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8))
    vae = _perturb(diffusers.AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                                           down_block_types=("DownEncoderBlock2D",) * 2,
                                           up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4))
    return tokenizer, text, unet, vae


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("sd")
    tokenizer, text, unet, vae = tiny_components(in_channels=4)
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(root / "pipe")
    return root / "pipe", pipe


def _with_scheduler(folder, name: str, tmp_path):
    """The same folder with another scheduler (its config rebuilt from the saved one, as users swap them)."""
    import shutil

    out = tmp_path / name
    shutil.copytree(folder, out)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    getattr(diffusers, name).from_config(config).save_pretrained(out / "scheduler")
    index = json.loads((out / "model_index.json").read_text())
    (out / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", name]}))
    return out


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler"])
@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_the_same_seed_gives_the_diffusers_image(sd_folder, scheduler, guidance, tmp_path):
    folder, ref = sd_folder
    folder = _with_scheduler(folder, scheduler, tmp_path)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    want = ref("a red apple on a table", num_inference_steps=4, guidance_scale=guidance, output_type="np",
               generator=torch.Generator().manual_seed(7)).images[0]
    ours = tessera.load(str(folder), dtype="float32")
    got = ours("a red apple on a table", num_inference_steps=4, guidance_scale=guidance, output_type="np",
               generator=torch.Generator().manual_seed(7)).images[0]
    assert got.shape == want.shape == (16, 16, 3)
    assert np.abs(got - want).max() <= 2 / 255, np.abs(got - want).max()
    other = ours("a red apple on a table", num_inference_steps=4, guidance_scale=guidance, output_type="np",
                 generator=torch.Generator().manual_seed(8)).images[0]
    assert np.abs(other - got).max() > 2 / 255  # the comparison can fail: another seed is another image


def test_negative_prompt_and_the_bundled_protocol(sd_folder):
    folder, _ = sd_folder
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    want = ref("a cat", negative_prompt="blurry", num_inference_steps=3, guidance_scale=4.0, output_type="np",
               generator=torch.Generator().manual_seed(1)).images[0]
    ours = tessera.load(str(folder), dtype="float32")
    got = ours("a cat", negative_prompt="blurry", num_inference_steps=3, guidance_scale=4.0, output_type="np",
               generator=torch.Generator().manual_seed(1)).images[0]
    assert np.abs(got - want).max() <= 2 / 255
    assert ours.native_size == 16 and ours.params().method == "ddim"
    image = ours.run("a cat", ours.params(steps=2, seed=3))[0]  # the serving / CLI path
    assert image.size == (16, 16)
    with pytest.raises(Exception, match="tokens"):
        ours("word " * 80, num_inference_steps=2)


def test_a_unet_that_does_not_fit_is_named(sd_folder, tmp_path):
    import shutil

    folder, _ = sd_folder
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    config = json.loads((bad / "unet" / "config.json").read_text())
    config["cross_attention_dim"] = 48
    (bad / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(WrongModelError, match="do not fit"):
        tessera.load(str(bad))


def test_the_whole_system_runs_an_sd_folder(sd_folder, tmp_path):
    """`tessera generate --model DIR` and `tessera serve --model DIR`: safety, enhancement, harm detection,
    SR and the PNG record around the SD pipeline."""
    from click.testing import CliRunner
    from fastapi.testclient import TestClient

    from tessera.cli import main
    from tessera.pipelines.records import read_record
    from tessera.serve.app import ServeConfig, create_app

    folder, _ = sd_folder
    r = CliRunner().invoke(main, ["generate", "a red apple", "--model", str(folder), "--size", "64", "--steps", "2",
                                  "--seed", "5", "--dtype", "float32", "-o", str(tmp_path / "x.png")])
    assert r.exit_code == 0, r.output
    record = read_record(tmp_path / "x.png")
    assert record["model"] == str(folder) and record["seed"] == 5 and record["size"] == 64
    r = CliRunner().invoke(main, ["generate", "naked woman, nsfw porn", "--model", str(folder), "-o",
                                  str(tmp_path / "y.png")])
    assert r.exit_code == 3 and not (tmp_path / "y.png").exists()
    app = create_app(ServeConfig(data_dir=str(tmp_path / "serve"), models={"diffusion": str(folder)},
                                 preload=("diffusion",), dtype="float32"))
    with TestClient(app) as c:
        body = {"prompt": "a blue car", "size": "128x128", "steps": 2, "seed": 11, "paradigm": "diffusion"}
        r = c.post("/v1/images/generations", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["tessera"]["model"] == str(folder)


def test_requests_batched_together_keep_their_own_seeds(sd_folder):
    folder, _ = sd_folder
    pipe = tessera.load(str(folder), dtype="float32")
    both = pipe.generate(["a cat", "a dog"], pipe.params(steps=2, cfg_scale=3.0, noise_seeds=[[3, 1], [4, 1]]))
    alone = [pipe.generate([p], pipe.params(steps=2, cfg_scale=3.0, seed=s)) for p, s in (("a cat", 3), ("a dog", 4))]
    # batch-size-dependent GEMM blocking differs by ~1e-5 on AVX-512; another seed would differ by O(1)
    torch.testing.assert_close(both, torch.cat(alone), atol=1e-4, rtol=1e-4)


def test_clip_skip_takes_an_earlier_layer_through_the_final_norm(sd_folder):
    """diffusers' definition (encode_prompt(clip_skip=k): hidden_states[-(k+1)] -> final_layer_norm); its own
    code path reaches `text_encoder.text_model`, which transformers 5 no longer has, so it is computed here."""
    from tessera.text.clip import CLIPPromptEncoder

    folder, _ = sd_folder
    ours = CLIPPromptEncoder.from_folders(folder / "text_encoder", folder / "tokenizer", clip_skip=1)
    ids = ours.tokenizer(["a red apple"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = ours.model(ids, output_hidden_states=True).hidden_states
        want = ours.model.final_layer_norm(hidden[-2])
    torch.testing.assert_close(ours.encode(["a red apple"]).tokens, want)
    plain = CLIPPromptEncoder.from_folders(folder / "text_encoder", folder / "tokenizer")
    assert (plain.encode(["a red apple"]).tokens - want).abs().max() > 1e-3  # clip skip changes the states


def test_inpainting_equals_diffusers_inpaint_pipeline(tmp_path):
    from PIL import Image

    torch.manual_seed(0)
    tokenizer, text, unet, vae = tiny_components(in_channels=9)
    ref = diffusers.StableDiffusionInpaintPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False, scheduler=diffusers.DDIMScheduler(beta_schedule="scaled_linear",
                                                                         beta_start=0.00085, beta_end=0.012))
    ref.save_pretrained(tmp_path / "inpaint")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (4, 4, 12, 12))
    ours = tessera.load(str(tmp_path / "inpaint"), dtype="float32")
    for guidance in (1.0, 4.0):
        want = ref("a cat", image=image, mask_image=mask, num_inference_steps=3, guidance_scale=guidance,
                   generator=torch.Generator().manual_seed(5), output_type="np", height=16, width=16).images[0]
        got = ours.inpaint(image, mask, "a cat", ours.params(steps=3, cfg_scale=guidance, seed=5))[0]
        diff = np.abs(np.asarray(got, dtype=np.float32) / 255 - want).max()
        assert diff <= 2 / 255, (guidance, diff)
    with pytest.raises(WrongModelError, match="input channels"):
        ours("a cat", num_inference_steps=2)
    # `tessera inpaint --model DIR`: the system's safety stages around the same call
    from click.testing import CliRunner

    from tessera.cli import main

    image.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    r = CliRunner().invoke(main, ["inpaint", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"), "a cat",
                                  "--model", str(tmp_path / "inpaint"), "--steps", "2", "-n", "1", "--dtype", "float32",
                                  "-o", str(tmp_path / "out.png")])
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "out.png").size == (16, 16)


def _family_folder(style: str, root):
    """An SD2-style folder (linear projections, per-level head dims, v-prediction DDIM, guided) or an
    SD-Turbo-style one (TAESD, Euler-ancestral with trailing spacing, no guidance), saved by diffusers."""
    torch.manual_seed(1)
    tokenizer, text, _, vae = tiny_components(in_channels=4)
    unet = _perturb(diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8))
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    if style == "sd2-v":
        scheduler = diffusers.DDIMScheduler(**common, prediction_type="v_prediction", clip_sample=False,
                                            set_alpha_to_one=False, steps_offset=1)
    else:
        scheduler = diffusers.EulerAncestralDiscreteScheduler(**common, timestep_spacing="trailing")
        vae = _perturb(diffusers.AutoencoderTiny(encoder_block_out_channels=(8,) * 4,
                                                 decoder_block_out_channels=(8,) * 4))
    diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                      safety_checker=None, feature_extractor=None,
                                      requires_safety_checker=False).save_pretrained(root / style)
    return root / style


@pytest.mark.parametrize("style,steps,guidance", [("sd2-v", 4, 5.0), ("turbo", 2, 0.0)])
def test_sd2_and_turbo_folders_give_the_diffusers_image_at_a_requested_size(style, steps, guidance, tmp_path):
    folder = _family_folder(style, tmp_path)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ours = tessera.load(str(folder), dtype="float32")
    assert ours.native_size != 64  # the call's height / width decide, as in diffusers
    for size in (64, ours.native_size):
        kw = dict(num_inference_steps=steps, guidance_scale=guidance, output_type="np", height=size, width=size)
        want = ref("a red apple", generator=torch.Generator("cpu").manual_seed(11), **kw).images[0]
        got = ours("a red apple", generator=torch.Generator("cpu").manual_seed(11), **kw).images[0]
        assert got.shape == want.shape == (size, size, 3)
        assert np.abs(got - want).max() <= 2 / 255, (size, np.abs(got - want).max())
    with pytest.raises(Exception, match="multiple of"):
        ours("a red apple", height=66, width=64)


def test_an_lcm_distilled_folder_gives_the_diffusers_image(tmp_path):
    """LatentConsistencyModelPipeline: a U-Net with the guidance-scale embedding (time_cond_proj_dim), the LCM
    scheduler, no classifier-free guidance; its defaults (4 steps, w = 8.5) become the pipeline's."""
    torch.manual_seed(2)
    tokenizer, text, _, vae = tiny_components(in_channels=4)
    unet = _perturb(diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8, time_cond_proj_dim=10))
    scheduler = diffusers.LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ref = diffusers.LatentConsistencyModelPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    ref.save_pretrained(tmp_path / "lcm")
    ours = tessera.load(str(tmp_path / "lcm"), dtype="float32")
    assert ours.params().method == "lcm" and (ours.params().steps, ours.params().cfg_scale) == (4, 8.5)
    images = {}
    for steps, guidance in ((4, 8.5), (2, 3.0), (4, 2.0)):
        kw = dict(num_inference_steps=steps, guidance_scale=guidance, output_type="np")
        want = ref("a red apple", generator=torch.Generator().manual_seed(3), **kw).images[0]
        images[steps, guidance] = ours("a red apple", generator=torch.Generator().manual_seed(3), **kw).images[0]
        assert np.abs(images[steps, guidance] - want).max() <= 2 / 255, (steps, guidance)
    assert np.abs(images[4, 2.0] - images[4, 8.5]).max() > 2 / 255  # w reaches the network
