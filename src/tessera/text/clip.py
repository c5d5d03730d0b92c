"""Stable Diffusion's prompt encoder: `transformers`' CLIP text model and tokenizer, loaded from a
checkpoint's own `text_encoder/` and `tokenizer/` folders (never rewritten here), behind Tessera's
text-encoder protocol. As SD was trained: every prompt padded to the tokenizer's 77 positions and all of
them attended to, the last hidden state (or, with `clip_skip` k, the hidden state k layers before the
last, through the final LayerNorm, as diffusers does; aMUSEd takes the penultimate state without it,
`final_norm=False`). Prompts longer than 77 tokens are refused, not cut.
"""
from __future__ import annotations

from pathlib import Path

import torch

from tessera.text.base import PromptError, TextEncoding, check_prompts


class CLIPPromptEncoder:
    def __init__(self, text_model, tokenizer, name: str = "clip", clip_skip: int | None = None, final_norm: bool = True):
        self.model, self.tokenizer = text_model.eval().requires_grad_(False), tokenizer
        self.name, self.clip_skip, self.final_norm = name, clip_skip, final_norm
        self.dim = int(text_model.config.hidden_size)
        self.max_tokens = int(tokenizer.model_max_length)
        if clip_skip is not None and not 0 <= clip_skip < text_model.config.num_hidden_layers:
            raise ValueError(f"clip_skip={clip_skip}: must be between 0 and {text_model.config.num_hidden_layers - 1}")

    @classmethod
    def from_folders(cls, text_encoder_dir: str | Path, tokenizer_dir: str | Path, clip_skip: int | None = None,
                     dtype: torch.dtype = torch.float32, variant: str | None = None,
                     final_norm: bool = True) -> "CLIPPromptEncoder":
        """`CLIPTextModel` (or `...WithProjection`) and `CLIPTokenizer` from local folders only."""
        from transformers import AutoConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        try:
            arch = (AutoConfig.from_pretrained(str(text_encoder_dir), local_files_only=True).architectures or [""])[0]
            model_cls = CLIPTextModelWithProjection if arch == "CLIPTextModelWithProjection" else CLIPTextModel
            model = model_cls.from_pretrained(str(text_encoder_dir), local_files_only=True, dtype=dtype,
                                              use_safetensors=True, variant=variant)
            tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        except OSError as e:
            raise FileNotFoundError(f"CLIP text encoder in {text_encoder_dir} / {tokenizer_dir}: {e}") from None
        return cls(model, tokenizer, name=str(text_encoder_dir), clip_skip=clip_skip, final_norm=final_norm)

    def save(self, folder: str | Path) -> dict:
        """The model (safetensors) and tokenizer files in one folder, as `from_folders(folder, folder)` reads
        them; -> the record a pipeline folder keeps beside them (text_encoder.json)."""
        self.model.save_pretrained(str(folder), safe_serialization=True)
        self.tokenizer.save_pretrained(str(folder))
        return {"name": self.name, "format": "transformers-clip", "clip_skip": self.clip_skip,
                "final_norm": self.final_norm}

    def token_counts(self, prompts: list[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(prompts, truncation=False, verbose=False)["input_ids"]]

    @torch.no_grad()
    def encode(self, prompts: list[str] | str) -> TextEncoding:
        prompts = check_prompts(prompts)
        too_long = [n for n in self.token_counts(prompts) if n > self.max_tokens]
        if too_long:
            raise PromptError(f"a prompt encodes to {too_long[0]} tokens; {self.name} takes at most {self.max_tokens}")
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.max_tokens, truncation=False,
                             return_tensors="pt")["input_ids"]
        device = next(self.model.parameters()).device
        if self.clip_skip is None:
            out = self.model(ids.to(device))
            states = out.last_hidden_state
        else:
            out = self.model(ids.to(device), output_hidden_states=True)
            states = out.hidden_states[-(self.clip_skip + 1)]
            if self.final_norm:
                states = getattr(self.model, "text_model", self.model).final_layer_norm(states)  # transformers 4 | 5
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        states = states.float()  # (B, 77, D)
        return TextEncoding(states, torch.ones(states.shape[:2], dtype=torch.bool, device=states.device), pooled.float())
