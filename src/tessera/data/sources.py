"""Input sources for `tessera data prepare`: folders, WebDataset tar shards, Parquet files.

Each source lists `Item`s (cheap references, picklable) in a deterministic order; `read_item` turns
an item into (bytes, caption, extra-metadata) inside a worker process.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import tarfile
from pathlib import Path

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
PARQUET_IMAGE_COLS = ("image", "jpg", "png", "img", "image_bytes")
PARQUET_CAPTION_COLS = ("caption", "text", "txt", "prompt")


@dataclasses.dataclass(frozen=True)
class Item:
    source: str           # human-readable origin, e.g. "dir/a/b.jpg" or "shard.tar:000123"
    kind: str             # "file" | "tar" | "parquet"
    path: str
    offset: int = 0       # tar: data offset; parquet: row group
    size: int = 0         # tar: data size; parquet: row in group
    caption: str = ""
    meta: str = ""        # JSON text carried into the output's .json
    error: str = ""       # why the item cannot be used, found while listing (unreadable caption, link loop)


class SourceError(ValueError):
    """A SRC argument that cannot be read as a folder, tar shard or Parquet file."""


_TRANSLATION_LINE = re.compile(r"^[a-z]{2,3}(_[A-Z]{2})?(@[a-z]+)?\.utf8=")


def clean_caption(text: str) -> str:
    """Drop translation lines ('de.utf8=Ein Frosch.', as in Tux Paint's stamp descriptions: the English
    caption comes first) and collapse whitespace."""
    lines = [ln for ln in text.splitlines() if not _TRANSLATION_LINE.match(ln.strip())]
    return " ".join(" ".join(lines).split())


def display_path(p: str | Path) -> str:
    """A path as text that SQLite and JSON can store: a file name that is not UTF-8 keeps its bytes as
    \\xNN escapes (the item is still read through its real path)."""
    return os.fsencode(str(p)).decode("utf-8", "backslashreplace")


def _folder_captions(folder: Path) -> tuple[dict[str, str], dict[Path, str]]:
    """Captions from metadata.jsonl files (resolved image path -> text), and the folders whose
    metadata.jsonl cannot be read (folder -> why): their images are rejected, not silently uncaptioned."""
    caps: dict[str, str] = {}
    broken: dict[Path, str] = {}
    for meta in sorted(folder.rglob("metadata.jsonl")):
        try:
            text = meta.read_text(errors="replace")
        except OSError as e:
            broken[meta.parent] = f"{display_path(meta)} cannot be read ({e.strerror or type(e).__name__})"
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name = row["file_name"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise SourceError(f"{meta}:{n}: each line must be a JSON object with 'file_name' ({e})") from None
            text = next((row[k] for k in PARQUET_CAPTION_COLS if isinstance(row.get(k), str)), "")
            caps[str((meta.parent / name).resolve())] = text
    return caps, broken


def _caption_file(p: Path) -> tuple[str | None, str]:
    """(caption of KEY.txt beside the image or None, why it cannot be read or '')."""
    txt = p.with_suffix(".txt")
    if not txt.exists():
        return None, ""
    try:
        return clean_caption(txt.read_text(errors="replace")), ""
    except OSError as e:
        return None, f"caption {display_path(txt)} cannot be read ({e.strerror or type(e).__name__})"


def _folder_item(p: Path, caps: dict[str, str], broken: dict[Path, str]) -> Item:
    if p.is_symlink() and not p.exists():
        return Item(display_path(p), "file", str(p), error="a broken or looping symbolic link")
    cap, error = caps.get(str(p.resolve())), next((why for d, why in broken.items() if d in p.parents), "")
    if cap is None and not error:
        cap, error = _caption_file(p)
    return Item(display_path(p), "file", str(p), caption=cap or "", error=error)


def list_folder(folder: Path) -> list[Item]:
    caps, broken = _folder_captions(folder)
    return [_folder_item(p, caps, broken) for p in sorted(folder.rglob("*"))
            if p.suffix.lower() in IMAGE_EXTS and (p.is_file() or p.is_symlink())]


def list_tar(path: Path) -> list[Item]:
    """img2dataset layout: members key.jpg|png (+ key.txt, key.json) grouped by key."""
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(path) as tf:
            for m in tf:
                if not m.isfile() or "." not in Path(m.name).name:
                    continue
                folder, base = m.name.rsplit("/", 1) if "/" in m.name else ("", m.name)
                stem, ext = base.split(".", 1)  # WebDataset: the key ends at the basename's first dot
                key = f"{folder}/{stem}" if folder else stem
                groups.setdefault(key, {})[ext.lower()] = m
            texts = {k: tf.extractfile(g["txt"]).read().decode("utf-8", "replace").strip()
                     for k, g in groups.items() if "txt" in g}
            metas = {k: tf.extractfile(g["json"]).read().decode("utf-8", "replace")
                     for k, g in groups.items() if "json" in g}
    except (tarfile.TarError, OSError, EOFError) as e:
        raise SourceError(f"{path}: not a readable tar shard ({e})") from None
    items = []
    for key in sorted(groups):
        g = groups[key]
        img = next((g[e] for e in ("jpg", "jpeg", "png", "webp") if e in g), None)
        if img is None:
            continue
        items.append(Item(f"{path}:{key}", "tar", str(path), img.offset_data, img.size,
                          texts.get(key, ""), metas.get(key, "")))
    return items


def list_parquet(path: Path, image_col: str | None = None, caption_col: str | None = None) -> list[Item]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise SourceError(f"{path}: not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    icol = image_col or next((c for c in PARQUET_IMAGE_COLS if c in names), None)
    if icol is None or icol not in names:
        raise SourceError(f"{path}: no image column (looked for {image_col or PARQUET_IMAGE_COLS}; has {names})")
    ccol = caption_col or next((c for c in PARQUET_CAPTION_COLS if c in names), None)
    caps = pf.read(columns=[ccol]).column(0).to_pylist() if ccol else None
    items, n = [], 0
    for rg in range(pf.num_row_groups):
        for r in range(pf.metadata.row_group(rg).num_rows):
            cap = caps[n] if caps and isinstance(caps[n], str) else ""
            items.append(Item(f"{path}:{n}", "parquet", f"{path}\t{icol}", rg, r, cap))
            n += 1
    return items


def list_source(src: str | Path) -> list[Item]:
    p = Path(src)
    if p.is_dir():
        return list_folder(p)
    if not p.exists():
        raise SourceError(f"{src}: no such file or folder")
    if p.suffix == ".tar" or tarfile.is_tarfile(p):
        return list_tar(p)
    if p.suffix == ".parquet":
        return list_parquet(p)
    raise SourceError(f"{src}: expected a folder, a .tar shard or a .parquet file")


_PARQUET_CACHE: dict[tuple[str, int], list] = {}


def read_item(item: Item) -> bytes:
    if item.kind == "file":
        return Path(item.path).read_bytes()
    if item.kind == "tar":
        with open(item.path, "rb") as f:
            f.seek(item.offset)
            return f.read(item.size)
    if item.kind == "parquet":
        import pyarrow.parquet as pq

        path, col = item.path.split("\t")
        key = (path, item.offset)
        if key not in _PARQUET_CACHE:
            _PARQUET_CACHE.clear()
            _PARQUET_CACHE[key] = pq.ParquetFile(path).read_row_group(item.offset, columns=[col]).column(0).to_pylist()
        value = _PARQUET_CACHE[key][item.size]
        if isinstance(value, dict):  # HF datasets Image feature: {"bytes": ..., "path": ...}
            value = value.get("bytes")
        return value or b""
    raise ValueError(f"unknown item kind {item.kind!r}")
