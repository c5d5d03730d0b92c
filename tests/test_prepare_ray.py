"""`data prepare --engine ray` (Ray Data map_batches stages on ray.init(num_cpus=2)) writes the same shards and
catalog as the local engine on the same input: kept, duplicates, corrupt and too-small files, scorer verdicts."""
import sqlite3

import numpy as np
import pytest
from PIL import Image

from conftest import photo_like
from tessera.data.filters import FilterConfig
from tessera.data.prepare import PrepareConfig, prepare

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    for i in range(14):
        photo_like(500 + i, (72, 64)).save(src / f"img{i:02d}.png")
        (src / f"img{i:02d}.txt").write_text(f"picture {i}")
    photo_like(500, (72, 64)).save(src / "copy_of_img00.png")                 # exact duplicate
    photo_like(501, (72, 64)).resize((70, 62)).save(src / "near_img01.png")   # near duplicate
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")          # corrupt
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(src / "tiny.png")  # too small
    return src


def catalog(out):
    db = sqlite3.connect(out / "catalog.sqlite")
    rows = db.execute("SELECT * FROM images ORDER BY id").fetchall()
    return rows


def test_ray_engine_writes_the_same_shards_and_catalog(sources, tmp_path):
    cfg = PrepareConfig(size=32, chunk_size=5, workers=2, val_fraction=0.3,
                        scorers=("nsfw?max_score=0.8",),
                        filters=FilterConfig(min_size=32, phash_distance=4))
    local = prepare([sources], tmp_path / "local", cfg, progress=False)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        distributed = prepare([sources], tmp_path / "ray", cfg, progress=False, engine="ray")
    finally:
        ray.shutdown()
    assert local["kept"] >= 10 and set(local["rejected_by_reason"]) == {"duplicate", "near_duplicate", "not_an_image", "too_small"}, local
    for k in ("kept", "rejected", "rejected_by_reason", "kept_by_split"):
        assert local[k] == distributed[k], k
    a, b = catalog(tmp_path / "local"), catalog(tmp_path / "ray")
    assert a == b and len(a) == 18
    shards = sorted(p.name for p in (tmp_path / "local" / "shards").iterdir())
    assert shards == sorted(p.name for p in (tmp_path / "ray" / "shards").iterdir())
    for name in shards:
        assert (tmp_path / "local" / "shards" / name).read_bytes() == (tmp_path / "ray" / "shards" / name).read_bytes()
    with pytest.raises(ValueError, match="engine"):
        prepare([sources], tmp_path / "x", cfg, engine="spark")
