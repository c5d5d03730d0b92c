"""Issue 19: the defects found by trying to break Tessera — each test failed before its fix."""
import time

import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import photo_like
from tessera.cli import main


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(r) -> str:
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert r.exit_code != 0 and "Traceback" not in r.output and len(errors) == 1, r.output
    return errors[0]


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    d = tmp_path_factory.mktemp("pic")
    photo_like(5, (128, 128)).save(d / "p.png")
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (32, 32, 96, 96))
    mask.save(d / "m.png")
    return d / "p.png", d / "m.png"


REFUSED = [  # (command, what the one line says): each before any generation work
    (["upscale", "{p}", "--size", "99999", "-o", "{out}/u.png"], "at most 4194304 output pixels"),
    (["upscale", "{p}", "--scale", "4", "-o", "{out}/u.xyz"], "must end in .png"),
    (["inpaint", "{p}", "--mask", "{m}", "cat", "-n", "1000", "-o", "{out}/x.png"], "n=1000: must be between 1 and 8"),
    (["sample", "masked", "cat", "--steps", "1000000", "-o", "{out}/x.png"], "steps=1000000"),
    (["sample", "diffusion", "cat", "-n", "9", "-o", "{out}/x.png"], "n=9"),
    (["serve", "--port", "99999"], "99999 is not in the range"),
    (["eval", "human", "--a", "{out}", "--b", "{out}", "--db", "{out}/v.sqlite", "--host", "0.0.0.0"], "SSH tunnel"),
    (["generate", "cat", "-o", "{out}/missing/dir/x.png"], "does not exist"),
    (["generate", "cat", "-o", "{out}/x.xyz"], "must end in .png"),
    (["inpaint", "{p}", "--mask", "{m}", "naked woman, nsfw porn", "-o", "{out}/x.png"], "usage policy"),
    (["sample", "masked", "naked woman, nsfw porn", "-o", "{out}/x.png"], "usage policy"),
]


@pytest.mark.parametrize("args,needle", REFUSED)
def test_refused_within_seconds_in_one_line_and_nothing_written(args, needle, picture, tmp_path):
    p, m = picture
    t0 = time.time()
    r = cli(*[a.format(p=p, m=m, out=tmp_path) for a in args])
    assert needle in one_error_line(r) and time.time() - t0 < 30
    assert not [f for f in tmp_path.rglob("*") if f.is_file()]  # nothing written


def test_sample_and_inpaint_run_harm_detection(picture, tmp_path, monkeypatch):
    from tessera.pipelines.records import read_record
    from tessera.safety import Verdict
    from tessera.safety.image import ImageSafety

    def flag_first(self, images):
        return [Verdict(i == 0, "sexual" if i == 0 else None, 0.99 if i == 0 else 0.01) for i in range(len(images))]

    monkeypatch.setattr(ImageSafety, "check", flag_first)
    p, m = picture
    r = cli("inpaint", p, "--mask", m, "a blue sky", "-n", "2", "--steps", "2", "-o", tmp_path / "x.png")
    assert r.exit_code == 0, r.output
    record = read_record(tmp_path / "x.png")
    assert record["withheld"] == [{"index": 0, "category": "sexual", "score": 0.99}]
    assert Image.open(tmp_path / "x.png").size == (128, 128)  # one image left, not a grid of two
    monkeypatch.setattr(ImageSafety, "check", lambda self, images: [Verdict(True, "sexual", 0.9)] * len(images))
    r = cli("sample", "masked", "a blue sky", "--steps", "2", "-o", tmp_path / "y.png")
    assert "withheld by harm detection" in one_error_line(r) and not (tmp_path / "y.png").exists()


def test_reconstruct_validates_outputs_first(picture, tmp_path):
    p, _ = picture
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        photo_like(3, (64, 64)).save(tmp_path / d / "img.png")
    (tmp_path / "existing.png").write_bytes(b"keep me")
    r = cli("reconstruct", p, tmp_path / "a" / "img.png", "-o", tmp_path / "existing.png")
    assert "need an output folder" in one_error_line(r) and (tmp_path / "existing.png").read_bytes() == b"keep me"
    r = cli("reconstruct", tmp_path / "a" / "img.png", tmp_path / "b" / "img.png", "-o", tmp_path / "out")
    assert "share the file name" in one_error_line(r) and not (tmp_path / "out").exists()
    r = cli("reconstruct", p, "-o", tmp_path / "nowhere" / "r.png")
    assert "does not exist" in one_error_line(r)


def test_prepare_cli_reports_a_bad_size_in_one_line(tmp_path):
    (tmp_path / "src").mkdir()
    r = cli("data", "prepare", tmp_path / "src", "--out", tmp_path / "out", "--size", "100000")
    assert "size must be between 8 and 4096" in one_error_line(r)


def test_generate_help_says_an_existing_output_is_replaced():
    for command in (["generate"], ["sample", "ar"], ["upscale"]):
        assert "existing file is replaced" in " ".join(CliRunner().invoke(main, [*command, "--help"]).output.split())


def test_harm_detection_false_positives_on_benign_generated_images(tmp_path):
    from tessera.eval.safety import generated_false_positives

    (tmp_path / "p.txt").write_text("a red apple\na green pepper\na flower\n")
    out = generated_false_positives(tmp_path / "p.txt", per_paradigm=3, paradigms=("masked",), thresholds=(0.0, 1.01))
    assert out["benign_generated"] == 3 and out["false_positive_rate"] == {"0": 1.0, "1.01": 0.0}
    assert len(out["highest"]) == 3 and all(0 <= h["score"] <= 1 and h["paradigm"] == "masked" for h in out["highest"])


def test_corrupt_databases_and_files_where_folders_belong_are_one_line(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    photo_like(1, (96, 96)).save(src / "a.png")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "catalog.sqlite").write_bytes(b"this is not SQLite" * 100)
    r = cli("data", "prepare", src, "--out", tmp_path / "bad")
    assert "not a readable catalog" in one_error_line(r)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "shards").write_text("a file")
    assert "is a file, not a folder" in one_error_line(cli("data", "prepare", src, "--out", tmp_path / "out"))
    (tmp_path / "serve-file").write_text("a file")
    assert "is a file, not a folder" in one_error_line(cli("serve", "--data-dir", tmp_path / "serve-file"))
    (tmp_path / "serve").mkdir()
    (tmp_path / "serve" / "serve.sqlite").write_bytes(b"garbage" * 1000)
    assert "not a readable Tessera store" in one_error_line(cli("serve", "--data-dir", tmp_path / "serve"))


def test_error_texts_carry_no_object_addresses(tmp_path):
    from tessera.data.decode import Rejected, decode_image

    with pytest.raises(Rejected) as e:
        decode_image(b"definitely not an image" * 10)
    assert "0x" not in str(e.value) and "object at" not in str(e.value)
    (tmp_path / "junk.png").write_bytes(b"junk" * 50)
    r = cli("upscale", tmp_path / "junk.png", "--scale", "2", "-o", tmp_path / "u.png")
    assert "0x" not in one_error_line(r)


def test_scorers_are_registered_names_never_module_paths(tmp_path):
    from tessera.data.filters import load_scorer, scorer_names

    assert {"nsfw", "caption_match"} <= set(scorer_names())
    for spec in ("os:system", "tessera.safety.image:nsfw_filter", "subprocess:run?args=id"):
        with pytest.raises(ValueError, match="registered scorer name"):
            load_scorer(spec)
    with pytest.raises(ValueError, match="not registered"):
        load_scorer("no-such-scorer")
    (tmp_path / "src").mkdir()
    r = cli("data", "prepare", tmp_path / "src", "--out", tmp_path / "out", "--scorer", "os:system")
    assert "registered scorer name" in one_error_line(r)


def test_eval_samples_run_the_safety_stages_unless_told_not_to(tmp_path, monkeypatch):
    from tessera.eval.samples import read_samples
    from tessera.safety import Verdict
    from tessera.safety.image import ImageSafety

    monkeypatch.setattr(ImageSafety, "check",
                        lambda self, ims: [Verdict(i == 1, "sexual" if i == 1 else None, 0.95 * (i == 1)) for i in range(len(ims))])
    (tmp_path / "p.txt").write_text("a red apple\na blue car\nnaked woman, nsfw porn\n")
    r = cli("eval", "sample", "--model", "masked", "--prompts", tmp_path / "p.txt", "--set", "steps=2", "-o", tmp_path / "s")
    assert r.exit_code == 0, r.output
    record, files = read_samples(tmp_path / "s")
    assert [x["prompt"] for x in record["images"]] == ["a red apple"] and len(files) == 1
    assert [x["prompt"] for x in record["withheld"]] == ["a blue car"]
    assert "usage policy" in record["skipped"][0]["reason"]
    r = cli("eval", "sample", "--model", "masked", "--prompts", tmp_path / "p.txt", "--set", "steps=2", "--no-safety",
            "-o", tmp_path / "raw")
    assert r.exit_code == 0 and len(read_samples(tmp_path / "raw")[1]) == 3
