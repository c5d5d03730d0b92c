import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import photo_like
from tessera.checkpoint import export_model
from tessera.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_reconstruct_crops_to_factor_and_reports(tmp_path, tiny_model):
    photo_like(5, (70, 45)).save(tmp_path / "in.png")
    r = run("reconstruct", tmp_path / "in.png", "-o", tmp_path / "out.png", "--model", tiny_model)
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "out.png").size == (68, 44)  # cropped to a multiple of factor 4
    assert "PSNR" in r.output and "SSIM" in r.output and "187 tokens" in r.output


def test_reconstruct_bad_inputs_are_clear_errors(tmp_path, tiny_model):
    (tmp_path / "fake.png").write_text("not an image")
    r = run("reconstruct", tmp_path / "fake.png", "-o", tmp_path / "o.png", "--model", tiny_model)
    assert r.exit_code != 0 and "not_an_image" in r.output
    photo_like(5, (20, 20)).save(tmp_path / "ok.png")
    r = run("reconstruct", tmp_path / "ok.png", "-o", tmp_path / "o.png", "--model", tmp_path / "nomodel")
    assert r.exit_code != 0 and "is neither a model / pipeline folder nor a bundled model" in r.output


def test_tokenize_writes_and_resumes(tiny_dataset, tiny_model):
    r = run("tokenize", "--data", tiny_dataset, "--model", tiny_model, "--batch-size", "5")
    assert r.exit_code == 0, r.output
    out = tiny_dataset / "tokens" / r.stdout.strip().split("/")[-1]
    arr = np.load(out / "tokens.npy")
    index = json.loads((out / "index.json").read_text())
    assert arr.shape == (len(index["keys"]), 8, 8) and arr.max() < 64
    from tessera import load
    from tessera.data.dataset import ShardImages

    ds = ShardImages(tiny_dataset, split=None)
    m = load(tiny_model)
    i = index["keys"].index(ds.keys[3])
    assert np.array_equal(arr[i], m.encode(ds[3][0][None])[0].numpy())
    mtime = (out / "tokens.npy").stat().st_mtime_ns
    r = run("tokenize", "--data", tiny_dataset, "--model", tiny_model)
    assert r.exit_code == 0 and (out / "tokens.npy").stat().st_mtime_ns == mtime  # nothing redone


def test_data_prepare_cli_and_eval(tmp_path, tiny_model):
    for i in range(6):
        photo_like(50 + i, (80, 80)).save(tmp_path / f"{i}.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    r = run("data", "prepare", tmp_path, "--out", tmp_path / "out", "--size", "32", "--val-fraction", "0.5",
            "--workers", "1")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["kept"] == 6 and rep["rejected"] == 1
    r = run("eval", "reconstruction", "--data", tmp_path / "out", "--model", tiny_model, "--split", "all")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["images"] == 6 and 0 < res["psnr"] < 60 and 0 < res["codebook_usage"] <= 1
    assert "rfd" not in res
    r = run("eval", "reconstruction", "--data", tmp_path / "out", "--model", tiny_model, "--split", "all", "--rfd")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["rfd"] > 0 and "NOT Inception" in res["rfd_feature_space"]  # an untrained tokenizer is far off
    r = run("data", "prepare", tmp_path / "missing", "--out", tmp_path / "o2")
    assert r.exit_code != 0 and "no such file" in r.output


def test_train_cli_refuses_to_overwrite_a_run(tiny_dataset, tmp_path):
    args = ["train", "tokenizer", "--data", tiny_dataset, "--out", tmp_path / "run", "--preset", "vq-tiny",
            "--max-steps", "2", "--set", "task.crop=16", "--set", "task.loss.perceptual_backbone=\"none\"",
            "--set", "train.batch_size=2", "--set", "train.val_every=0", "--set", "task.val_images=2"]
    r = run(*args)
    assert r.exit_code == 0, r.output
    r = run(*args)
    assert r.exit_code != 0 and "--resume" in r.output
    r = run(*args[:-8], "--max-steps", "3", "--resume")
    assert r.exit_code == 0, r.output
    r = run("export", tmp_path / "run", "-o", tmp_path / "model")
    assert r.exit_code == 0
    meta = json.loads((tmp_path / "model" / "meta.json").read_text())
    assert meta["trained_steps"] == 3 and meta["kind"] == "vq"
    r = run("train", "tokenizer", "--data", tiny_dataset, "--out", tmp_path / "r2", "--set", "train.nope=1")
    assert r.exit_code != 0 and "nope" in r.output


def test_train_ar_end_to_end(tiny_dataset, tiny_model, tmp_path):
    r = run("train", "ar", "--data", tiny_dataset, "--out", tmp_path / "ar", "--preset", "ar-tiny",
            "--tokenizer", tiny_model, "--text-encoder", "tiny", "--max-steps", "4",
            "--set", "train.batch_size=4", "--set", "train.val_every=4", "--set", "train.log_every=2")
    assert r.exit_code == 0, r.output
    spec = json.loads((tmp_path / "ar" / "run.json").read_text())
    assert spec["model"]["vocab_size"] == 64 and spec["model"]["grid"] == [8, 8] and spec["model"]["cond_dim"] == 16
    log = [json.loads(line) for line in (tmp_path / "ar" / "log.jsonl").read_text().splitlines()]
    val = [row for row in log if "val/margin" in row]
    assert val and val[-1]["val/nll_true"] > 0
    r = run("export", tmp_path / "ar", "-o", tmp_path / "ar-model")
    assert r.exit_code == 0
    from tessera import load

    m = load(tmp_path / "ar-model")
    assert m.config.vocab_size == 64
    r = run("eval", "caption-margin", "--data", tiny_dataset, "--model", tmp_path / "ar-model")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["images"] >= 2 and out["tokens"] == spec["task"]["tokens"]
    assert out["nll_shuffled"] == pytest.approx(out["nll_true"] + out["margin"]) and out["margin_std"] >= 0
    r = run("eval", "caption-margin", "--data", tiny_dataset, "--model", tmp_path / "ar-model", "--cache", "nope")
    assert r.exit_code != 0 and "no token cache" in r.output


def test_sample_ar_writes_grid_with_parameters(tiny_dataset, tiny_model, tmp_path):
    from tessera.generators.ar import ARConfig, ARTransformer

    torch.manual_seed(0)
    gen = ARTransformer(ARConfig(vocab_size=64, grid=(8, 8), dim=32, depth=1, heads=2, cond_dim=16))
    export_model(gen, tmp_path / "gen")
    args = ["sample", "ar", "a red fox", "--model", tmp_path / "gen", "--tokenizer", tiny_model,
            "--text-encoder", "tiny", "-n", "2", "--seed", "3", "--top-k", "10"]
    r = run(*args, "-o", tmp_path / "a.png")
    assert r.exit_code == 0, r.output
    im = Image.open(tmp_path / "a.png")
    assert im.size == (64, 32)
    assert "a red fox" in im.text["parameters"] and json.loads(im.text["tessera"])["seed"] == 3
    run(*args, "-o", tmp_path / "b.png")
    assert np.array_equal(np.asarray(im), np.asarray(Image.open(tmp_path / "b.png")))  # same seed, same image
    r = run("sample", "ar", " ".join(["word"] * 130), "--model", tmp_path / "gen", "--tokenizer", tiny_model,
            "--text-encoder", "tiny", "-o", tmp_path / "c.png")
    assert r.exit_code != 0 and "limit is 128" in r.output


def test_train_and_sample_diffusion_end_to_end(tiny_dataset, tiny_model, tmp_path):
    r = run("train", "diffusion", "--data", tiny_dataset, "--out", tmp_path / "d", "--preset", "unet-tiny",
            "--tokenizer", tiny_model, "--text-encoder", "tiny", "--max-steps", "4",
            "--set", "train.batch_size=4", "--set", "train.val_every=4", "--set", "task.val_timesteps=[100,900]")
    assert r.exit_code == 0, r.output
    spec = json.loads((tmp_path / "d" / "run.json").read_text())
    assert spec["model"]["in_channels"] == 4 and spec["model"]["sample_size"] == 8
    assert spec["task"]["space"] == "latent" and spec["task"]["latent_scale"] > 1.0  # unit-sphere latents
    log = [json.loads(line) for line in (tmp_path / "d" / "log.jsonl").read_text().splitlines()]
    assert [row for row in log if "val/margin" in row]
    assert run("export", tmp_path / "d", "-o", tmp_path / "dm").exit_code == 0
    r = run("eval", "caption-margin", "--data", tiny_dataset, "--model", tmp_path / "dm")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["kind"] == "unet" and out["images"] >= 2 and out["loss_true"] > 0
    args = ["sample", "diffusion", "a red fox", "--model", tmp_path / "dm", "--text-encoder", "tiny", "-n", "2",
            "--steps", "3", "--seed", "4", "--negative-prompt", "blurry"]
    r = run(*args, "-o", tmp_path / "a.png")
    assert r.exit_code == 0, r.output
    im = Image.open(tmp_path / "a.png")
    assert im.size == (64, 32) and json.loads(im.text["tessera"])["negative_prompt"] == "blurry"
    run(*args, "-o", tmp_path / "b.png")
    assert np.array_equal(np.asarray(im), np.asarray(Image.open(tmp_path / "b.png")))


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_train_diffusion_in_pixel_space(arch, tiny_dataset, tmp_path):
    r = run("train", "diffusion", "--arch", arch, "--data", tiny_dataset, "--out", tmp_path / "p",
            "--preset", f"{arch}-tiny",
            "--space", "pixel", "--text-encoder", "none", "--max-steps", "2", "--set", "train.batch_size=4")
    assert r.exit_code == 0, r.output
    assert run("export", tmp_path / "p", "-o", tmp_path / "pm").exit_code == 0
    r = run("sample", "diffusion", "--model", tmp_path / "pm", "-n", "1", "--steps", "2", "-o", tmp_path / "p.png")
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "p.png").size == (8, 8)


def test_masked_train_sample_and_inpaint(tiny_dataset, tiny_model, tmp_path):
    r = run("train", "masked", "--data", tiny_dataset, "--out", tmp_path / "m", "--preset", "masked-tiny",
            "--tokenizer", tiny_model, "--text-encoder", "tiny", "--max-steps", "3",
            "--set", "train.batch_size=4", "--set", "train.val_every=3")
    assert r.exit_code == 0, r.output
    log = [json.loads(line) for line in (tmp_path / "m" / "log.jsonl").read_text().splitlines()]
    assert [row for row in log if "val/margin" in row]
    assert run("export", tmp_path / "m", "-o", tmp_path / "mm").exit_code == 0
    r = run("eval", "caption-margin", "--data", tiny_dataset, "--model", tmp_path / "mm")
    assert r.exit_code == 0 and json.loads(r.output)["kind"] == "masked"
    common = ["--model", tmp_path / "mm", "--tokenizer", tiny_model, "--text-encoder", "tiny", "--steps", "4"]
    r = run("sample", "masked", "a red fox", *common, "-n", "2", "-o", tmp_path / "s.png")
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "s.png").size == (64, 32)
    src = photo_like(7, (32, 32))
    src.save(tmp_path / "in.png")
    hole = np.zeros((32, 32), np.uint8)
    hole[8:20, 4:28] = 255
    Image.fromarray(hole).save(tmp_path / "mask.png")
    r = run("inpaint", tmp_path / "in.png", "--mask", tmp_path / "mask.png", "a red fox", *common, "-n", "1",
            "-o", tmp_path / "out.png")
    assert r.exit_code == 0, r.output
    out, inp = np.asarray(Image.open(tmp_path / "out.png")), np.asarray(src)
    assert np.array_equal(out[hole == 0], inp[hole == 0])  # outside the mask: the input, exactly
    assert not np.array_equal(out[hole > 0], inp[hole > 0])
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "empty.png")
    r = run("inpaint", tmp_path / "in.png", "--mask", tmp_path / "empty.png", *common, "-o", tmp_path / "x.png")
    assert r.exit_code != 0 and "mask is empty" in r.output
