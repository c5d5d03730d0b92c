"""Evaluation: the sample-files contract (all generator kinds), CLIPScore and retrieval, the contrastive
model, latency / cost, prompt files and the prompt benchmark CLI."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import photo_like, tiny_hf_clip
from tessera.checkpoint import export_model
from tessera.cli import main
from tessera.data.dataset import to_tensor
from tessera.registry import build


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_dataset):
    """Exported tiny generators of every kind over one tiny tokenizer, + a tiny contrastive model."""
    from tessera.generators.ar import ARConfig, ARTransformer
    from tessera.generators.masked import MaskedConfig, MaskedTransformer
    from tessera.train.runs import export_run, prepare_diffusion_inputs, run_training

    root = tmp_path_factory.mktemp("eval_models")
    torch.manual_seed(0)
    export_model(build("vq-tiny"), root / "vq")
    export_model(ARTransformer(ARConfig(vocab_size=64, grid=(8, 8), dim=32, depth=1, heads=2, cond_dim=16)), root / "ar")
    export_model(MaskedTransformer(MaskedConfig(vocab_size=64, grid=(8, 8), dim=32, depth=1, heads=2, cond_dim=16)), root / "masked")
    model_updates, task_updates = prepare_diffusion_inputs(str(tiny_dataset), "", "tiny", "pixel")
    run_training("diffusion", str(tiny_dataset), str(root / "d-run"), "dit-tiny", 1, False, ["train.batch_size=4"],
                 {**model_updates, "sample_size": 32, "patch_size": 4}, task_updates)
    export_run(str(root / "d-run"), str(root / "dit"))
    r = run("train", "contrastive", "--data", tiny_dataset, "--out", root / "c-run", "--preset", "clip-tiny",
            "--text-encoder", "tiny", "--max-steps", "3", "--set", "train.batch_size=8", "--set", "train.val_every=3")
    assert r.exit_code == 0, r.output
    assert run("export", root / "c-run", "-o", root / "clip").exit_code == 0
    return root


PROMPTS = ["a red fox", "a blue car", "green trees", "a small house", "the sea"]
SETTINGS = {"ar": {"top_k": 10, "temperature": 0.9}, "masked": {"steps": 3}, "dit": {"steps": 3, "cfg_scale": 2.0}}


def _write(models, kind, out, prompts=PROMPTS, **extra):
    from tessera.eval.samples import Prompt, generate_samples

    return generate_samples(str(models / kind), [Prompt(p, "cat" + str(i % 2)) for i, p in enumerate(prompts)], out,
                            {**SETTINGS[kind], **extra}, batch_size=2, tokenizer=str(models / "vq"),
                            text_encoder="tiny", progress=False)


@pytest.mark.parametrize("kind", ["ar", "masked", "dit"])
def test_sample_files_contract_reproducible_and_resumable(models, kind, tmp_path):
    from tessera.eval.samples import read_samples

    rec = _write(models, kind, tmp_path / "a")
    record, files = read_samples(tmp_path / "a")
    assert record == {**json.loads(json.dumps(rec)), "withheld": []} and len(files) == 5  # none withheld
    assert record["kind"] == ("diffusion" if kind == "dit" else kind) and record["batch_size"] == 2
    meta = json.loads((models / kind / "meta.json").read_text())
    assert record["models"]["generator"]["sha256"] == meta["sha256"] and len(meta["sha256"]) == 64
    assert [r["seed"] for r in record["images"]] == [0, 0, 1, 1, 2]  # batch b: seed + b
    assert all(record["settings"][k] == v for k, v in SETTINGS[kind].items()) and record["settings"]["sampler"]
    assert [b["images"] for b in record["timing"]["batches"]] == [2, 2, 1]
    im = Image.open(files[3])
    assert json.loads(im.text["tessera"])["prompt"] == PROMPTS[3] and im.size == (32, 32)
    # interrupted after two batches, then resumed: the same images as the uninterrupted run
    _write(models, kind, tmp_path / "b", PROMPTS[:4])
    _write(models, kind, tmp_path / "b")
    for f in files:
        assert np.array_equal(np.asarray(Image.open(f)), np.asarray(Image.open(tmp_path / "b" / f.name))), f.name
    # a folder of other settings or prompts is refused and left as it was
    before = (tmp_path / "a" / "samples.json").read_bytes()
    with pytest.raises(ValueError, match="other settings"):
        _write(models, kind, tmp_path / "a", seed=7)
    with pytest.raises(ValueError, match="another prompt list"):
        _write(models, kind, tmp_path / "a", prompts=["x"] * 6)
    assert (tmp_path / "a" / "samples.json").read_bytes() == before


def test_unknown_sampling_setting_is_named(models, tmp_path):
    with pytest.raises(ValueError, match="steps_typo"):
        _write(models, "dit", tmp_path / "x", steps_typo=3)
    with pytest.raises(ValueError, match="not a generator"):
        from tessera.pipelines.folder import load_pipeline

        load_pipeline(str(models / "vq"))


def test_timing_summary_and_cost():
    from tessera.eval.samples import timing_summary

    record = {"batch_size": 4, "timing": {"load_seconds": 1.5, "peak_rss_mb": 100.0, "batches": [
        {"batch": 0, "images": 4, "seconds": 40.0},  # warm-up, left out
        {"batch": 1, "images": 4, "seconds": 2.0}, {"batch": 2, "images": 4, "seconds": 4.0},
        {"batch": 3, "images": 2, "seconds": 3.0}]}}
    t = timing_summary(record, price_per_hour=3.6)
    assert t["seconds_per_image"] == pytest.approx(1.0)  # median of 0.5, 1.0, 1.5
    assert t["images_per_second"] == pytest.approx(10 / 9, abs=1e-3) and t["timed_batches"] == 3
    assert t["cost_per_image"] == pytest.approx(3.6 / 3600) and t["cost_per_1000_images"] == pytest.approx(1.0)


def test_read_prompts_tsv_and_text(tmp_path):
    from tessera.eval.prompts import read_prompts

    tsv = tmp_path / "p.tsv"
    tsv.write_text("Prompt\tCategory\tChallenge\tNote\n"
                   "bond\tAbstract\tBasic\t\nelement\tAbstract\tBasic\t\na cat\tAnimals\tBasic\t\n"
                   "a dog\tAnimals\tBasic\t\n\tAnimals\tBasic\t\nthe moon\tWorld Knowledge\tBasic\t\n")
    ps = read_prompts(tsv)
    assert [p.prompt for p in ps] == ["bond", "element", "a cat", "a dog", "the moon"]  # empty prompt dropped
    assert [p.prompt for p in read_prompts(tsv, per_category=1)] == ["bond", "a cat", "the moon"]
    assert [p.category for p in read_prompts(tsv, categories=["Animals"])] == ["Animals", "Animals"]
    with pytest.raises(ValueError, match="Animal"):
        read_prompts(tsv, categories=["Animal"])
    txt = tmp_path / "p.txt"
    txt.write_text("one\n\ntwo\n")
    assert [p.prompt for p in read_prompts(txt)] == ["one", "two"]
    (tmp_path / "bad.tsv").write_text("text\tCategory\nx\ty\n")
    with pytest.raises(ValueError, match="Prompt"):
        read_prompts(tmp_path / "bad.tsv")
    drawbench = tmp_path / "DrawBench.csv"  # DrawBench's CSV layout (a user's copy: its licence is unstated)
    drawbench.write_text('Prompts,Category\n"A red colored car.",Colors\n"A black apple, and a green backpack.",Colors\n'
                         '"Two cats and one dog sitting on the grass.",Counting\n')
    ps = read_prompts(drawbench)
    assert [p.category for p in ps] == ["Colors", "Colors", "Counting"]
    assert ps[1].prompt == "A black apple, and a green backpack."  # the quoted comma stays in the prompt
    assert [p.prompt for p in read_prompts(drawbench, per_category=1)] == ["A red colored car.",
                                                                          "Two cats and one dog sitting on the grass."]


def test_retrieval_metrics_reference_values():
    from tessera.eval.clipscore import retrieval_metrics

    e = torch.eye(4)
    m = retrieval_metrics(e, e, ["a", "b", "c", "d"])
    assert m["i2t_top1"] == m["t2i_top1"] == 1.0 and m["cos_true"] == 1.0 and m["cos_mismatched"] == 0.0
    # texts rotated by one: image i is closest to caption i+1 -> top-1 0, top-5 (all 4) 1
    m = retrieval_metrics(e, e.roll(1, 0), ["a", "b", "c", "d"])
    assert m["i2t_top1"] == 0.0 and m["i2t_top5"] == 1.0 and m["frac_true_higher"] == 0.0
    # identical captions are interchangeable: retrieving the twin counts as a hit
    m = retrieval_metrics(e, e.roll(1, 0), ["a", "a", "a", "a"])
    assert m["i2t_top1"] == 1.0 and m["t2i_top1"] == 1.0


def test_contrastive_model_scores_and_round_trip(models):
    from tessera.eval.clipscore import clip_scores, load_image_text_model

    log = [json.loads(line) for line in (models / "c-run" / "log.jsonl").read_text().splitlines()]
    val = [row for row in log if "val/i2t_top1" in row]
    assert val and 0 <= val[-1]["val/i2t_top1"] <= 1 and val[-1]["val/pairs"] >= 2
    scorer = load_image_text_model(str(models / "clip"))
    ims = [photo_like(i, (40, 30)) for i in range(3)]
    s = clip_scores(scorer, ims, ["a fox", "a car", "a tree"])
    assert s.shape == (3,) and torch.isfinite(s).all() and (s >= 0).all() and (s <= 100).all()
    direct = 100 * (scorer.image_features(torch.stack([to_tensor(im) for im in ims]))
                    * scorer.text_features(["a fox", "a car", "a tree"])).sum(-1).clamp_min(0)
    assert torch.allclose(s, direct, atol=1e-5)
    with pytest.raises(ValueError, match="not an image-text model"):
        load_image_text_model(str(models / "vq"))


def test_hf_clip_folder_matches_transformers(tmp_path):
    """Our HF CLIP wrapper gives transformers' own features (its image processor, its tokenizer)."""
    from tessera.eval.clipscore import HFClip, load_image_text_model

    _, model, tok, proc = tiny_hf_clip(tmp_path)
    ours = load_image_text_model(str(tmp_path))
    assert isinstance(ours, HFClip)
    ims = [photo_like(i, (32, 32)) for i in range(2)]
    x = torch.stack([to_tensor(im) for im in ims])
    with torch.no_grad():
        ref_i = model.get_image_features(**proc(images=ims, return_tensors="pt"))
        batch = tok(["a red fox", "two blue cars"], padding=True, return_tensors="pt")
        ref_t = model.get_text_features(**batch)
    ref_i = ref_i if isinstance(ref_i, torch.Tensor) else ref_i.pooler_output
    ref_t = ref_t if isinstance(ref_t, torch.Tensor) else ref_t.pooler_output
    assert torch.allclose(ours.image_features(x), torch.nn.functional.normalize(ref_i, dim=-1), atol=1e-5)
    assert torch.allclose(ours.text_features(["a red fox", "two blue cars"]),
                          torch.nn.functional.normalize(ref_t, dim=-1), atol=1e-5)
    # a larger image goes through resize + centre crop: close to the processor's PIL resize
    big = photo_like(9, (64, 48))
    xb = to_tensor(big)[None]
    with torch.no_grad():
        rb = model.get_image_features(**proc(images=[big], return_tensors="pt"))
    rb = rb if isinstance(rb, torch.Tensor) else rb.pooler_output
    cos = (ours.image_features(xb) * torch.nn.functional.normalize(rb, dim=-1)).sum()
    assert cos > 0.98


def test_caption_match_scorer_in_prepare(models, tmp_path):
    from tessera.data.filters import FilterConfig
    from tessera.data.prepare import PrepareConfig, prepare

    def cfg(threshold):
        return PrepareConfig(size=32, workers=1, scorers=(spec + threshold,),
                             filters=FilterConfig(min_size=32, phash_distance=2))

    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        photo_like(200 + i, (64, 64)).save(src / f"{i}.png")
        (src / f"{i}.txt").write_text(f"picture {i}")
    spec = f"caption_match?model={models / 'clip'}&min_score="
    keep = prepare([src], tmp_path / "keep", cfg("0"), progress=False)
    assert keep["kept"] == 4
    # CLIPScore is at most 100: a threshold above it rejects every captioned image, by name
    drop = prepare([src], tmp_path / "drop", cfg("101"), progress=False)
    assert drop["kept"] == 0 and drop["rejected_by_reason"] == {"scorer:caption_match": 4}
    with pytest.raises(ValueError, match="key=value"):
        prepare([src], tmp_path / "bad", PrepareConfig(size=32, workers=1, scorers=(spec[:-11] + "&oops",)),
                progress=False)


def test_eval_cli_sample_clipscore_latency_prompts(models, tmp_path):
    tsv = tmp_path / "p.tsv"
    tsv.write_text("Prompt\tCategory\na red fox\tAnimals\na cat\tAnimals\na bus\tVehicles\na boat\tVehicles\n")
    common = ["--model", models / "masked", "--tokenizer", models / "vq", "--text-encoder", "tiny",
              "--batch-size", "2", "--set", "steps=2"]
    r = run("eval", "sample", *common, "--prompts", tsv, "-o", tmp_path / "s")
    assert r.exit_code == 0, r.output
    r = run("eval", "clipscore", tmp_path / "s", "--clip", models / "clip")
    assert r.exit_code == 0, r.output
    first, out = r.output, json.loads(r.output)
    assert set(out["per_category"]) == {"Animals", "Vehicles", "ALL"} and out["per_category"]["ALL"]["images"] == 4
    assert "not OpenAI CLIP" in out["feature_space"]
    r = run("eval", "latency", tmp_path / "s", "--price-per-hour", "2.0")
    assert r.exit_code == 0, r.output
    lat = json.loads(r.output)
    assert lat["seconds_per_image"] > 0 and lat["cost_per_image"] == pytest.approx(2.0 * lat["seconds_per_image"] / 3600)
    r = run("eval", "prompts", tsv, *common, "--per-category", "1", "--clip", models / "clip", "-o", tmp_path / "pp")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "pp" / "report.json").read_text())
    assert rep["per_category"]["ALL"]["images"] == 2 and "| Animals | 1 |" in (tmp_path / "pp" / "report.md").read_text()
    # the metric read from the same files is the same to the last digit
    r2 = run("eval", "clipscore", tmp_path / "s", "--clip", models / "clip")
    assert r2.exit_code == 0 and r2.output == first
    r = run("eval", "sample", *common, "--set", "nope=1", "--prompts", tsv, "-o", tmp_path / "t")
    assert r.exit_code != 0 and "nope" in r.output
    r = run("eval", "sample", *common, "-o", tmp_path / "t")
    assert r.exit_code != 0 and "exactly one of --prompts" in r.output


def test_wilson_interval_reference_values():
    from tessera.eval.human import wilson_interval

    lo, hi = wilson_interval(7, 10)  # textbook value for 7/10: (0.3968, 0.8922)
    assert lo == pytest.approx(0.3968, abs=1e-4) and hi == pytest.approx(0.8922, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(1 - hi)


def test_human_eval_app_records_votes_and_reports(tmp_path):
    from fastapi.testclient import TestClient

    from tessera.eval.human import make_app

    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        for i in range(3):
            photo_like(i + (0 if d == "a" else 50), (16, 16)).save(tmp_path / d / f"{i}.png")
    photo_like(99, (16, 16)).save(tmp_path / "a" / "only_in_a.png")
    client = TestClient(make_app(tmp_path / "a", tmp_path / "b", tmp_path / "votes.sqlite", seed=0))
    page = client.get("/")
    assert page.status_code == 200 and "/image/a/" in page.text and "/image/b/" in page.text
    assert client.get("/image/a/2").content == (tmp_path / "a" / "2.png").read_bytes()
    assert client.get("/image/c/0").status_code == 404 and client.get("/image/a/3").status_code == 404
    assert client.get("/results").json()["votes"] == 0
    # A picked 6 times (on either side), B twice, one tie
    for pair, a_side, choice in [(0, "left", "left"), (1, "right", "right"), (2, "left", "left"),
                                 (0, "right", "right"), (1, "left", "left"), (2, "right", "right"),
                                 (0, "left", "right"), (1, "right", "left"), (2, "left", "tie")]:
        assert client.post("/vote", json={"pair": pair, "a_side": a_side, "choice": choice}).status_code == 200
    r = client.get("/results").json()
    assert (r["a_wins"], r["b_wins"], r["ties"], r["votes"], r["pairs"]) == (6, 2, 1, 9, 3)
    assert r["a_win_rate"] == pytest.approx(6.5 / 9) and r["ci95"][0] < 6.5 / 9 < r["ci95"][1]
    assert r["a_wins_when_left"] == 3 and r["a_wins_when_right"] == 3
    bad = client.post("/vote", json={"pair": 7, "a_side": "left", "choice": "left"})
    assert bad.status_code == 422 and "pair=7" in bad.text
    assert client.post("/vote", json={"pair": 0, "a_side": "up", "choice": "left"}).status_code == 422
    # votes survive a restart (a new app over the same database)
    again = TestClient(make_app(tmp_path / "a", tmp_path / "b", tmp_path / "votes.sqlite"))
    assert again.get("/results").json()["votes"] == 9
    r = run("eval", "human", "--a", tmp_path / "a", "--b", tmp_path / "b", "--db", tmp_path / "votes.sqlite", "--report")
    assert r.exit_code == 0 and json.loads(r.output)["a_wins"] == 6


def test_human_eval_pairs_samples_by_prompt(models, tmp_path):
    from tessera.eval.human import pair_folders

    _write(models, "masked", tmp_path / "m")
    _write(models, "ar", tmp_path / "a")
    pairs = pair_folders(tmp_path / "m", tmp_path / "a")
    assert [p for _, _, p in pairs] == PROMPTS
    _write(models, "ar", tmp_path / "short", PROMPTS[:2])
    with pytest.raises(ValueError, match="different prompt lists"):
        pair_folders(tmp_path / "m", tmp_path / "short")


def test_bench_paradigms_end_to_end(models, tiny_dataset, tmp_path):
    from tessera.eval.paradigms import parse_config

    assert parse_config("masked=m:steps=8,method=ddim").settings == {"steps": 8, "method": "ddim"}
    with pytest.raises(ValueError, match="PARADIGM=MODEL"):
        parse_config("models/x")
    r = run("bench", "paradigms", "--data", tiny_dataset, "--limit", "4", "--batch-size", "2", "--clip", models / "clip",
            "--text-encoder", "tiny", "--config", f"diffusion (DiT)={models / 'dit'}:steps=2",
            "--config", f"diffusion (DiT)={models / 'dit'}:steps=3", "-o", tmp_path / "b")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    rows = {row["config"]: row for row in res["rows"]}
    assert {"dit-steps2", "dit-steps3"} <= set(rows) and res["meta"]["images"] == 4
    for row in rows.values():
        assert all(np.isfinite(row[k]) for k in ("fd", "kid") if k in row)
    assert rows["dit-steps2"]["seconds_per_image"] > 0 and 0 <= rows["dit-steps3"]["r_precision"] <= 1
    assert (tmp_path / "b" / "paradigms.png").stat().st_size > 1000 and "dit-steps3" in r.output


def test_prompts_longer_than_the_generator_takes_are_skipped_and_listed(models, tmp_path):
    from tessera.eval.samples import Prompt, generate_samples
    from tessera.generators.masked import MaskedConfig, MaskedTransformer

    torch.manual_seed(0)
    export_model(MaskedTransformer(MaskedConfig(vocab_size=64, grid=(8, 8), dim=32, depth=1, heads=2, cond_dim=16,
                                                max_text_tokens=4)), tmp_path / "m")
    prompts = [Prompt("a red fox"), Prompt("one two three four five six", "long"), Prompt("a cat")]
    rec = generate_samples(str(tmp_path / "m"), prompts, tmp_path / "s", {"steps": 2}, batch_size=2,
                           tokenizer=str(models / "vq"), text_encoder="tiny", progress=False)
    assert [r["prompt"] for r in rec["images"]] == ["a red fox", "a cat"]
    assert rec["skipped"] == [{"prompt": "one two three four five six", "category": "long",
                               "reason": "6 prompt tokens; the generator takes at most 4"}]
    with pytest.raises(ValueError, match="every prompt was too long"):
        generate_samples(str(tmp_path / "m"), prompts[1:2], tmp_path / "t", {"steps": 2},
                         tokenizer=str(models / "vq"), text_encoder="tiny", progress=False)


def test_frechet_in_sample_space_equals_the_feature_space_formula():
    from tessera.eval.bootstrap import frechet_from_features
    from tessera.eval.frechet import frechet_distance, statistics

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 64)), rng.normal(0.3, 1.5, size=(30, 64))
    assert frechet_from_features(x, y) == pytest.approx(frechet_distance(*statistics(x), *statistics(y)), rel=1e-6)


def test_bootstrap_kid_of_the_identity_draw_is_the_full_set_kid_and_its_interval_sees_a_shift():
    from tessera.eval.bootstrap import _KID, paired_intervals
    from tessera.eval.frechet import kernel_distance
    from tessera.eval.gate import DIRECTIONS

    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(40, 32)), rng.normal(0.2, 1.0, size=(40, 32))
    full_set, _ = kernel_distance(fake, real, subsets=1, subset_size=40)  # one subset: every image on both sides
    assert _KID(fake, real)(np.arange(40)) == pytest.approx(full_set, rel=1e-9)
    scores = {"clipscore": np.zeros(40), "hit": np.zeros(40)}
    far = {"feats": rng.normal(1.0, 1.0, size=(40, 32)), **scores}
    ci = paired_intervals(far, {"feats": fake, **scores}, real, DIRECTIONS, replicates=100)
    assert 0 < ci["kid"][0] < ci["kid"][1]  # further from the real features: worse, beyond the noise
    ci = paired_intervals({"feats": fake, **scores}, {"feats": fake, **scores}, real, DIRECTIONS, replicates=20)
    assert ci["kid"] == [0.0, 0.0]


def test_sample_metrics_are_the_full_set_values():
    from tessera.eval.bootstrap import sample_metrics
    from tessera.eval.frechet import frechet_distance, kernel_distance, statistics

    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(30, 16)), rng.normal(0.5, 1.2, size=(30, 16))
    m = sample_metrics({"feats": fake, "clipscore": np.arange(30.0), "hit": np.r_[np.ones(6), np.zeros(24)]}, real)
    assert m["fd"] == pytest.approx(frechet_distance(*statistics(fake), *statistics(real)), rel=1e-6)
    assert m["kid"] == pytest.approx(kernel_distance(fake, real, subsets=1, subset_size=30)[0], rel=1e-9)
    assert (m["clipscore"], m["r_precision"]) == (14.5, 0.2)


def test_the_gate_with_bootstrap_intervals_passes_noise_and_rejects_a_real_loss():
    from tessera.eval.bootstrap import paired_intervals
    from tessera.eval.gate import DIRECTIONS, gate

    rng = np.random.default_rng(1)
    real = rng.normal(size=(64, 16))

    def model(shift, clip_mean, seed):
        r = np.random.default_rng(seed)
        return {"feats": r.normal(shift, 1.0, size=(64, 16)), "clipscore": r.normal(clip_mean, 3.0, 64),
                "hit": (r.random(64) < 0.5).astype(float)}

    deployed = model(0.0, 25.0, 2)
    same, worse = model(0.0, 24.5, 3), model(0.0, 15.0, 4)  # 0.5 below: noise at n=64; 10 below: a real loss
    tol = {"clipscore": 0.3}
    for cand, promote in ((same, True), (worse, False)):
        point = {"clipscore": float(cand["clipscore"].mean())}
        ci = paired_intervals(cand, deployed, real, DIRECTIONS, replicates=200)
        assert ci["clipscore"][0] < ci["clipscore"][1]
        d = gate(point, {"clipscore": float(deployed["clipscore"].mean())}, tol, ci)
        assert d.promote is promote and d.compared["clipscore"]["interval"] == ci["clipscore"]
        assert "95% CI" in d.reasons[0]
    # without intervals the same noise-level difference (0.29 here) is rejected on its point estimate
    point = {"clipscore": float(same["clipscore"].mean())}
    assert gate(point, {"clipscore": float(deployed["clipscore"].mean())}, {"clipscore": 0.2}).promote is False
    ci = paired_intervals(same, deployed, real, DIRECTIONS, replicates=200)
    assert gate(point, {"clipscore": float(deployed["clipscore"].mean())}, {"clipscore": 0.2}, ci).promote is True
