"""`tessera convert` (diffusers folders, single files, fp16 variants -> Tessera pipeline folders that load
with the same images), `tessera pull` offline (one line, at once), SD pipelines in the compute dtype, and
the CLIP-token-aware prompt enhancement of SD models."""
import json

import diffusers
import numpy as np
import torch
from click.testing import CliRunner
from test_single_file import single_file  # noqa: F401  (module-scoped fixtures)
from test_stable_diffusion import sd_folder  # noqa: F401

import tessera
from tessera.cli import main
from tessera.pipelines.convert import select_files


def _images(pipe, **kw):
    return pipe("a red apple on a table", num_inference_steps=3, guidance_scale=4.0, output_type="np",
                generator=torch.Generator().manual_seed(11), **kw).images[0]


def test_a_converted_folder_gives_the_diffusers_image(sd_folder, tmp_path):  # noqa: F811
    folder, _ = sd_folder
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    want = _images(ref)
    r = CliRunner().invoke(main, ["convert", str(folder), "-o", str(tmp_path / "t32"), "--dtype", "float32"])
    assert r.exit_code == 0, r.output
    index = json.loads((tmp_path / "t32" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and "_diffusers_version" not in index
    assert {p.name for p in (tmp_path / "t32").iterdir()} >= {"generator", "tokenizer", "text_encoder", "scheduler"}
    ours = tessera.load(str(tmp_path / "t32"), dtype="float32")
    assert type(ours).__name__ == "StableDiffusionPipeline" and ours.params().method == "ddim"
    assert np.abs(_images(ours) - want).max() <= 2 / 255
    # the default storage is float16: half the bytes, the same image within fp16 rounding
    r = CliRunner().invoke(main, ["convert", str(folder), "-o", str(tmp_path / "t16")])
    assert r.exit_code == 0, r.output
    size = lambda d: sum(f.stat().st_size for f in (tmp_path / d / "generator").iterdir())  # noqa: E731
    assert size("t16") < 0.6 * size("t32")
    assert np.abs(_images(tessera.load(str(tmp_path / "t16"), dtype="float32")) - want).max() <= 4 / 255
    # a folder that exists is not overwritten; a folder that is not a checkpoint is one line
    r = CliRunner().invoke(main, ["convert", str(folder), "-o", str(tmp_path / "t16")])
    assert r.exit_code != 0 and "not empty" in r.output and "Traceback" not in r.output
    (tmp_path / "junk").mkdir()
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "junk"), "-o", str(tmp_path / "t3")])
    assert r.exit_code != 0 and "Traceback" not in r.output and not (tmp_path / "t3").exists()


def test_a_single_file_converts_with_its_tokenizer(single_file, tmp_path):  # noqa: F811
    root, unet, _, _ = single_file
    r = CliRunner().invoke(main, ["convert", str(root / "model.safetensors"), "-o", str(tmp_path / "a")])
    assert r.exit_code != 0 and "--tokenizer" in r.output and not (tmp_path / "a").exists()
    r = CliRunner().invoke(main, ["convert", str(root / "model.safetensors"), "-o", str(tmp_path / "a"), "--dtype",
                                  "float32", "--tokenizer", str(root / "tokenizer")])
    assert r.exit_code == 0, r.output
    pipe = tessera.load(str(tmp_path / "a"), dtype="float32")
    x, ctx, t = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 64), torch.tensor([321])
    with torch.no_grad():
        torch.testing.assert_close(pipe.generator(x, t, ctx), unet(x, t, encoder_hidden_states=ctx).sample,
                                   atol=1e-4, rtol=1e-4)


def test_a_folder_of_fp16_variant_weights_loads_as_it_is(sd_folder, tmp_path):  # noqa: F811
    folder, _ = sd_folder
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ref.to(torch.float16).save_pretrained(tmp_path / "v", variant="fp16")
    assert not (tmp_path / "v" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    got = _images(tessera.load(str(tmp_path / "v"), dtype="float32"))
    assert np.abs(got - _images(ref.to(torch.float32))).max() <= 4 / 255


def test_sd_weights_live_in_the_compute_dtype(sd_folder):  # noqa: F811
    folder, _ = sd_folder
    pipe = tessera.load(str(folder), dtype="bfloat16")
    dtypes = {next(m.parameters()).dtype for m in (pipe.generator, pipe.tokenizer, pipe.text_encoder.model)}
    assert dtypes == {torch.bfloat16}
    with pipe.unpacked():
        assert pipe.generator.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    bf16 = _images(pipe)
    fp32 = _images(tessera.load(str(folder), dtype="float32"))
    assert 0 < np.abs(bf16 - fp32).max() < 0.15  # bf16 rounding, not another image
    pipe.to(dtype="float32")
    assert next(pipe.generator.parameters()).dtype == torch.float32
    assert np.abs(_images(pipe) - fp32).max() < 0.02


def test_pull_fails_at_once_in_one_line_without_a_network(tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = CliRunner().invoke(main, ["pull", "stabilityai/sd-turbo", "-o", str(tmp_path / "p")])
    assert r.exit_code != 0 and "HF_HUB_OFFLINE" in r.output and len(r.output.strip().splitlines()) == 1
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "https://hub.invalid")
    t0 = time.perf_counter()
    r = CliRunner().invoke(main, ["pull", "stabilityai/sd-turbo", "-o", str(tmp_path / "p")])
    assert r.exit_code != 0 and "cannot reach https://hub.invalid" in r.output and "Traceback" not in r.output
    assert time.perf_counter() - t0 < 10 and not (tmp_path / "p").exists()
    r = CliRunner().invoke(main, ["pull", "not-a-repo-id", "-o", str(tmp_path / "p")])
    assert r.exit_code != 0 and "OWNER/NAME" in r.output


def test_a_pull_takes_configs_and_safetensors_only():
    files = ["model_index.json", "sd_turbo.safetensors", "v2-1.ckpt", "README.md", "scheduler/scheduler_config.json",
             "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
             "tokenizer/vocab.json", "tokenizer/merges.txt", "unet/config.json", "unet/diffusion_pytorch_model.bin",
             "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
             "vae/diffusion_pytorch_model.safetensors"]
    plain = select_files(files)
    assert "unet/diffusion_pytorch_model.safetensors" in plain and "text_encoder/model.safetensors" in plain
    assert not any(f.endswith((".bin", ".ckpt", ".md")) or ".fp16." in f for f in plain)
    assert "sd_turbo.safetensors" not in plain  # the root single file duplicates the folders
    fp16 = select_files(files, "fp16")
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in fp16 and "unet/diffusion_pytorch_model.safetensors" not in fp16
    assert "vae/diffusion_pytorch_model.safetensors" in fp16  # no fp16 VAE: the plain one
    assert select_files(["model.safetensors", "config.json"]) == ["config.json", "model.safetensors"]


def test_sd_prompts_are_enhanced_in_clips_idiom_within_its_budget(sd_folder):  # noqa: F811
    from tessera.pipelines.stable_diffusion import clip_budget
    from tessera.pipelines.text2image import Request, TextToImage
    from tessera.prompts import enhance

    folder, _ = sd_folder
    t2i = TextToImage({"diffusion": str(folder)})
    revised, _, changes = t2i.rewrite(Request("a lake between mountains at sunset"), seed=1)
    assert "emoji" not in revised and revised.startswith("a lake between mountains at sunset, ")
    assert "highly detailed" in revised and "soft natural light" not in revised  # "sunset" already lights it
    assert changes and all("added" in c for c in changes)
    budget = clip_budget(str(folder))
    # this tokenizer spends one token per character: a prompt close to 77 tokens takes only what fits
    long = "x" * 60
    e = enhance(long, budget)
    assert budget.count(e.prompt) <= budget.max_tokens and e.prompt.startswith(long)
    assert any("left out" in c for c in e.changes)
    assert enhance("a cartoon drawing of a dog", budget).prompt == "a cartoon drawing of a dog, highly detailed"
    bundled = TextToImage().rewrite(Request("a red apple"), seed=1)[0]
    assert bundled != "a red apple, highly detailed"  # the bundled models keep their captions' vocabulary
