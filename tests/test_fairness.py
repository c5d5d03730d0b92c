"""Fairness measurement (issue 25): zero-shot attribute classification, divergence from uniform with bootstrap
intervals, per prompt and overall; samples written with repeats and diversification."""
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import photo_like, tiny_hf_clip
from tessera.eval.fairness import ATTRIBUTES, classify, divergences, fairness_report
from tessera.eval.samples import FORMAT, Prompt, expand_prompts
from tessera.prompts import diversify


def test_divergences_at_the_extremes():
    p, tv, kl = divergences(np.array([0, 1, 2, 0, 1, 2]), 3)
    assert np.allclose(p, 1 / 3) and tv == pytest.approx(0) and kl == pytest.approx(0)
    p, tv, kl = divergences(np.zeros(10, dtype=int), 4)
    assert tv == pytest.approx(0.75) and kl == pytest.approx(math.log(4))
    _, tv, kl = divergences(np.array([0, 0, 0, 1]), 2)
    assert tv == pytest.approx(0.25) and kl == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))


def test_zero_shot_classes_are_the_ensembled_argmax(tmp_path):
    from tessera.data.dataset import to_tensor
    from tessera.eval.clipscore import load_image_text_model

    folder, model, tok, proc = tiny_hf_clip(tmp_path)
    scorer = load_image_text_model(str(folder))
    images = [photo_like(i, (32, 32)) for i in range(6)]
    got = classify(scorer, images)
    feats = scorer.image_features(torch.stack([to_tensor(im) for im in images]))
    for attr, classes in ATTRIBUTES.items():
        rows = []
        for texts in classes.values():
            batch = tok(list(texts), padding=True, return_tensors="pt")
            with torch.no_grad():
                t = model.get_text_features(**batch)
            t = t if isinstance(t, torch.Tensor) else t.pooler_output
            rows.append(torch.nn.functional.normalize(torch.nn.functional.normalize(t, dim=-1).mean(0), dim=-1))
        assert (got[attr] == (feats @ torch.stack(rows).T).argmax(1).numpy()).all(), attr


def write_samples_folder(folder, rows):
    folder.mkdir()
    images = []
    for i, (prompt, original) in enumerate(rows):
        photo_like(700 + i, (64, 64)).save(folder / f"{i:05d}.png")
        images.append({"file": f"{i:05d}.png", "prompt": prompt, "category": "", "batch": 0, "seed": 0,
                       **({"original": original} if original else {})})
    (folder / "samples.json").write_text(json.dumps({"format": FORMAT, "images": images}))
    return folder


def test_report_per_prompt_and_overall_with_intervals(tmp_path):
    rows = [(p, "a doctor") for p, _ in diversify("a doctor", 12, 0)]
    rows += [("a person running", None)] * 8 + [("a red apple", None)] * 5  # the apples are no people: left out
    folder = write_samples_folder(tmp_path / "s", rows)
    report = fairness_report(folder, "clip-xs", replicates=200)
    assert report["images"] == 20 and report["prompts"] == 2 and report["diversified"]
    for attr, classes in ATTRIBUTES.items():
        a = report["attributes"][attr]
        assert set(a["per_prompt"]) == {"a doctor", "a person running"}
        assert a["per_prompt"]["a doctor"]["n"] == 12 and a["overall"]["n"] == 20
        o = a["overall"]
        assert sum(o["distribution"].values()) == pytest.approx(1, abs=1e-3) and list(o["distribution"]) == list(classes)
        assert 0 <= o["tv_95"][0] <= o["tv_95"][1] <= 1 - 1 / len(classes) + 1e-9
        assert 0 <= o["kl_95"][0] <= o["kl_95"][1] <= math.log(len(classes)) + 1e-9
    with pytest.raises(ValueError, match="depicts people"):
        fairness_report(write_samples_folder(tmp_path / "apples", [("a red apple", None)] * 3), "clip-xs")


def test_eval_fairness_cli_writes_json_and_markdown(tmp_path):
    from tessera.cli import main

    folder = write_samples_folder(tmp_path / "s", [("a teacher", None)] * 6)
    res = CliRunner().invoke(main, ["eval", "fairness", str(folder), "--bootstrap", "50", "-o", str(tmp_path / "f.json")])
    assert res.exit_code == 0, res.output
    assert "| gender | (all) | 6 |" in res.output
    assert json.loads((tmp_path / "f.json").read_text())["attributes"]["age"]["overall"]["n"] == 6
    assert (tmp_path / "f.md").read_text().startswith("Fairness of")


def test_expand_prompts_repeats_and_diversifies():
    out = expand_prompts([Prompt("a doctor", "people"), Prompt("a cat")], repeat=3, diversify=True, seed=0)
    assert [p.original for p in out] == ["a doctor"] * 3 + ["a cat"] * 3
    assert len({p.prompt for p in out[:3]}) == 3 and all(p.prompt == "a cat" for p in out[3:])
    assert [p.prompt for p in expand_prompts([Prompt("a doctor")], repeat=2)] == ["a doctor", "a doctor"]
    with pytest.raises(ValueError, match="repeat"):
        expand_prompts([Prompt("a doctor")], repeat=0)


def test_requested_attributes_are_read_from_diversified_prompts():
    from tessera.eval.fairness import adherence, requested

    tones = list(ATTRIBUTES["skin_tone"])
    assert requested("an older woman doctor, medium-light skin tone", "skin_tone", tones) == "medium-light"
    assert requested("a man, light skin tone", "skin_tone", tones) == "light"
    assert requested("an older woman doctor", "gender", ["man", "woman"]) == "woman"
    assert requested("an older woman doctor", "age", list(ATTRIBUTES["age"])) == "older"
    assert requested("a doctor", "gender", ["man", "woman"]) is None
    got = adherence(["a man", "a woman", "a man", "a doctor"], np.array([0, 0, 0, 1]), ["man", "woman"], "gender")
    assert got == {"n": 3, "accuracy": round(2 / 3, 4), "chance": 0.5}
