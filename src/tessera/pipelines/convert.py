"""`tessera convert` and `tessera pull`: the checkpoints users bring, as Tessera pipeline folders.

    convert(SRC, OUT)   SRC: a diffusers Stable Diffusion folder (any variant), a single-file SD checkpoint
                        (.safetensors in the LDM layout), or a Tessera pipeline / generator folder or preset;
                        OUT: a pipeline folder (folder.py) in the storage dtype, loaded by tessera.load(OUT).
                        A taming VQGAN release folder becomes a Tessera model folder (its pickle read once).
    pull(REPO, OUT)     a Hugging Face Hub repository's safetensors weights and configs (never a pickle),
                        through the `huggingface_hub` client; without a network, one line saying so.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from tessera.errors import InvalidInputError, ModelNotFoundError

STORAGE = ("float16", "bfloat16", "float32")
# what a pull keeps: configs, tokenizer vocabularies and safetensors weights (no .bin / .ckpt / .pt pickles)
KEEP = (".json", ".txt", ".model", ".safetensors")


def convert(src: str | Path, out: str | Path, dtype: str = "float16", tokenizer: str | Path | None = None,
            prediction: str = "epsilon", variant: str | None = None, vae: str | Path | None = None,
            trust_pickle: bool = False) -> Path:
    """Read SRC in whichever layout it has and write it as a pipeline folder at OUT (weights stored in `dtype`;
    `tokenizer`: the CLIP tokenizer folder a single file lacks; `prediction`: "v" for SD 2.x 768 single
    files; `vae`: another autoencoder folder, e.g. TAESD, for a diffusers folder; `trust_pickle`: read a
    taming .ckpt that holds more than tensors — it can run code)."""
    from tessera.device import placement
    from tessera.paths import check_new_folder
    from tessera.pipelines.folder import load_pipeline, save_pipeline
    from tessera.pipelines.stable_diffusion import is_diffusers_folder, load_diffusers_folder
    from tessera.tokenizer.taming import is_release_folder

    if dtype not in STORAGE:
        raise InvalidInputError(f"--dtype {dtype}: must be one of {', '.join(STORAGE)}")
    check_new_folder(out)  # before reading gigabytes
    place, src = placement("cpu", dtype), Path(src)
    if is_release_folder(src):  # a taming VQGAN release: its pickle read once, written as safetensors
        return _convert_model(src, Path(out), dtype, trust_pickle)
    if src.is_file():
        from tessera.pipelines.single_file import load_single_file

        if tokenizer is None:
            raise InvalidInputError(f"{src}: a single-file checkpoint carries no CLIP tokenizer; pass --tokenizer "
                                    f"DIR (the tokenizer/ folder of any SD pipeline of its family)")
        pipe = load_single_file(src, tokenizer, prediction, device=place)
    elif is_diffusers_folder(src):
        pipe = load_diffusers_folder(src, place, variant=variant, vae=vae)
    else:
        if vae or tokenizer or variant:
            raise InvalidInputError(f"{src}: --vae, --tokenizer and --variant apply to diffusers folders and single files")
        pipe = load_pipeline(str(src), device=place)
    return save_pipeline(pipe, out)


def _convert_model(src: Path, out: Path, dtype: str, trust_pickle: bool) -> Path:
    """A taming VQGAN release folder -> a Tessera model folder (config.json + model.safetensors + meta.json)."""
    import torch

    from tessera.checkpoint import export_model
    from tessera.tokenizer.taming import load_release

    return export_model(load_release(src, trust_pickle=trust_pickle), out, {"source": str(src)},
                        dtype=getattr(torch, dtype))


def _reachable(endpoint: str) -> None:
    """Fail in one line, at once, where the hub cannot be reached (instead of the client's minute of retries)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise ModelNotFoundError("tessera pull: HF_HUB_OFFLINE is set; copy the repository here and use "
                                 "`tessera convert DIR -o OUT`")
    url = urlparse(endpoint)
    try:
        socket.getaddrinfo(url.hostname, url.port or 443)
    except OSError as e:
        raise ModelNotFoundError(f"tessera pull: cannot reach {endpoint} ({e.strerror or e}); on a machine without "
                                 f"internet, copy the repository here and use `tessera convert DIR -o OUT`") from None


def select_files(files: list[str], variant: str | None = None) -> list[str]:
    """The files of a repository a pull downloads: configs and vocabularies, and per folder the safetensors
    of `variant` where it has them, else the plain ones; in a diffusers repository (model_index.json), the
    root's single-file checkpoints are left out (the folders hold the same weights)."""
    keep = [f for f in files if f.endswith(KEEP)]
    diffusers = "model_index.json" in files
    weights = [f for f in keep if f.endswith(".safetensors") and not (diffusers and "/" not in f)]
    chosen = []
    for f in weights:
        stem = f.removesuffix(".safetensors")
        parts = stem.rsplit(".", 1)
        has_variant = len(parts) == 2 and parts[1] in ("fp16", "bf16", "fp32", "non_ema", "ema")
        if variant is None:
            if not has_variant:
                chosen.append(f)
        elif has_variant:
            if parts[1] == variant:
                chosen.append(f)
        elif f"{stem}.{variant}.safetensors" not in weights:
            chosen.append(f)
    return sorted([f for f in keep if not f.endswith(".safetensors")] + chosen)


def pull(repo_id: str, out: str | Path, revision: str | None = None, variant: str | None = None) -> Path:
    """Download `repo_id` (at `revision`) into OUT: the files `select_files` keeps, nothing else."""
    from huggingface_hub import HfApi, constants, snapshot_download

    if not repo_id or repo_id.count("/") != 1:
        raise InvalidInputError(f"{repo_id!r}: a hub repository is OWNER/NAME, e.g. stabilityai/sd-turbo")
    _reachable(constants.ENDPOINT)
    try:
        files = select_files(HfApi().list_repo_files(repo_id, revision=revision), variant)
        if not any(f.endswith(".safetensors") for f in files):
            raise ModelNotFoundError(f"{repo_id}: no safetensors weights (Tessera does not read pickled ones)")
        return Path(snapshot_download(repo_id, revision=revision, local_dir=str(out), allow_patterns=files))
    except ModelNotFoundError:
        raise
    except Exception as e:  # the hub client's errors (not found, gated, network): one line
        raise ModelNotFoundError(f"tessera pull {repo_id}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
