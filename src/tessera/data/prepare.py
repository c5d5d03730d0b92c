"""`tessera data prepare SRC... --out DIR`: decode safely, filter, deduplicate, standardize, shard.

Output in DIR:
    shards/shard-CCCCC.tar  WebDataset shards, img2dataset keys: KEY.png|jpg, KEY.txt, KEY.json
    catalog.sqlite          every input item: kept or rejected (+reason), hashes, sizes, split
    report.json             kept / rejected counts by reason, settings, throughput

Work is split into fixed chunks of the (sorted) input list. A chunk's shard is written atomically and
then committed to the catalog in one transaction; a rerun skips committed chunks, so nothing is redone.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import multiprocessing as mp
import re
import tarfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from tessera.checkpoint import atomic_write_bytes
from tessera.config import Config
from tessera.data.captioning import CaptionConfig, Captioner, load_captioner
from tessera.data.catalog import Catalog
from tessera.data.dataset import to_tensor
from tessera.data.decode import DEFAULT_MAX_PIXELS, Rejected, decode_image, native_crops, resize_center_crop
from tessera.data.dedup import EmbeddingIndex, HashIndex
from tessera.data.filters import (
    FilterConfig,
    Scorer,
    check_scorer_spec,
    image_stats,
    load_scorer,
    phash,
    plugin_factory,
    quality_reason,
    register_scorer,
    registered_scorers,
    score_reason,
)
from tessera.data.language import detect, detector
from tessera.data.sources import Item, list_source, read_item
from tessera.errors import InvalidInputError, TesseraError

PHASH_VERSION = "imagehash.phash 8x8"  # hashes of another kind in a folder being resumed would not compare
MAX_SIZE = 4096  # output side: a 100000 px side would grow one worker to tens of GB


@dataclasses.dataclass
class PrepareConfig(Config):
    size: int = 128                 # output side (shorter side resized, then center crop)
    image_format: str = "png"       # "png" (lossless) | "jpg"
    jpeg_quality: int = 95
    val_fraction: float = 0.05      # by sha256, so an image's split never changes
    chunk_size: int = 256
    max_pixels: int = DEFAULT_MAX_PIXELS
    workers: int = 2
    scorers: tuple[str, ...] = ()   # registered scorer names ('name?key=value' specs)
    filters: FilterConfig = dataclasses.field(default_factory=FilterConfig)
    captions: CaptionConfig = dataclasses.field(default_factory=CaptionConfig)
    crops_per_image: int = 0        # > 0: that many size x size crops of the image at native resolution
    crop_mode: str = "random"       # random | grid positions of the crops
    max_downscale: float = 1.0      # crops: each reduced by its own factor in [1, this] (never enlarged)

    def __post_init__(self):
        if not 0 <= self.crops_per_image <= 256 or self.crop_mode not in ("random", "grid") or self.max_downscale < 1:
            raise ValueError(f"crops: {self.crops_per_image} per image (0-256), mode {self.crop_mode!r} (random | "
                             f"grid), max downscale {self.max_downscale} (>= 1)")
        if self.image_format not in ("png", "jpg"):
            raise ValueError(f"image_format must be 'png' or 'jpg', got {self.image_format!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 8 <= self.size <= MAX_SIZE:
            raise ValueError(f"size must be between 8 and {MAX_SIZE}, got {self.size}")
        for spec in self.scorers:  # names only (loading a scorer's model waits for the workers)
            check_scorer_spec(spec)
        if self.captions.recaption_below is not None and "caption_match" not in {s.partition("?")[0]
                                                                                for s in self.scorers}:
            raise ValueError("recaption_below needs the caption_match scorer (--scorer caption_match), whose "
                             "score it compares")
        if self.workers < 1 or self.chunk_size < 1:
            raise ValueError(f"workers and chunk_size must be >= 1, got {self.workers} and {self.chunk_size}")

    @classmethod
    def from_options(cls, min_size: int, phash_distance: int, scorers=(), captioner: str = "none",
                     language: bool = True, recaption_below: float | None = None, semantic_dedup: str = "",
                     semantic_threshold: float = 0.95, **kw) -> "PrepareConfig":
        """The flat options of `tessera data prepare` (the filter thresholds and caption checks among them)."""
        filters = FilterConfig(min_size=min_size, phash_distance=phash_distance, embedding_model=semantic_dedup or "",
                               embedding_threshold=semantic_threshold)
        return cls(scorers=tuple(scorers), filters=filters,
                   captions=CaptionConfig(captioner=captioner, language=language, recaption_below=recaption_below),
                   **kw)


ENGINES = ("local", "ray")


def split_of(sha256: str, val_fraction: float) -> str:
    return "val" if int(sha256[:8], 16) / 2**32 < val_fraction else "train"


# ---- worker side: one item -> a result dict (never raises) ---------------------------------------
_SCORERS: list[Scorer] = []
_CAPTIONER: list[Captioner] = []  # none or one
_EMBEDDER: list = []               # none or one image-text model (semantic dedup)
_LOAD_ERROR: list[Exception] = []  # a pool worker's failed load, raised by its first chunk


def load_stage_models(cfg: "PrepareConfig", registered: dict | None = None) -> tuple[list, list, list]:
    """(scorers, captioners, embedders) of cfg's model-backed stages, and the language detector, loaded in this
    process (a local worker or a Ray actor); `registered`: the scorers its caller registered in its own process."""
    for name, factory in (registered or {}).items():
        register_scorer(name, factory)
    scorers = [load_scorer(s) for s in cfg.scorers]
    captioners = [c for c in [load_captioner(cfg.captions.captioner)] if c is not None]
    embedders = [load_embedder(cfg.filters.embedding_model)] if cfg.filters.embedding_model else []
    if cfg.captions.language:
        detector(cfg.captions.languages)
    return scorers, captioners, embedders


def _init_worker(cfg: "PrepareConfig", pool_worker: bool = False, registered: dict | None = None) -> None:
    """The stages' models, loaded once per process. A pool worker runs torch on one thread (one worker per core)
    and keeps a load error for its first chunk to raise: an initializer that raises only leaves the pool saying
    that a worker died."""
    global _SCORERS, _CAPTIONER, _EMBEDDER
    if pool_worker:
        import torch

        torch.set_num_threads(1)
    try:
        _SCORERS, _CAPTIONER, _EMBEDDER = load_stage_models(cfg, registered)
    except Exception as e:  # noqa: BLE001 - re-raised with its own type by process_chunk
        if not pool_worker:
            raise
        _LOAD_ERROR[:] = [e]


def _encode(im, cfg: PrepareConfig) -> bytes:
    buf = io.BytesIO()
    if cfg.image_format == "png":
        im.save(buf, format="PNG", compress_level=6)
    else:
        im.save(buf, format="JPEG", quality=cfg.jpeg_quality)
    return buf.getvalue()


# ---- the per-item stages (the same functions in every engine) ----------------------------------------
def _new_row(item: Item) -> dict:
    return {"source": item.source, "caption": item.caption, "meta": item.meta, "sha256": None, "phash": None,
            "width": None, "height": None, "verdicts": {}, "status": "pending", "reason": None, "data": None,
            "raw": None}


def _reject(row: dict, reason: str, error: str | None = None) -> dict:
    row.update(status="rejected", reason=reason, raw=None, data=None)
    row.pop("_image", None)
    if error:  # without object addresses ("<... at 0x7f...>"), so that reruns record the same text
        row["verdicts"]["error"] = re.sub(r" at 0x[0-9a-f]+", "", error)
    return row


def _image(row: dict, cfg: "PrepareConfig"):
    """The decoded image: kept in the row in-process, decoded again from the raw bytes across processes."""
    if row.get("_image") is None:
        row["_image"] = decode_image(row["raw"], cfg.max_pixels)
    return row["_image"]


def decode_stage(item: Item, cfg: "PrepareConfig") -> dict:
    """Read, hash, decode safely, measure; the quality filters."""
    row = _new_row(item)
    if item.error:
        return _reject(row, "unreadable", item.error)
    try:
        row["raw"] = read_item(item)
    except Exception as e:  # unreadable file / member: recorded, never fatal
        return _reject(row, "unreadable", f"{type(e).__name__}: {e}")
    row["sha256"] = hashlib.sha256(row["raw"]).hexdigest()
    try:
        im = _image(row, cfg)
    except Rejected as r:
        return _reject(row, r.reason, r.detail)
    row["width"], row["height"] = im.size
    stats = image_stats(im)
    row["verdicts"].update(stats)
    reason = quality_reason(im, cfg.filters, stats)
    return _reject(row, reason) if reason else row


def score_stage(row: dict, cfg: "PrepareConfig", scorers: list[Scorer]) -> dict:
    """The scorer plug-ins (aesthetics, CLIP match, NSFW, ...) on what passed the quality filters."""
    if row["status"] != "pending" or not scorers:
        return row
    im = _image(row, cfg)
    scores = {}
    for s in scorers:  # a scorer returns its score, or {"score": it, part: value, ...} (recorded as name.part)
        out = s.score(im, row["caption"])
        if isinstance(out, dict):
            row["verdicts"].update({f"{s.name}.{k}": v for k, v in out.items() if k != "score"})
            out = out["score"]
        scores[s.name] = float(out)
    row["verdicts"].update(scores)
    reason = score_reason(scores, scorers)
    return _reject(row, reason) if reason else row


def caption_issue(row: dict, cfg: CaptionConfig) -> str | None:
    """Why the caption should be replaced (missing | non_english | low_match), recording its language."""
    caption = row["caption"].strip()
    if not caption:
        return "missing"
    if cfg.language:
        row["verdicts"].update(detect(caption, cfg.languages, cfg.language_margin))
        if row["verdicts"]["language"] not in ("en", None) and cfg.recaption_non_english:
            return "non_english"
    match = row["verdicts"].get("caption_match")
    if cfg.recaption_below is not None and match is not None and match < cfg.recaption_below:
        return "low_match"
    return None


def caption_stage(row: dict, cfg: "PrepareConfig", captioners: list[Captioner]) -> dict:
    """Language of the caption; a missing, non-English or poorly matching caption replaced by the captioner's
    (the original and the reason kept in the verdicts), or kept as it is, the issue recorded, without one."""
    if row["status"] != "pending":
        return row
    issue = caption_issue(row, cfg.captions)
    if issue is None:
        return row
    row["verdicts"]["caption_issue"] = issue
    if not captioners:
        return row
    (new, score), = captioners[0].caption([_image(row, cfg)])
    if not new.strip():  # the captioner said nothing: the caption stays, and the catalog says so
        row["verdicts"]["recaption_failed"] = captioners[0].name
        return row
    row["verdicts"].update(original_caption=row["caption"], recaptioned=issue, captioner=captioners[0].name,
                           **({"captioner_score": score} if score is not None else {}))
    row["caption"] = new
    return row


EMBEDDER_GROUP = "tessera.embedders"


def load_embedder(spec: str):
    """An image-text model (clip-xs, a CLIP folder) with image_features(), through the `image_text` plug-in."""
    return plugin_factory(EMBEDDER_GROUP, "image_text")(spec)


def embed_stage(row: dict, cfg: "PrepareConfig", embedders: list) -> dict:
    """The unit image embedding that the semantic duplicate check compares (the row carries it to the
    main process; it is not stored)."""
    if row["status"] != "pending" or not embedders:
        return row
    x = to_tensor(resize_center_crop(_image(row, cfg), 256))[None]  # each model resizes to its own input
    row["embedding"] = embedders[0].image_features(x)[0].float().numpy()
    return row


def transform_stage(row: dict, cfg: "PrepareConfig") -> dict:
    """Standardize (resize the shorter side, center crop), perceptual hash, encode; with crops_per_image, the
    crops at native resolution instead (hashed as the whole image: a source is deduplicated once)."""
    if row["status"] != "pending":
        return row
    im = _image(row, cfg)
    if cfg.crops_per_image:
        if min(im.size) < cfg.size:
            return _reject(row, "smaller_than_crop")
        crops = native_crops(im, cfg.size, cfg.crops_per_image, cfg.crop_mode, cfg.max_downscale,
                             seed=int(row["sha256"][:16], 16))
        row["phash"] = f"{phash(im):016x}"
        row["crops"] = [(_encode(c, cfg), info) for c, info in crops]
        row.update(status="kept", raw=None)
        row.pop("_image", None)
        return row
    out = resize_center_crop(im, cfg.size)
    row["phash"] = f"{phash(out):016x}"
    row["data"] = _encode(out, cfg)
    row.update(status="kept", raw=None)
    row.pop("_image", None)
    return row


def guarded(stage, row_or_item, *args) -> dict:
    """A stage that never raises: an unexpected failure on one image is recorded as reason 'error'."""
    try:
        return stage(row_or_item, *args)
    except Exception as e:  # noqa: BLE001 - one bad image must not stop the run
        row = row_or_item if isinstance(row_or_item, dict) else _new_row(row_or_item)
        return _reject(row, "error", f"{type(e).__name__}: {e}")


def process_item(item: Item, cfg: PrepareConfig) -> dict:
    row = guarded(decode_stage, item, cfg)
    row = guarded(score_stage, row, cfg, _SCORERS)
    row = guarded(caption_stage, row, cfg, _CAPTIONER)
    row = guarded(embed_stage, row, cfg, _EMBEDDER)
    return guarded(transform_stage, row, cfg)


def process_chunk(args: tuple[int, list[Item], PrepareConfig]) -> tuple[int, list[dict]]:
    chunk, items, cfg = args
    if _LOAD_ERROR:
        raise _LOAD_ERROR[0]
    return chunk, [process_item(it, cfg) for it in items]


# ---- main side: dedup, shard, catalog --------------------------------------------------------------
class _Dedup:
    """Exact (sha256), near (pHash within the Hamming radius, data/dedup.HashIndex) and, with an embedding
    model, semantic (cosine of image embeddings, data/dedup.EmbeddingIndex) duplicates of the kept images so
    far; a verdict names the kept image it duplicates and the distance. Kept embeddings are saved per chunk
    (OUT/embeddings/chunk-CCCCC.npz), so that a resumed run compares with the images of earlier runs."""

    def __init__(self, cfg: FilterConfig, kept: list[tuple[str, str, str]], out: Path):
        self.cfg, self.emb_dir = cfg, out / "embeddings"
        self.sha = {sha: key for key, sha, _ in kept}
        self.ids = [key for key, _, _ in kept]
        self.index = HashIndex(cfg.phash_distance, [int(ph, 16) for _, _, ph in kept])
        self.emb, self.emb_ids, self.pending = None, [], []
        if cfg.embedding_model:
            for f in sorted(self.emb_dir.glob("chunk-*.npz")):
                with np.load(f) as z:
                    for key, e in zip(z["ids"], z["embeddings"]):
                        self._add_embedding(str(key), e)

    def _add_embedding(self, key: str, e) -> None:
        if self.emb is None:
            self.emb = EmbeddingIndex(len(e), self.cfg.embedding_threshold)
        self.emb.add(e)
        self.emb_ids.append(key)

    def reason(self, row: dict) -> str | None:
        if not self.cfg.dedup:
            return None
        if row["sha256"] in self.sha:
            row["verdicts"]["duplicate_of"] = self.sha[row["sha256"]]
            return "duplicate"
        hit = self.index.nearest(int(row["phash"], 16))
        if hit is not None:
            row["verdicts"].update(duplicate_of=self.ids[hit[0]], phash_distance=hit[1])
            return "near_duplicate"
        near = self.emb.nearest(row["embedding"]) if self.emb is not None and "embedding" in row else None
        if near is not None:
            row["verdicts"].update(duplicate_of=self.emb_ids[near[0]], cosine=round(near[1], 4))
            return "semantic_duplicate"
        return None

    def add(self, row: dict, key: str) -> None:
        self.sha.setdefault(row["sha256"], key)
        self.ids.append(key)
        self.index.add(int(row["phash"], 16))
        if "embedding" in row:
            self._add_embedding(key, row["embedding"])
            self.pending.append((key, row["embedding"]))

    def save_chunk(self, chunk: int) -> None:
        """The embeddings kept in this chunk, written before the chunk is committed."""
        if not self.pending:
            return
        self.emb_dir.mkdir(exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, ids=np.array([k for k, _ in self.pending]), embeddings=np.stack([e for _, e in self.pending]))
        atomic_write_bytes(self.emb_dir / f"chunk-{chunk:05d}.npz", buf.getvalue())
        self.pending = []


def _write_shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tf.addfile(info, io.BytesIO(data))
    atomic_write_bytes(path, buf.getvalue())


RECORD = ("id", "source", "sha256", "phash", "width", "height", "caption", "verdicts", "status", "reason", "split")


def _finish_chunk(chunk: int, rows: list[dict], dedup: _Dedup, cfg: PrepareConfig, out: Path, cat: Catalog) -> None:
    """Deduplicate, key and shard a chunk's rows. Crops: one catalog row and shard member per crop, all with
    their source's hash, and so its split (no crop of a val image is in train)."""
    members, records, n_kept = [], [], 0
    for i, row in enumerate(rows):
        if row["status"] == "kept":
            reason = dedup.reason(row)
            if reason:
                row.update(status="rejected", reason=reason, data=None, crops=None)
        if row["status"] != "kept":
            row["id"], row["split"] = f"rej-{chunk:05d}-{i:04d}", None
            records.append({k: row[k] for k in RECORD})
            continue
        row["split"] = split_of(row["sha256"], cfg.val_fraction)
        for j, (data, crop) in enumerate(row.get("crops") or [(row["data"], None)]):
            key = f"{chunk:05d}{n_kept:06d}" if crop else f"{chunk:05d}{n_kept:04d}"
            n_kept += 1
            if j == 0:
                dedup.add(row, key)  # a source's near-duplicates name its first key
            meta = {"key": key, "source": row["source"], "sha256": row["sha256"], "split": row["split"],
                    "original_width": row["width"], "original_height": row["height"], **({"crop": crop} if crop else {})}
            if row["meta"]:
                meta["source_meta"] = row["meta"]
            members += [(f"{key}.{cfg.image_format}", data), (f"{key}.txt", row["caption"].encode()),
                        (f"{key}.json", json.dumps(meta).encode())]
            verdicts = {**row["verdicts"], **({"crop": crop} if crop else {})}
            records.append({**{k: row[k] for k in RECORD if k != "id"}, "id": key, "verdicts": verdicts})
        row["id"] = key  # the last of its keys
    shard = f"shard-{chunk:05d}.tar" if members else None
    if shard:
        _write_shard(out / "shards" / shard, members)
    dedup.save_chunk(chunk)
    cat.commit_chunk(chunk, shard, records)


def _inputs_fingerprint(items: list[Item]) -> str:
    """The listed inputs in order (chunks are index ranges of this list): count and hash."""
    listing = "\n".join(f"{it.source}\t{it.offset}\t{it.size}" for it in items)
    h = hashlib.sha256(listing.encode())
    return json.dumps({"count": len(items), "sha256": h.hexdigest()})


def _output_settings(config_json: str | None) -> dict:
    """A stored config without the settings that do not change the output (the number of workers): a resume
    may change those."""
    config = json.loads(config_json) if config_json else {}
    config.pop("workers", None)
    return config


def _check_settings(cat: Catalog, cfg: PrepareConfig, sources: list[str], items: list[Item]) -> None:
    want = {"config": cfg.to_json(), "sources": json.dumps(sources), "inputs": _inputs_fingerprint(items),
            "phash": PHASH_VERSION}
    have = cat.settings()
    if have:
        then, now = _output_settings(have.get("config")), _output_settings(want["config"])
        changed = sorted(k for k in {*then, *now} if then.get(k) != now.get(k))
        changed += [k for k in ("sources", "phash") if have.get(k) != want[k]]
        if changed:
            raise ValueError(f"{cat.path} was prepared with other settings or sources ({', '.join(changed)} "
                             f"differ); use a new --out folder (had {have.get('sources')}, now {want['sources']})")
    if have.get("inputs", want["inputs"]) != want["inputs"] and len(cat.done_chunks()):
        then = json.loads(have["inputs"])["count"]
        raise ValueError(f"{cat.path.parent}: the source files changed since this folder was started ({then} "
                         f"inputs then, {len(items)} now); resuming would skip or repeat images. Prepare into a "
                         f"new --out folder, or restore the sources")
    cat.set_settings(want)


class WorkerDied(TesseraError, RuntimeError):
    """A prepare worker process ended without a result (killed, out of memory, a crash in a decoder)."""


def _scorers_for_workers(cfg: PrepareConfig) -> dict:
    """The scorers of cfg registered in this process by register_scorer, which worker processes import by name."""
    import pickle

    used = {check_scorer_spec(s)[0] for s in cfg.scorers}
    registered = {n: f for n, f in registered_scorers().items() if n in used}
    for name, factory in registered.items():
        try:
            pickle.dumps(factory)
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            raise InvalidInputError(f"scorer {name!r}: its factory {factory!r} cannot reach the worker processes "
                                    f"({e}); register a module-level function (or run the local engine with workers=1, "
                                    f"in this process)") from None
    return registered


def _run_local(todo: list, cfg: PrepareConfig, registered: dict):
    """(chunk, rows) in chunk order from a process pool that notices a dead worker (multiprocessing.Pool
    would wait for the lost chunk forever). Its workers are forked by a forkserver (a fresh process that only
    imported this module), never from this one: a fork copies the locks that this process's other threads (OpenMP, Rust
    thread pools, tqdm's monitor) may hold at that moment, and a child that takes one waits forever (a CI
    run once hung in a forked pool here). Each worker loads its own models (language detector ~5-10 s, ~570 MB)."""
    if cfg.workers == 1:
        _init_worker(cfg)
        yield from map(process_chunk, todo)
        return
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["tessera.data.prepare"])  # imported once by the server, not by every worker
    with ProcessPoolExecutor(cfg.workers, ctx, _init_worker, (cfg, True, registered)) as pool:
        futures = [pool.submit(process_chunk, c) for c in todo]
        try:
            for (chunk, items, _), fut in zip(todo, futures):
                try:
                    yield fut.result()
                except BrokenProcessPool:
                    raise WorkerDied(f"a worker process died while preparing chunk {chunk} ({items[0].source} ... "
                                     f"{items[-1].source}); the chunks finished before it are saved: rerun the "
                                     f"same command to resume") from None
        finally:
            for fut in futures:
                fut.cancel()


def prepare(sources: list[str | Path], out: str | Path, cfg: PrepareConfig | None = None,
            progress: bool = True, on_chunk: Callable[[int], None] | None = None, engine: str = "local") -> dict:
    """Run (or resume) the pipeline; returns the report dict (also written to OUT/report.json).
    engine "local": a process pool of cfg.workers; "ray": Ray Data map_batches stages (data/ray_engine.py).
    Both run the same stage functions and write the same shards and catalog."""
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}: must be one of {ENGINES}")
    from tqdm import tqdm

    cfg = cfg or PrepareConfig()
    registered = _scorers_for_workers(cfg) if engine == "ray" or cfg.workers > 1 else {}
    out = Path(out)
    for d in (out, out / "shards"):
        if d.exists() and not d.is_dir():
            raise InvalidInputError(f"--out {out}: {d} is a file, not a folder")
    (out / "shards").mkdir(parents=True, exist_ok=True)
    items = [it for src in sources for it in list_source(src)]
    cat = Catalog(out / "catalog.sqlite")
    try:
        _check_settings(cat, cfg, [str(s) for s in sources], items)
        done = cat.done_chunks()
        chunks = [(c, items[i:i + cfg.chunk_size], cfg) for c, i in enumerate(range(0, len(items), cfg.chunk_size))]
        todo = [c for c in chunks if c[0] not in done]
        dedup = _Dedup(cfg.filters, cat.kept_hashes(), out)
        bar = tqdm(total=len(items), initial=len(items) - sum(len(c[1]) for c in todo), unit="img",
                   disable=not progress, desc="prepare")
        t0, n_new = time.time(), 0
        if engine == "ray":
            from tessera.data.ray_engine import process_chunks

            results = process_chunks(todo, cfg, registered)
        else:
            results = _run_local(todo, cfg, registered)
        try:
            for chunk, rows in results:
                _finish_chunk(chunk, rows, dedup, cfg, out, cat)
                n_new += len(rows)
                bar.update(len(rows))
                if on_chunk:
                    on_chunk(chunk)
        finally:
            getattr(results, "close", lambda: None)()
            bar.close()
        elapsed = time.time() - t0
        report = {**cat.counts(), **cat.source_pixels(), "inputs": len(items), "processed_this_run": n_new,
                  "images_per_second": round(n_new / elapsed, 2) if n_new else None,
                  "config": cfg.to_dict(), "sources": [str(s) for s in sources]}
    finally:
        cat.close()
    atomic_write_bytes(out / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    return report
