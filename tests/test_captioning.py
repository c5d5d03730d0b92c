"""Caption checks of `data prepare` (issue 25): language detection (lingua), captioners (offline retrieval over
clip-xs; a Hugging Face BLIP folder through transformers), and the catalog's record of every decision."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import photo_like
from tessera.data.captioning import EMOJI_BANK, load_captioner, read_bank
from tessera.data.catalog import Catalog
from tessera.data.language import check_languages, detect
from tessera.data.prepare import PrepareConfig, prepare
from tessera.eval.captioners import HFCaptioner, RetrievalCaptioner, bank_features


@pytest.mark.parametrize("text,lang", [("a dog running on the beach at sunset", "en"), ("grinning face emoji", "en"),
                                       ("penguin", "en"), ("ein Hund läuft am Strand", "de"),
                                       ("un perro corriendo en la playa", "es"), ("桌子上的红苹果", "zh"),
                                       ("красное яблоко на столе", "ru"), ("", None), ("1234 !!", None)])
def test_language_of_short_captions(text, lang):
    assert detect(text)["language"] == lang


def test_language_list_must_be_known_and_hold_english():
    with pytest.raises(ValueError, match="'en' among them"):
        check_languages(("fr", "de"))
    with pytest.raises(ValueError, match="unknown"):
        check_languages(("en", "xx"))


def test_retrieval_captioner_returns_the_best_bank_caption(tmp_path):
    bank = tmp_path / "bank.txt"
    bank.write_text("red apple emoji\nblue heart emoji\n\nred apple emoji\ngrinning face emoji\n")
    cap = RetrievalCaptioner(bank, "clip-xs")
    assert cap.bank == ["blue heart emoji", "grinning face emoji", "red apple emoji"]  # distinct, sorted
    images = [photo_like(i, (64, 64)) for i in range(3)]
    out = cap.caption(images)
    from tessera.data.dataset import to_tensor

    img = cap.scorer.image_features(torch.stack([to_tensor(im) for im in images]))
    cos = img @ cap.scorer.text_features(cap.bank).T  # (3, 3) by hand
    assert [c for c, _ in out] == [cap.bank[int(i)] for i in cos.argmax(1)]
    assert np.allclose([s for _, s in out], 100 * cos.max(1).values.numpy(), atol=1e-3)


def test_bundled_emoji_bank_features_are_current():
    """The precomputed clip-xs features of the emoji bank equal recomputed ones (stale after retraining clip-xs:
    `write_bundled_bank_features()` regenerates them)."""
    cap = load_captioner("caption-xs")
    bank = read_bank(EMOJI_BANK)
    assert cap.bank == bank and cap.text.shape[0] == len(bank) > 3000
    fresh = bank_features(cap.scorer, bank[:64])
    assert torch.allclose(cap.text[:64], fresh, atol=2e-3)


def tiny_blip(folder: Path) -> Path:
    """A random BLIP captioner folder (model + processor) whose LM head favours the word 'dog'."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "red", "dog", "on", "the", "table"]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    tok.add_special_tokens({"bos_token": "[DEC]"})
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    cfg = BlipConfig(text_config=dict(vocab_size=len(words), max_position_embeddings=32, bos_token_id=5,
                                      pad_token_id=0, sep_token_id=3, eos_token_id=3, **small),
                     vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=16)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        head = model.text_decoder.cls.predictions.decoder
        head.bias[words.index("dog")] += 8.0
        head.bias[words.index("red")] += 7.5
    model.save_pretrained(folder)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok).save_pretrained(folder)
    return folder


def test_hf_blip_captioner_is_transformers_generate(tmp_path):
    from transformers import AutoProcessor, BlipForConditionalGeneration

    folder = tiny_blip(tmp_path / "blip")
    images = [photo_like(1, (48, 40)), photo_like(2, (64, 64))]
    got = load_captioner(str(folder)).caption(images)
    model = BlipForConditionalGeneration.from_pretrained(folder).eval()
    proc = AutoProcessor.from_pretrained(folder)
    ids = model.generate(pixel_values=proc(images=images, return_tensors="pt")["pixel_values"], max_new_tokens=30,
                         num_beams=3)
    want = [t.strip() for t in proc.batch_decode(ids, skip_special_tokens=True)]
    assert [c for c, _ in got] == want and all("dog" in c or "red" in c for c in want)


def test_captioner_specs_are_checked(tmp_path):
    for bad in ["blip2", "retrieval?banks=x", str(tmp_path)]:
        with pytest.raises(ValueError, match="captioner"):
            PrepareConfig.from_options(min_size=32, phash_distance=4, captioner=bad)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(Exception, match="not a captioner"):
        HFCaptioner(tmp_path)
    with pytest.raises(ValueError, match="caption_match"):
        PrepareConfig.from_options(min_size=32, phash_distance=4, recaption_below=20.0)


def mixed_folder(root: Path) -> Path:
    """Captioned (English), non-English, uncaptioned, and duplicate images; captions in metadata.jsonl."""
    root.mkdir()
    meta = []
    for i in range(8):
        photo_like(500 + i, (96, 80)).save(root / f"img{i}.png")
    meta += [{"file_name": "img0.png", "caption": "a red apple on a wooden table"},
             {"file_name": "img1.png", "caption": "a small dog running in the park"},
             {"file_name": "img2.png", "caption": "ein kleiner Hund läuft im Garten"},
             {"file_name": "img3.png", "caption": "une pomme rouge sur la table en bois"},
             {"file_name": "img4.png", "caption": "   "}]                     # blank: missing
    # img5..img7 have no caption at all
    (root / "zz_copy.png").write_bytes((root / "img0.png").read_bytes())  # exact duplicate of img0
    photo_like(501, (96, 80)).save(root / "zz_img1.jpg", quality=85)      # near duplicate of img1
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(m) for m in meta) + "\n")
    return root


def test_prepare_records_every_caption_and_duplicate_decision(tmp_path):
    src = mixed_folder(tmp_path / "src")
    cfg = PrepareConfig.from_options(min_size=32, phash_distance=4, captioner="caption-xs", size=64, workers=2,
                                     chunk_size=4)
    report = prepare([src], tmp_path / "out", cfg, progress=False)
    with Catalog.read(tmp_path / "out") as cat:
        rows = {Path(r["source"]).name: {**r, "verdicts": json.loads(r["verdicts"])} for r in cat.rows()}
    assert report["kept"] == 8 and report["rejected_by_reason"] == {"duplicate": 1, "near_duplicate": 1}
    for name in ("img0.png", "img1.png"):  # English: kept as written, language recorded
        r = rows[name]
        assert r["status"] == "kept" and r["verdicts"]["language"] == "en" and "recaptioned" not in r["verdicts"]
    for name, lang, original in [("img2.png", "de", "ein kleiner Hund läuft im Garten"),
                                 ("img3.png", "fr", "une pomme rouge sur la table en bois")]:
        v = rows[name]["verdicts"]
        assert v["language"] == lang and v["recaptioned"] == "non_english" and v["original_caption"] == original
        assert rows[name]["caption"] in read_bank(EMOJI_BANK) and v["captioner"].startswith("retrieval:clip-xs")
    for name in ("img4.png", "img5.png", "img6.png", "img7.png"):
        v = rows[name]["verdicts"]
        assert v["recaptioned"] == "missing" and rows[name]["caption"].endswith("emoji") and v["captioner_score"] > 0
    assert rows["zz_copy.png"]["reason"] == "duplicate"
    assert rows["zz_copy.png"]["verdicts"]["duplicate_of"] == rows["img0.png"]["id"]
    near = rows["zz_img1.jpg"]["verdicts"]
    assert rows["zz_img1.jpg"]["reason"] == "near_duplicate" and near["duplicate_of"] == rows["img1.png"]["id"]
    assert 0 <= near["phash_distance"] <= 4
    # the shards carry the new captions
    from tessera.data.dataset import ShardImages

    ds = ShardImages(tmp_path / "out", split=None)
    assert sorted(ds.captions) == sorted(r["caption"] for r in rows.values() if r["status"] == "kept")


def test_without_a_captioner_issues_are_recorded_and_captions_kept(tmp_path):
    src = mixed_folder(tmp_path / "src")
    prepare([src], tmp_path / "out", PrepareConfig.from_options(min_size=32, phash_distance=4, size=64, workers=1),
            progress=False)
    with Catalog.read(tmp_path / "out") as cat:
        rows = {Path(r["source"]).name: {**r, "verdicts": json.loads(r["verdicts"])} for r in cat.rows()}
    assert rows["img2.png"]["caption"] == "ein kleiner Hund läuft im Garten"
    assert rows["img2.png"]["verdicts"]["caption_issue"] == "non_english"
    assert rows["img6.png"]["caption"] == "" and rows["img6.png"]["verdicts"]["caption_issue"] == "missing"
    assert "recaptioned" not in rows["img6.png"]["verdicts"]


def test_data_catalog_lists_the_decisions(tmp_path):
    from click.testing import CliRunner

    from tessera.cli import main

    src = mixed_folder(tmp_path / "src")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["data", "prepare", str(src), "--out", str(out), "--size", "64", "--min-size", "32",
                                    "--phash-distance", "4", "--captioner", "caption-xs", "--workers", "1"])
    assert res.exit_code == 0, res.output
    rejected = [json.loads(line) for line in CliRunner().invoke(
        main, ["data", "catalog", str(out), "--status", "rejected"]).output.splitlines()]
    assert sorted(r["reason"] for r in rejected) == ["duplicate", "near_duplicate"]
    assert all(r["verdicts"]["duplicate_of"] for r in rejected)
    recaptioned = [json.loads(line) for line in CliRunner().invoke(
        main, ["data", "catalog", str(out), "--recaptioned"]).output.splitlines()]
    # 2 non-English + 4 missing kept, and the 2 duplicates (no caption of their own) captioned before rejection
    assert len(recaptioned) == 8 and sum(r["status"] == "kept" for r in recaptioned) == 6 and all(r["verdicts"]["original_caption"] != r["caption"] for r in recaptioned)
