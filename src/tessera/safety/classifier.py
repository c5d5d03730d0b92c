"""The prompt-policy classifier (seed 004 "Prompt safety service"): a small MLP over the frozen prompt
encoder's pooled sentence vector (all-MiniLM-L6-v2), trained on Tessera's own labelled prompt set
(`safety/policy_prompts.tsv`, `tessera train safety`).

    pooled [B,D] -> Linear -> GELU -> Linear -> logits [B, 1 + K]   (class 0 = allowed, 1..K = policy categories)
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from tessera.config import Config
from tessera.registry import register_family, register_preset

POLICY = ("violence", "sexual", "hate", "self_harm", "illegal")


@dataclasses.dataclass
class PromptSafetyConfig(Config):
    text_encoder: str = "minilm"
    text_dim: int = 384
    hidden: int = 128
    dropout: float = 0.1
    categories: tuple[str, ...] = POLICY     # the policy categories; "benign" is class 0

    def __post_init__(self):
        if not self.categories or "benign" in self.categories:
            raise ValueError(f"categories {self.categories} must be non-empty policy names ('benign' is implicit)")

    @property
    def labels(self) -> tuple[str, ...]:
        return ("benign", *self.categories)


@register_family("prompt-safety", PromptSafetyConfig, role="safety")
class PromptSafetyClassifier(nn.Module):
    def __init__(self, config: PromptSafetyConfig):
        super().__init__()
        self.config = c = config
        self.net = nn.Sequential(nn.Linear(c.text_dim, c.hidden), nn.GELU(), nn.Dropout(c.dropout),
                                 nn.Linear(c.hidden, len(c.labels)))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """[B,D] pooled sentence vectors -> [B, 1+K] logits."""
        return self.net(pooled)

# the prompt-policy classifier over MiniLM sentence vectors (safety/)
register_preset("prompt-safety", "prompt-safety", weights=True, text_dim=384, hidden=128)
