"""Training task for the AR generator: next-token cross-entropy over cached token grids (seed 000),
prompts from the caption-embedding cache, captions dropped for `cond_drop` of the samples (CFG)."""
from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tessera.config import Config
from tessera.eval.metrics import margin_stats
from tessera.generators.ar import ARTransformer
from tessera.text.cache import load_caption_cache, trim_padding


@dataclasses.dataclass
class ARTaskConfig(Config):
    tokens: str = ""               # DATA/tokens/<name> folder written by `tessera tokenize` ('' = the only one)
    text: str = "minilm"           # DATA/text/<name> folder written by `tessera data embed-captions`
    cond_drop: float = 0.1         # caption -> null condition (classifier-free guidance training)
    val_images: int = 256


def cache_subdir(parent: Path, what: str) -> Path:
    subs = sorted(p for p in parent.glob("*") if p.is_dir()) if parent.is_dir() else []
    if len(subs) != 1:
        raise FileNotFoundError(f"{parent}: expected exactly one {what} cache, found {[p.name for p in subs]}; "
                                f"name it with --set task.{what}=NAME")
    return subs[0]


class TokenTextData:
    """Token grids + caption embeddings of a prepared folder, aligned by image key, split by catalog."""

    def __init__(self, data_dir: str | Path, cfg: ARTaskConfig, conditional: bool):
        root = Path(data_dir)
        tok_dir = root / "tokens" / cfg.tokens if cfg.tokens else cache_subdir(root / "tokens", "tokens")
        if not (tok_dir / "index.json").is_file():
            raise FileNotFoundError(f"{tok_dir}: no token cache; run `tessera tokenize --data {root}` first")
        index = json.loads((tok_dir / "index.json").read_text())
        self.keys: list[str] = index["keys"]
        self.tokens = torch.from_numpy(np.load(tok_dir / "tokens.npy").astype(np.int64))  # (N, h, w)
        self.codebook_size, self.grid = index["codebook_size"], tuple(index["grid"])
        db = sqlite3.connect(root / "catalog.sqlite")
        split = dict(db.execute("SELECT id, split FROM images WHERE status='kept'"))
        db.close()
        self.split = np.array([split[k] for k in self.keys])
        self.cond = self.mask = None
        if conditional:
            self.cond, self.mask, self.text_dim = load_caption_cache(root, cfg.text, self.keys)

    def indices(self, split: str) -> np.ndarray:
        return np.nonzero(self.split == split)[0]

    def check(self, mc) -> "TokenTextData":
        """Fail loudly when the caches do not fit the model config `mc` (vocabulary, grid, text width)."""
        if self.codebook_size != mc.vocab_size or self.grid != tuple(mc.grid):
            raise ValueError(f"token cache has vocab {self.codebook_size}, grid {self.grid}; the model "
                             f"expects vocab {mc.vocab_size}, grid {tuple(mc.grid)}")
        if mc.conditional and self.text_dim != mc.cond_dim:
            raise ValueError(f"caption cache is {self.text_dim}-d; the model expects cond_dim={mc.cond_dim}")
        return self


class TokenSplit(torch.utils.data.Dataset):
    def __init__(self, data: TokenTextData, idx: np.ndarray):
        self.data, self.idx = data, idx

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, item: tuple[int, int]):
        j = int(self.idx[item[0]])
        tokens = self.data.tokens[j].flatten()
        if self.data.cond is None:
            return tokens
        return tokens, self.data.cond[j].float(), self.data.mask[j]


class ARTask:
    def __init__(self, model: ARTransformer, data_dir: str | Path, cfg: ARTaskConfig):
        self.model, self.cfg = model, cfg
        mc = model.config
        self.data = TokenTextData(data_dir, cfg, mc.conditional).check(mc)
        self.dataset = TokenSplit(self.data, self.data.indices("train"))
        self.val_idx = self.data.indices("val")[: cfg.val_images]

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def optim_groups(self) -> dict[str, list]:
        return {"model": list(self.model.parameters())}

    def _nll(self, model: ARTransformer, tokens, cond=None, mask=None, drop=None) -> torch.Tensor:
        """Per-image mean token NLL [B]."""
        if mask is not None:
            cond, mask = trim_padding(cond, mask)
        logits = model(tokens[:, :-1], cond, mask, drop) if model.config.conditional else model(tokens[:, :-1])
        target = tokens if model.config.conditional else tokens[:, 1:]
        nll = F.cross_entropy(logits.float().transpose(1, 2), target, reduction="none")  # (B, N)
        return nll.mean(1)

    def losses(self, batch, step: int):
        if self.model.config.conditional:
            tokens, cond, mask = batch
            drop = (torch.rand(tokens.shape[0]) < self.cfg.cond_drop).to(tokens.device)
            loss = self._nll(self.model, tokens, cond, mask, drop).mean()
        else:
            loss = self._nll(self.model, batch).mean()
        return {"model": loss}, {"loss": float(loss.detach())}

    @torch.no_grad()
    def caption_margin(self, model: ARTransformer, batch_size: int = 32) -> dict[str, float]:
        """Held-out mean token NLL with the true caption vs. a shuffled caption (a derangement)."""
        model.eval()
        idx = torch.as_tensor(self.val_idx)
        if len(idx) < 2:
            raise ValueError("need at least 2 held-out images for the caption test")
        perm = torch.roll(torch.arange(len(idx)), 1)  # every image gets another image's caption
        true_nll, shuf_nll = [], []
        for s in range(0, len(idx), batch_size):
            j = idx[s:s + batch_size]
            tokens = self.data.tokens[j].flatten(1)
            if not model.config.conditional:
                true_nll.append(self._nll(model, tokens))
                continue
            k = idx[perm[s:s + batch_size]]
            true_nll.append(self._nll(model, tokens, self.data.cond[j].float(), self.data.mask[j]))
            shuf_nll.append(self._nll(model, tokens, self.data.cond[k].float(), self.data.mask[k]))
        t = torch.cat(true_nll)
        if not shuf_nll:
            return {"nll_true": float(t.mean()), "images": len(t)}
        m = margin_stats(t, torch.cat(shuf_nll))
        return {"nll_true": m.pop("true"), "nll_shuffled": m.pop("shuffled"), **m}

    def validate(self, model: ARTransformer, out_dir: Path, step: int) -> dict[str, float]:
        if len(self.val_idx) < 2:
            return {}
        m = self.caption_margin(model)
        return {k: v for k, v in m.items() if k != "images"}


# what `tessera train ar` runs (train/runs.py finds it by the task name)
Task, TaskConfig, DEFAULT_PRESET = ARTask, ARTaskConfig, "ar-s"
