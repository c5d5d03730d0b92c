"""The data flywheel: images, prompts and feedback from the server's store -> a folder `data prepare` takes,
with the safety filters applied again and low-rated images left out."""
import json

from click.testing import CliRunner
from PIL import Image

from conftest import photo_like
from tessera.cli import main
from tessera.data.prepare import PrepareConfig, prepare
from tessera.serve.store import Store


def served(tmp_path):
    """A server store as `tessera serve` leaves it: 4 succeeded images (one unsafe prompt), 1 failed job."""
    store = Store(tmp_path / "serve")
    rows = [("grinning face emoji", 5), ("red apple emoji", 2), ("snowman emoji", None),
            ("a man stabbing a person with a knife, blood everywhere", 5)]
    ids = []
    for i, (prompt, rating) in enumerate(rows):
        job = store.add_job(json.dumps({"prompt": prompt}), None, "diffusion", 1, None, None)
        store.claim(1, 1)
        image_id = f"{i:032x}"
        photo_like(40 + i, (96, 96)).save(store.images_dir / f"{image_id}.png")
        store.add_images([{"id": image_id, "job_id": job, "idx": 0, "file": f"{image_id}.png", "format": "png",
                           "prompt": prompt, "revised_prompt": prompt, "seed": i, "paradigm": "diffusion"}])
        store.finish(job, "succeeded", result={})
        if rating:
            store.add_feedback(image_id, rating, "", None)
        ids.append(image_id)
    failed = store.add_job(json.dumps({"prompt": "x"}), None, "diffusion", 1, None, None)
    store.finish(failed, "failed", error={"code": "stage_failed"})
    return tmp_path / "serve", ids


def test_export_applies_ratings_and_safety_and_prepare_takes_it(tmp_path):
    serve_dir, ids = served(tmp_path)
    r = CliRunner().invoke(main, ["data", "from-serving", "--serve-dir", str(serve_dir), "--out", str(tmp_path / "src"),
                                  "--min-rating", "3"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["exported"] == 2 and report["skipped"] == {"low_rating": 1, "prompt_safety:violence": 1}
    manifest = json.loads((tmp_path / "src" / "flywheel.json").read_text())
    assert [m["image_id"] for m in manifest["images"]] == [ids[0], ids[2]]
    assert manifest["images"][0]["rating"] == 5 and manifest["images"][1]["ratings"] == 0
    assert (tmp_path / "src" / f"{ids[0]}.txt").read_text() == "grinning face emoji"
    again = CliRunner().invoke(main, ["data", "from-serving", "--serve-dir", str(serve_dir), "--out",
                                      str(tmp_path / "src"), "--min-rating", "3", "--rated-only"])
    assert json.loads(again.stdout)["already"] == 1 and json.loads(again.stdout)["skipped"]["unrated"] == 1
    out = prepare([tmp_path / "src"], tmp_path / "prepared", PrepareConfig(size=32, workers=1), progress=False)
    assert out["kept"] == 2
    import sqlite3
    captions = {c for (c,) in sqlite3.connect(tmp_path / "prepared" / "catalog.sqlite").execute(
        "SELECT caption FROM images WHERE status='kept'")}
    assert captions == {"grinning face emoji", "snowman emoji"}
    assert Image.open(tmp_path / "src" / f"{ids[0]}.png").size == (96, 96)
