import dataclasses
import io
import json
import sqlite3
import struct
import tarfile
import threading
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import photo_like, png_bytes
from tessera.data.captioning import CaptionConfig
from tessera.data.dataset import ShardImages
from tessera.data.decode import Rejected, decode_image
from tessera.data.filters import hamming, phash, register_scorer
from tessera.data.prepare import PrepareConfig, prepare
from tessera.data.prepare import process_chunk as _real_process_chunk


def huge_png_header(w=100_000, h=100_000) -> bytes:
    """A valid-looking PNG whose IHDR declares w x h pixels (a decompression bomb)."""
    raw = png_bytes(Image.new("RGB", (8, 8)))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return raw[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + raw[33:]


def build_messy_folder(root):
    """Returns (folder, expected kept source names, expected reasons by file name)."""
    root.mkdir()
    kept, reasons = set(), {}
    for i in range(5):
        name = f"photo{i}.png"
        photo_like(100 + i, (120, 96)).save(root / name)
        (root / f"photo{i}.txt").write_text(f"caption {i}")
        kept.add(name)
    # valid, unusual modes
    rgba = photo_like(200, (100, 100)).convert("RGBA")
    a = np.asarray(rgba).copy()
    a[:30, :, 3] = 0
    Image.fromarray(a, "RGBA").save(root / "rgba.png")
    photo_like(201, (100, 90)).convert("CMYK").save(root / "cmyk.jpg", quality=95)
    g16 = (np.asarray(photo_like(202, (90, 100)).convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(g16.astype(np.uint16)).save(root / "gray16.png")
    photo_like(203, (100, 100)).convert("P").save(root / "palette.png")
    photo_like(204, (100, 100)).convert("LA").save(root / "la.png")
    kept |= {"rgba.png", "cmyk.jpg", "gray16.png", "palette.png", "la.png"}
    # duplicates
    (root / "zz_copy_of_photo0.png").write_bytes((root / "photo0.png").read_bytes())
    reasons["zz_copy_of_photo0.png"] = "duplicate"
    photo_like(101, (120, 96)).save(root / "photo1_reencoded.jpg", quality=90)
    reasons["photo1_reencoded.jpg"] = "near_duplicate"
    # broken inputs
    (root / "zero.png").write_bytes(b"")
    reasons["zero.png"] = "empty_file"
    (root / "notes.jpg").write_text("this is a text file, not a JPEG")
    reasons["notes.jpg"] = "not_an_image"
    full = png_bytes(photo_like(300, (120, 120)))
    (root / "truncated.png").write_bytes(full[: len(full) // 2])
    reasons["truncated.png"] = "truncated"
    jpg = png_bytes(photo_like(301, (120, 120)), "JPEG")
    (root / "corrupt.jpg").write_bytes(jpg[:200] + bytes(range(256)) * 4 + jpg[1300:])
    reasons["corrupt.jpg"] = {"corrupt", "truncated", "not_an_image"}
    (root / "bomb.png").write_bytes(huge_png_header())
    reasons["bomb.png"] = "too_many_pixels"
    photo_like(302, (40, 40)).save(root / "tiny.png")
    reasons["tiny.png"] = "too_small"
    photo_like(303, (400, 100)).save(root / "banner.png")
    reasons["banner.png"] = "extreme_aspect"
    Image.new("RGB", (100, 100), (120, 130, 140)).save(root / "flat.png")
    reasons["flat.png"] = "low_information"
    return root, kept, reasons


def test_prepare_messy_folder(tmp_path):
    src, kept, reasons = build_messy_folder(tmp_path / "src")
    report = prepare([src], tmp_path / "out", PrepareConfig(size=64, workers=2, chunk_size=4), progress=False)
    db = sqlite3.connect(tmp_path / "out" / "catalog.sqlite")
    rows = {r[0].split("/")[-1]: (r[1], r[2]) for r in db.execute("SELECT source, status, reason FROM images")}
    assert {n for n, (s, _) in rows.items() if s == "kept"} == kept
    for name, want in reasons.items():
        status, reason = rows[name]
        assert status == "rejected"
        assert reason in (want if isinstance(want, set) else {want}), (name, reason)
    assert report["kept"] == len(kept) and report["rejected"] == len(reasons)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["rejected_by_reason"]["duplicate"] == 1
    ds = ShardImages(tmp_path / "out", split=None)
    assert len(ds) == len(kept)
    x, caption, key = ds[0]
    assert x.shape == (3, 64, 64) and -1 <= float(x.min()) and float(x.max()) <= 1
    caps = {c for c in ds.captions if c}
    assert caps == {f"caption {i}" for i in range(5)}
    # the RGBA image was composited on white: its transparent top rows are white
    rgba_key = db.execute("SELECT id FROM images WHERE source LIKE '%rgba.png'").fetchone()[0]
    top = np.asarray(ds.image(ds.keys.index(rgba_key)))[:5]
    assert top.min() >= 250


def test_shards_are_img2dataset_layout(tmp_path):
    src, kept, _ = build_messy_folder(tmp_path / "src")
    prepare([src], tmp_path / "out", PrepareConfig(size=64, workers=1), progress=False)
    shards = sorted((tmp_path / "out" / "shards").glob("*.tar"))
    names = [n for s in shards for n in tarfile.open(s).getnames()]
    keys = {n.split(".")[0] for n in names}
    assert len(keys) == len(kept)
    for k in keys:
        assert {f"{k}.png", f"{k}.txt", f"{k}.json"} <= set(names)
    wds = pytest.importorskip("webdataset")
    samples = list(wds.WebDataset([str(s) for s in shards], shardshuffle=False))
    assert len(samples) == len(kept) and all("png" in s and "json" in s for s in samples)


def test_resume_after_interruption_redoes_nothing(tmp_path):
    src, kept, _ = build_messy_folder(tmp_path / "src")
    cfg = PrepareConfig(size=64, workers=1, chunk_size=5)

    def boom(chunk):
        if chunk == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare([src], tmp_path / "out", cfg, progress=False, on_chunk=boom)
    first = sorted((tmp_path / "out" / "shards").glob("*.tar"))
    mtimes = {p.name: p.stat().st_mtime_ns for p in first}
    report = prepare([src], tmp_path / "out", cfg, progress=False)
    assert report["processed_this_run"] == report["inputs"] - 10  # chunks 0 and 1 were committed
    assert all(p.stat().st_mtime_ns == mtimes[p.name] for p in first)
    fresh = prepare([src], tmp_path / "fresh", cfg, progress=False)
    assert {k: fresh[k] for k in ("kept", "rejected_by_reason")} == {k: report[k] for k in ("kept", "rejected_by_reason")}
    again = prepare([src], tmp_path / "out", cfg, progress=False)
    assert again["processed_this_run"] == 0


def test_changed_settings_refuse_to_mix(tmp_path):
    src, _, _ = build_messy_folder(tmp_path / "src")
    cfg = PrepareConfig(size=64, workers=1, captions=CaptionConfig(language=False))
    first = prepare([src], tmp_path / "out", cfg, progress=False)
    with pytest.raises(ValueError, match=r"other settings or sources \(size differ\)"):
        prepare([src], tmp_path / "out", dataclasses.replace(cfg, size=32), progress=False)
    # the number of workers does not change the output: a resume may use another
    again = prepare([src], tmp_path / "out", dataclasses.replace(cfg, workers=2), progress=False)
    assert again["processed_this_run"] == 0 and again["kept"] == first["kept"]


def test_tar_and_parquet_sources(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(tmp_path / "shard.tar", "w") as tf:
        for i in range(3):
            for ext, data in (("jpg", png_bytes(photo_like(400 + i), "JPEG", quality=95)),
                              ("txt", f"tar caption {i}".encode()), ("json", json.dumps({"i": i}).encode())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    del buf
    table = pa.table({"image": [{"bytes": png_bytes(photo_like(500 + i)), "path": f"{i}.png"} for i in range(2)]
                      + [{"bytes": b"garbage", "path": "x.png"}],
                      "caption": ["pq 0", "pq 1", "pq 2"]})
    pq.write_table(table, tmp_path / "data.parquet")
    report = prepare([tmp_path / "shard.tar", tmp_path / "data.parquet"], tmp_path / "out",
                     PrepareConfig(size=64, workers=1), progress=False)
    assert report["kept"] == 5 and report["rejected_by_reason"] == {"not_an_image": 1}
    ds = ShardImages(tmp_path / "out", split=None)
    assert sorted(ds.captions) == ["pq 0", "pq 1", "tar caption 0", "tar caption 1", "tar caption 2"]


def test_decode_exif_orientation_and_modes():
    im = photo_like(7, (80, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes())
    assert decode_image(buf.getvalue()).size == (40, 80)
    for mode in ("L", "1", "I", "F", "LA", "P", "CMYK"):
        out = decode_image(png_bytes(im.convert(mode), "TIFF"))
        assert out.mode == "RGB" and out.size == (80, 40)
    with pytest.raises(Rejected) as e:
        decode_image(png_bytes(im), max_pixels=100)
    assert e.value.reason == "too_many_pixels"


def test_phash_near_vs_far():
    a, b = photo_like(1, (128, 128)), photo_like(2, (128, 128))
    a_jpeg = Image.open(io.BytesIO(png_bytes(a, "JPEG", quality=60)))
    assert hamming(phash(a), phash(a_jpeg)) <= 4
    assert hamming(phash(a), phash(b)) > 12


def test_bad_source_is_a_clear_error(tmp_path):
    from tessera.data.sources import SourceError

    with pytest.raises(SourceError, match="no such file"):
        prepare([tmp_path / "nope"], tmp_path / "out", progress=False)


class RedScorer:
    """Test plug-in: the mean red level; rejects strongly red images."""

    name, reject_above, reject_below = "redness", 150.0, None

    def score(self, im, caption):
        return float(np.asarray(im)[..., 0].mean())


def red_scorer():
    return RedScorer()


def test_scorer_plugin_rejects_and_records(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # makes `test_data` importable by name
    src = tmp_path / "src"
    src.mkdir()
    photo_like(1, (80, 80)).save(src / "a.png")
    red = np.asarray(photo_like(2, (80, 80))).copy()
    red[..., 0] = 250
    Image.fromarray(red).save(src / "red.png")
    register_scorer("redness", red_scorer)  # the worker processes get it by reference
    cfg = PrepareConfig(size=32, workers=2, scorers=("redness",), captions=CaptionConfig(language=False))
    report = prepare([src], tmp_path / "out", cfg, progress=False)
    assert report["kept"] == 1 and report["rejected_by_reason"] == {"scorer:redness": 1}
    db = sqlite3.connect(tmp_path / "out" / "catalog.sqlite")
    verdicts = [json.loads(v) for (v,) in db.execute("SELECT verdicts FROM images ORDER BY source")]
    assert all("redness" in v for v in verdicts)


_HELD = threading.Lock()  # held by another thread of the test process while prepare starts its workers


class LockScorer:
    """Takes _HELD in a prepare worker: free in a fresh process, held forever in one forked from a process in
    which another thread held it (as OpenMP, Rust thread pools or tqdm's monitor hold theirs now and then)."""

    name, reject_above, reject_below = "lock", None, None

    def score(self, im, caption):
        if not _HELD.acquire(timeout=5):
            raise TimeoutError("_HELD was copied into this worker held")
        _HELD.release()
        return 0.0


def lock_scorer():
    return LockScorer()


def test_prepare_workers_inherit_no_lock_held_by_another_thread(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        photo_like(10 + i, (80, 80)).save(src / f"p{i}.png")
    register_scorer("lock", lock_scorer)
    cfg = PrepareConfig(size=32, workers=2, chunk_size=2, scorers=("lock",), captions=CaptionConfig(language=False))
    release = threading.Event()
    holder = threading.Thread(target=lambda: (_HELD.acquire(), release.wait(), _HELD.release()))
    holder.start()
    try:
        report = prepare([src], tmp_path / "out", cfg, progress=False)
    finally:
        release.set()
        holder.join()
    assert report["kept"] == 4 and report["rejected_by_reason"] == {}


def unpicklable_factory():
    return lambda: RedScorer()


def test_a_scorer_the_workers_cannot_import_is_a_clear_error(tmp_path):
    from tessera.errors import InvalidInputError

    (tmp_path / "src").mkdir()
    photo_like(1, (80, 80)).save(tmp_path / "src" / "a.png")
    register_scorer("local-red", unpicklable_factory())
    cfg = PrepareConfig(size=32, workers=2, scorers=("local-red",), captions=CaptionConfig(language=False))
    with pytest.raises(InvalidInputError, match="'local-red'.*module-level function"):
        prepare([tmp_path / "src"], tmp_path / "out", cfg, progress=False)
    assert not (tmp_path / "out").exists()  # refused before anything was written
    one = prepare([tmp_path / "src"], tmp_path / "out", dataclasses.replace(cfg, workers=1), progress=False)
    assert one["kept"] == 1


def missing_model_scorer():
    from tessera.errors import InvalidInputError

    raise InvalidInputError("scorer 'broken': its model file is missing")


def test_a_worker_that_cannot_load_its_models_says_why(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    from tessera.errors import InvalidInputError

    photo_like(1, (80, 80)).save((tmp_path / "src").mkdir() or tmp_path / "src" / "a.png")
    register_scorer("broken", missing_model_scorer)
    cfg = PrepareConfig(size=32, workers=2, scorers=("broken",), captions=CaptionConfig(language=False))
    with pytest.raises(InvalidInputError, match="model file is missing"):  # not "a worker process died"
        prepare([tmp_path / "src"], tmp_path / "out", cfg, progress=False)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=2048), st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM"]))
def test_decode_never_crashes_on_arbitrary_bytes(data, magic):
    try:
        im = decode_image(magic + data)
    except Rejected as r:
        assert r.reason in {"empty_file", "not_an_image", "truncated", "corrupt", "too_many_pixels"}
    else:
        assert im.mode == "RGB"


def test_translation_lines_are_dropped_from_captions(tmp_path):
    from tessera.data.sources import clean_caption, list_folder

    text = "A frog.\nach.utf8=Ogwalogwal\nde.utf8=Ein Frosch.\nca@valencia.utf8=Una granota.\npt_BR.utf8=Um sapo.\n"
    assert clean_caption(text) == "A frog."
    assert clean_caption("two\nlines  here") == "two lines here"
    photo_like(1).save(tmp_path / "frog.png")
    (tmp_path / "frog.txt").write_text(text)
    assert list_folder(tmp_path)[0].caption == "A frog."


# ---- reliability (issue 19) --------------------------------------------------------------------------------
def _chunk_that_kills_its_worker_once(args):
    """Run in a prepare worker process (imported there by name): the OOM killer / a decoder segfault, once."""
    import os
    import signal

    photo3 = [Path(it.path) for it in args[1] if it.path.endswith("photo3.png")]
    if photo3 and not (photo3[0].parents[1] / "killed-once").exists():  # the messy folder is TMP/src
        (photo3[0].parents[1] / "killed-once").touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return _real_process_chunk(args)


def test_a_killed_worker_ends_the_run_with_a_clear_error_and_a_rerun_resumes(tmp_path, monkeypatch):
    import time

    import tessera.data.prepare as prep
    from tessera.data.catalog import Catalog

    src, _, _ = build_messy_folder(tmp_path / "src")
    cfg = PrepareConfig(size=64, workers=2, chunk_size=4, captions=CaptionConfig(language=False))
    flag = tmp_path / "killed-once"
    monkeypatch.setattr(prep, "process_chunk", _chunk_that_kills_its_worker_once)
    t0 = time.time()
    with pytest.raises(prep.WorkerDied, match=r"chunk \d+ .*rerun"):
        prepare([src], tmp_path / "out", cfg, progress=False)
    assert time.time() - t0 < 60 and flag.exists()
    report = prepare([src], tmp_path / "out", cfg, progress=False)
    fresh = prepare([src], tmp_path / "fresh", dataclasses.replace(cfg, workers=1), progress=False)
    assert {k: report[k] for k in ("kept", "rejected_by_reason")} == {k: fresh[k] for k in ("kept", "rejected_by_reason")}
    with Catalog.read(tmp_path / "out") as cat:
        sources = [r["source"] for r in cat.rows()]
    assert len(sources) == len(set(sources)) == report["inputs"]  # nothing lost, nothing twice


def test_odd_file_names_unreadable_captions_and_link_loops_are_recorded(tmp_path):
    import os

    from tessera.data.catalog import Catalog

    src = tmp_path / "src"
    src.mkdir()
    photo_like(1, (96, 96)).save(src / "good.png")
    photo_like(2, (96, 96)).save(os.fsdecode(bytes(src) + b"/caf\xe9-latin1.png"))  # not UTF-8
    photo_like(3, (96, 96)).save(src / "cap.png")
    (src / "cap.txt").mkdir()  # a caption that cannot be read
    (src / "loop1.png").symlink_to("loop2.png")
    (src / "loop2.png").symlink_to("loop1.png")
    report = prepare([src], tmp_path / "out", PrepareConfig(size=64, workers=1), progress=False)
    assert report["kept"] == 2 and report["rejected_by_reason"] == {"unreadable": 3}
    with Catalog.read(tmp_path / "out") as cat:
        rows = {Path(r["source"]).name: r for r in cat.rows()}
    assert rows["caf\\xe9-latin1.png"]["status"] == "kept"
    assert "cap.txt cannot be read" in json.loads(rows["cap.png"]["verdicts"])["error"]
    assert "symbolic link" in json.loads(rows["loop1.png"]["verdicts"])["error"]


def test_resuming_after_the_sources_changed_is_refused(tmp_path):
    src, _, _ = build_messy_folder(tmp_path / "src")
    cfg = PrepareConfig(size=64, workers=1, chunk_size=5)

    def stop(chunk):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare([src], tmp_path / "out", cfg, progress=False, on_chunk=stop)
    photo_like(77, (100, 100)).save(src / "aaa_new.png")  # sorts first: every chunk range would shift
    with pytest.raises(ValueError, match="source files changed"):
        prepare([src], tmp_path / "out", cfg, progress=False)


def test_outputs_get_the_umask_mode_and_sizes_are_bounded(tmp_path):
    import os

    src, _, _ = build_messy_folder(tmp_path / "src")
    old = os.umask(0o022)
    try:
        prepare([src], tmp_path / "out", PrepareConfig(size=64, workers=1), progress=False)
    finally:
        os.umask(old)
    assert (tmp_path / "out" / "report.json").stat().st_mode & 0o777 == 0o644
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in (tmp_path / "out" / "shards").glob("*.tar"))
    with pytest.raises(ValueError, match="size must be between 8 and 4096"):
        PrepareConfig(size=100_000)


def test_native_resolution_crops_keep_detail_and_split_by_source(tmp_path):
    """`--crops-per-image N` (`--crop-mode`, `--max-downscale`): N crops per image at native resolution (or after at most the bounded
    downscale, never an upscale), one catalog row each linked to its source, every crop of a source in its
    split; an image smaller than the crop is rejected; the same crops on a rerun; the source pixel count."""
    from click.testing import CliRunner

    from tessera.cli import main

    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):
        photo_like(200 + i, (160 + 8 * i, 120)).save(src / f"p{i}.png")
        (src / f"p{i}.txt").write_text(f"photo {i}")
    photo_like(99, (40, 40)).save(src / "small.png")
    cfg = PrepareConfig.from_options(min_size=32, phash_distance=2, crops_per_image=3, max_downscale=1.5, size=48,
                                     workers=1, val_fraction=0.4)
    report = prepare([src], tmp_path / "out", cfg, progress=False)
    assert report["kept"] == 24 and report["kept_sources"] == 8
    assert report["source_pixels"] == sum((160 + 8 * i) * 120 for i in range(8))
    assert report["rejected_by_reason"] == {"smaller_than_crop": 1}
    ds = ShardImages(tmp_path / "out", split=None)
    metas = [json.loads(m) for m in _shard_members(tmp_path / "out", ".json")]
    by_source: dict[str, set] = {}
    for m in metas:
        by_source.setdefault(m["source"], set()).add(m["split"])
        left, top, right, bottom = m["crop"]["box"]
        assert 1.0 <= m["crop"]["scale"] <= 1.5 and 0 <= left < right <= m["original_width"]
        assert 0 <= top < bottom <= m["original_height"] and abs((right - left) - 48 * m["crop"]["scale"]) <= 1
    assert all(len(s) == 1 for s in by_source.values()) and len(by_source) == 8  # a source's crops share a split
    assert {s for v in by_source.values() for s in v} == {"train", "val"}
    assert len(ds) == 24 and ds[0][0].shape == (3, 48, 48)
    again = prepare([src], tmp_path / "again", cfg, progress=False)
    assert again["kept"] == 24 and sorted(_shard_members(tmp_path / "again", ".png")) == \
        sorted(_shard_members(tmp_path / "out", ".png"))  # the same crops: drawn from each source's hash
    grid = PrepareConfig.from_options(min_size=32, phash_distance=2, crops_per_image=4, crop_mode="grid", size=48,
                                      workers=1)
    prepare([src], tmp_path / "grid", grid, progress=False)
    boxes = [json.loads(m)["crop"]["box"] for m in _shard_members(tmp_path / "grid", ".json")]
    assert len(boxes) == 32 and all(b[2] - b[0] == 48 for b in boxes)  # max downscale 1: native pixels
    r = CliRunner().invoke(main, ["data", "prepare", str(src), "--out", str(tmp_path / "bad"), "--crops-per-image", "3",
                                  "--max-downscale", "0.5"])
    assert r.exit_code != 0 and "max downscale 0.5" in r.output and "Traceback" not in r.output


def _shard_members(out: Path, suffix: str) -> list:
    found = []
    for shard in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(shard) as tf:
            found += [tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(suffix)]
    return found
