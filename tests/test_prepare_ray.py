"""`data prepare --engine ray` (Ray Data map_batches stages on ray.init(num_cpus=2)) writes the same shards and
catalog as the local engine on the same input: kept, duplicates, corrupt and too-small files, scorer verdicts."""
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import photo_like
from tessera.data.captioning import CaptionConfig
from tessera.data.dedup import semdedup
from tessera.data.filters import FilterConfig, register_scorer
from tessera.data.prepare import PrepareConfig, prepare

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    for i in range(14):
        photo_like(500 + i, (72, 64)).save(src / f"img{i:02d}.png")
        if i < 12:  # img12, img13: uncaptioned
            (src / f"img{i:02d}.txt").write_text(f"picture {i}" if i != 11 else "ein Bild von einem kleinen Hund")
    photo_like(500, (72, 64)).save(src / "copy_of_img00.png")                 # exact duplicate
    photo_like(501, (72, 64)).resize((70, 62)).save(src / "near_img01.png")   # near duplicate
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")          # corrupt
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(src / "tiny.png")  # too small
    return src


def catalog(out):
    db = sqlite3.connect(out / "catalog.sqlite")
    rows = db.execute("SELECT * FROM images ORDER BY id").fetchall()
    return rows


class GreenScorer:
    """A plug-in registered in the test process only (register_scorer): both engines' workers must get it."""

    name, reject_above, reject_below = "greenness", None, None

    def score(self, im, caption):
        return float(np.asarray(im)[..., 1].mean())


def green_scorer():
    return GreenScorer()


def test_ray_engine_writes_the_same_shards_and_catalog(sources, tmp_path):
    register_scorer("greenness", green_scorer)
    cfg = PrepareConfig(size=32, chunk_size=5, workers=2, val_fraction=0.3,
                        scorers=("nsfw?max_score=0.8", "technical", "greenness"), captions=CaptionConfig(captioner="caption-xs"),
                        filters=FilterConfig(min_size=32, phash_distance=4, embedding_model="clip-xs"))
    local = prepare([sources], tmp_path / "local", cfg, progress=False)
    tests = {"env_vars": {"PYTHONPATH": str(Path(__file__).parent)}}  # where Ray's workers import green_scorer
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False, runtime_env=tests)
    try:
        distributed = prepare([sources], tmp_path / "ray", cfg, progress=False, engine="ray")
    finally:
        ray.shutdown()
    assert local["kept"] >= 10 and set(local["rejected_by_reason"]) == {"duplicate", "near_duplicate", "not_an_image", "too_small"}, local
    for k in ("kept", "rejected", "rejected_by_reason", "kept_by_split"):
        assert local[k] == distributed[k], k
    a, b = catalog(tmp_path / "local"), catalog(tmp_path / "ray")
    assert a == b and len(a) == 18
    assert sum('"greenness": ' in r[7] for r in a) == 16  # all but the corrupt and the tiny file: scored
    # img12, img13 and the two uncaptioned duplicates (captioned before the main process rejects them)
    assert sum('"recaptioned": "missing"' in r[7] for r in a) == 4 and sum('"non_english"' in r[7] for r in a) == 1
    shards = sorted(p.name for p in (tmp_path / "local" / "shards").iterdir())
    assert shards == sorted(p.name for p in (tmp_path / "ray" / "shards").iterdir())
    for name in shards:
        assert (tmp_path / "local" / "shards" / name).read_bytes() == (tmp_path / "ray" / "shards" / name).read_bytes()
    with pytest.raises(ValueError, match="engine"):
        prepare([sources], tmp_path / "x", cfg, engine="spark")


def test_semdedup_on_ray_data_matches_the_local_run():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((3000, 16)).astype(np.float32)
    emb[2000:2100] = emb[:100] + 0.02 * rng.standard_normal((100, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    local = semdedup(emb, 0.95, clusters=6)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        distributed = semdedup(emb, 0.95, clusters=6, engine="ray")
    finally:
        ray.shutdown()
    assert (local[0] == distributed[0]).all() and np.allclose(local[1], distributed[1], atol=1e-6)
    assert (local[0][2000:2100] >= 0).mean() > 0.9 and (local[0][:2000] == -1).all()
