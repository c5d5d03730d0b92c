"""The inference pipeline: request validation, stage order and timings, safety gating (stub checkers
count calls), withheld images, seeds, fairness and enhancement."""
import collections

import numpy as np
import pytest
import torch

from tessera.checkpoint import export_model
from tessera.pipelines.text2image import Request, TextToImage
from tessera.prompts import diversify, enhance
from tessera.prompts.fairness import SKIN_TONES
from tessera.registry import build
from tessera.safety import UnsafePromptError, Verdict


class StubPromptSafety:
    def __init__(self):
        self.calls = 0

    def check(self, prompts):
        self.calls += 1
        return [Verdict("forbidden" in p, "violence" if "forbidden" in p else None, 1.0) for p in prompts]


class StubImageSafety:
    """Flags every image whose mean red channel is above the median of the batch (some, not all)."""

    def __init__(self, flag_index=None):
        self.flag_index, self.calls = flag_index, 0

    def check(self, images):
        self.calls += 1
        return [Verdict(i == self.flag_index, "sexual" if i == self.flag_index else None, float(i == self.flag_index))
                for i in range(len(images))]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from tessera.generators.ar import ARConfig, ARTransformer
    from tessera.generators.masked import MaskedConfig, MaskedTransformer

    root = tmp_path_factory.mktemp("pipe_models")
    torch.manual_seed(0)
    export_model(build("vq-tiny"), root / "vq")
    export_model(ARTransformer(ARConfig(vocab_size=64, grid=(8, 8), dim=32, depth=1, heads=2, cond_dim=16)),
                 root / "ar")
    export_model(MaskedTransformer(MaskedConfig(vocab_size=64, grid=(8, 8), dim=32, depth=1, heads=2, cond_dim=16)), root / "masked")
    return root


def _pipe(tiny_models, image_safety=None, monkeypatch=None):
    from tessera.pipelines import folder

    real = folder.load_pipeline
    monkeypatch.setattr(folder, "load_pipeline", lambda model, tokenizer=None, text_encoder=None, **kw:
                        real(model, str(tiny_models / "vq"), "tiny", **kw))
    return TextToImage({"ar": str(tiny_models / "ar"), "masked": str(tiny_models / "masked")}, sr_model="fast",
                       prompt_safety=StubPromptSafety(), image_safety=image_safety or StubImageSafety())


@pytest.mark.parametrize("field,value,rule", [
    ("size", 4096, "between 64 and 2048"), ("n", 0, "between 1 and 8"), ("paradigm", "gan", "must be one of"),
    ("steps", 5000, "between 1"), ("cfg_scale", -1.0, "between 0 and 30"), ("top_k", 5, "applies to ar only"),
    ("negative_prompt", "blurry", "diffusion only"), ("prompt", "   ", "must not be empty"), ("seed", -2, "-1")])
def test_request_validation_names_field_and_rule(field, value, rule):
    req = Request("a cat", paradigm="masked")
    setattr(req, field, value)
    with pytest.raises(ValueError, match=rule) as e:
        req.validate()
    assert field in str(e.value)


def test_ar_request_rejects_steps():
    with pytest.raises(ValueError, match="one step per token"):
        Request("a cat", paradigm="ar", steps=10).validate()


def test_pipeline_stages_seed_and_sizes(tiny_models, monkeypatch):
    pipe = _pipe(tiny_models, monkeypatch=monkeypatch)
    r = pipe(Request("a red fox", paradigm="masked", size=64, n=2, seed=5, steps=2))
    assert r.seed == 5 and [im.size for im in r.images] == [(64, 64), (64, 64)]
    assert list(r.timings) == ["prompt_safety", "enhance", "generate", "decode", "image_safety", "upscale", "total"]
    assert r.settings["steps"] == 2 and r.settings["seed"] == 5 and r.withheld == []
    again = pipe(Request("a red fox", paradigm="masked", size=64, n=2, seed=5, steps=2))
    assert all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(r.images, again.images))  # same seed, same images
    rand = pipe(Request("a red fox", paradigm="ar", size=0, seed=-1, top_k=5))
    assert 0 <= rand.seed < 2**31 and rand.images[0].size == (32, 32)  # random seed is echoed back


def test_unsafe_prompt_stops_before_generation(tiny_models, monkeypatch):
    pipe = _pipe(tiny_models, monkeypatch=monkeypatch)
    with pytest.raises(UnsafePromptError, match="violence") as e:
        pipe(Request("a forbidden thing", paradigm="masked", steps=2))
    assert set(e.value.timings) == {"prompt_safety"} and pipe.stages._loaded == {} and pipe.image_safety.calls == 0


def test_flagged_images_are_withheld_never_returned(tiny_models, monkeypatch):
    pipe = _pipe(tiny_models, StubImageSafety(flag_index=1), monkeypatch)
    r = pipe(Request("a red fox", paradigm="masked", size=64, n=3, seed=1, steps=2))
    assert len(r.images) == 2 and r.withheld == [{"index": 1, "category": "sexual", "score": 1.0}]
    assert [v.flagged for v in r.image_verdicts] == [False, True, False]
    full = _pipe(tiny_models, StubImageSafety(), monkeypatch)(
        Request("a red fox", paradigm="masked", size=64, n=3, seed=1, steps=2))
    pixels = [np.asarray(im) for im in full.images]
    assert len(r.images) == 2 and all(np.array_equal(np.asarray(a), b) for a, b in zip(r.images, [pixels[0], pixels[2]]))  # image 1 is not among them


def test_enhancement_is_explained_and_optional():
    e = enhance("an apple")
    assert e.prompt == "A red apple." and len(e.changes) == 2 and "colour 'red'" in e.changes[0]
    assert enhance("grinning face").prompt == "grinning face emoji"
    assert enhance("a watercolor painting of a fox").prompt.startswith("a watercolor")  # style given: kept
    assert enhance("a blue apple").changes[0].startswith("style")  # colour given: not replaced


def test_fairness_diversifies_evenly_over_many_requests():
    counts = collections.Counter()
    for seed in range(300):
        for prompt, changes in diversify("a doctor smiling", 2, seed):
            counts.update(c for c in changes if c.startswith("skin tone"))
            assert "doctor" in prompt
    per_tone = [counts[f"skin tone: {t}"] for t in SKIN_TONES]
    assert sum(per_tone) == 600 and max(per_tone) - min(per_tone) <= 0.1 * 120
    assert diversify("an older woman with light skin tone", 3, 0) == [("an older woman with light skin tone", ())] * 3
    assert [p for p, _ in diversify("a woman with light skin tone", 9, 0)[::3]] == [
        "a young woman with light skin tone", "an adult woman with light skin tone", "an older woman with light skin tone"]
    assert diversify("a cat", 2, 0) == [("a cat", ()), ("a cat", ())]


def test_fairness_covers_every_gender_and_age_together():
    """Over len(GENDERS) * len(AGES) images of one request, each (gender, age) pair once; ages balanced over
    many requests."""
    from tessera.prompts.fairness import AGES, GENDERS

    pairs = [tuple(c.split(": ")[1] for c in ch if c.startswith(("gender", "age")))
             for _, ch in diversify("a teacher", len(GENDERS) * len(AGES), 0)]
    assert len(set(pairs)) == len(GENDERS) * len(AGES)  # ("person" adds no gender word: a 1-tuple)
    ages = collections.Counter(c for seed in range(90) for _, ch in diversify("a nurse", 3, seed) for c in ch
                               if c.startswith("age"))
    assert sorted(ages.values()) == [90, 90, 90]
    assert diversify("An artist", 4, 0)[3][0].startswith("An adult man artist")
