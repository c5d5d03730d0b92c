"""The prompt-encoder protocol and prompt validation."""
from __future__ import annotations

import dataclasses
from typing import Protocol

import torch

MAX_PROMPT_WORDS = 128  # seed 004: prompts up to 128 words


class PromptError(ValueError):
    """A prompt that breaks a rule (type, emptiness is allowed, length)."""


@dataclasses.dataclass
class TextEncoding:
    tokens: torch.Tensor   # [B, L, D] token states
    mask: torch.Tensor     # [B, L] bool, True = real token
    pooled: torch.Tensor   # [B, D]


class TextEncoder(Protocol):
    name: str
    dim: int
    max_tokens: int

    def encode(self, prompts: list[str]) -> TextEncoding: ...


def check_prompts(prompts: list[str] | str, max_words: int = MAX_PROMPT_WORDS) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    out = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise PromptError(f"prompt #{i} must be a string, got {type(p).__name__}")
        n = len(p.split())
        if n > max_words:
            raise PromptError(f"prompt #{i} has {n} words; the limit is {max_words} (it is not silently cut)")
        out.append(p)
    return out
