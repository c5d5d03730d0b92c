"""The data flywheel (seed 004): what the server generated and what users said about it, exported as a
source folder that `tessera data prepare` takes, so the next training run can include it.

    tessera data from-serving --serve-dir tessera-serve --out data/flywheel-src [--min-rating 4]
    tessera data prepare data/flywheel-src --out data/flywheel --scorer nsfw

Per exported image: IMAGE_ID.png|jpeg|webp (the file the server wrote) + IMAGE_ID.txt (the prompt the
image was generated from, i.e. the revised prompt); flywheel.json lists every image with its job,
paradigm, seed, mean rating and rating count, and every image left out with the reason. Safety filters
apply again at export: the prompt policy on both prompts and open_nsfw on the image (a stricter threshold
can be passed). Images already exported are not written again (reruns add only the new ones)."""
from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

from PIL import Image

QUERY = """
SELECT i.id, i.file, i.prompt, i.revised_prompt, i.seed, i.paradigm, i.job_id, i.created,
       AVG(f.rating) AS rating, COUNT(f.id) AS ratings
FROM images i JOIN jobs j ON j.id = i.job_id LEFT JOIN feedback f ON f.image_id = i.id
WHERE j.status = 'succeeded' GROUP BY i.id ORDER BY i.created, i.id
"""


def export_from_serving(serve_dir: str | Path, out: str | Path, min_rating: float | None = None,
                        include_unrated: bool = True, prompt_safety=None, image_safety=None) -> dict:
    """-> {"exported", "already", "skipped": {reason: count}, "images": [...]} (also OUT/flywheel.json)."""
    from tessera.safety.image import ImageSafety
    from tessera.safety.prompt import PromptSafety

    serve_dir, out = Path(serve_dir), Path(out)
    db_path = serve_dir / "serve.sqlite"
    if not db_path.is_file():
        raise FileNotFoundError(f"{serve_dir}: no serve.sqlite (the --data-dir of `tessera serve`)")
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    rows = db.execute(QUERY).fetchall()
    db.close()
    prompt_safety, image_safety = prompt_safety or PromptSafety(), image_safety or ImageSafety()
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"source": str(serve_dir), "min_rating": min_rating, "include_unrated": include_unrated,
                "images": [], "left_out": []}
    counts = {"exported": 0, "already": 0}
    for row in rows:
        reason = _reason(row, serve_dir, min_rating, include_unrated, prompt_safety, image_safety)
        if reason:
            manifest["left_out"].append({"image_id": row["id"], "reason": reason})
            continue
        target = out / row["file"]
        if target.exists():
            counts["already"] += 1
        else:
            shutil.copyfile(serve_dir / "images" / row["file"], target)
            target.with_suffix(".txt").write_text(row["revised_prompt"])
            counts["exported"] += 1
        manifest["images"].append({"image_id": row["id"], "file": row["file"], "caption": row["revised_prompt"],
                                   "prompt": row["prompt"], "paradigm": row["paradigm"], "seed": row["seed"],
                                   "job_id": row["job_id"], "rating": row["rating"], "ratings": row["ratings"]})
    skipped: dict[str, int] = {}
    for item in manifest["left_out"]:
        skipped[item["reason"]] = skipped.get(item["reason"], 0) + 1
    manifest.update(counts, skipped=skipped)
    (out / "flywheel.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return {**counts, "skipped": skipped, "images": len(manifest["images"])}


def _reason(row, serve_dir: Path, min_rating, include_unrated, prompt_safety, image_safety) -> str | None:
    if row["ratings"] == 0 and not include_unrated:
        return "unrated"
    if row["ratings"] and min_rating is not None and row["rating"] < min_rating:
        return "low_rating"
    path = serve_dir / "images" / row["file"]
    if not path.is_file():
        return "missing_file"
    for verdict in prompt_safety.check([row["prompt"], row["revised_prompt"]]):
        if verdict.flagged:
            return f"prompt_safety:{verdict.category}"
    with Image.open(path) as im:
        verdict = image_safety.check([im.convert("RGB")])[0]
    if verdict.flagged:
        return f"image_safety:{verdict.category}"
    return None
