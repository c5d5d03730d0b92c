"""Prompt rewriting before text encoding: enhancement (enhance.py) and fairness diversification
(fairness.py). Both are deterministic and report what they changed."""
from tessera.prompts.enhance import ClipBudget, Enhanced, enhance
from tessera.prompts.fairness import diversify

__all__ = ["ClipBudget", "Enhanced", "enhance", "diversify"]
