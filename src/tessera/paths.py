"""Output paths, checked before any work (a bad `-o` must not cost the whole computation)."""
from __future__ import annotations

import os
from pathlib import Path

from tessera.errors import InvalidInputError


def check_output_path(out: str | Path, suffixes: tuple[str, ...] = (".png",)) -> Path:
    """An output file, checked before any work: a known suffix, in a folder that exists and is writable,
    not a folder itself. An existing file is replaced (the Unix convention)."""
    p = Path(out)
    if p.suffix.lower() not in suffixes:
        raise InvalidInputError(f"-o {out}: the file name must end in {' or '.join(suffixes)}")
    if p.is_dir():
        raise InvalidInputError(f"-o {out}: is a folder; give a file name")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise InvalidInputError(f"-o {out}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidInputError(f"-o {out}: the folder {parent} is not writable")
    return p


def check_new_folder(out: str | Path) -> Path:
    """An output folder that does not exist yet or is empty (what is already there is never overwritten)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidInputError(f"-o {out}: the folder exists and is not empty (choose a new one)")
    return out
