"""Prompt auto-complete (seed 004): suggestions while the user types, from the training captions
(`prompts/caption_vocab.json`: the distinct captions and their words) and from prompts users had
accepted (succeeded jobs). Sorted arrays + binary search over the prefix: well under a millisecond per
keystroke (benchmarks/bench_serve.py measures it)."""
from __future__ import annotations

import bisect
import heapq
import json
import re
import threading
from collections import Counter
from importlib import resources


def normalise(text: str) -> str:
    return " ".join(re.findall(r"[\w'-]+", text.lower()))


class _PrefixIndex:
    """Strings with weights; the k heaviest strings that start with a prefix."""

    def __init__(self, weights: dict[str, float]):
        self.keys = sorted(weights)
        self.weights = [weights[k] for k in self.keys]

    def top(self, prefix: str, k: int, scan: int = 4000) -> list[str]:
        lo = bisect.bisect_left(self.keys, prefix)
        hi = bisect.bisect_left(self.keys, prefix + "\uffff", lo)
        idx = range(lo, min(hi, lo + scan))
        return [self.keys[i] for i in heapq.nlargest(k, idx, key=lambda i: (self.weights[i], -i))]


class Completer:
    def __init__(self, phrases: dict[str, int], words: dict[str, int], accepted: list[str] = ()):
        self.phrases = _PrefixIndex(phrases)
        self.words = _PrefixIndex(words)
        self._accepted: Counter = Counter()
        self._accepted_index = _PrefixIndex({})
        self._lock = threading.Lock()
        for p in accepted:
            self._accepted[normalise(p)] += 1
        self._reindex()

    @classmethod
    def from_vocab(cls, accepted: list[str] = ()) -> "Completer":
        vocab = json.loads(resources.files("tessera.prompts").joinpath("caption_vocab.json").read_text())
        words = Counter(vocab["emoji"]) + Counter(vocab["other"])
        return cls(vocab.get("phrases", {}), dict(words), accepted)

    def _reindex(self) -> None:
        self._accepted_index = _PrefixIndex({k: v for k, v in self._accepted.items() if k})

    def add(self, prompt: str) -> None:
        """A prompt a user generated with: it is suggested from now on (more uses rank it higher)."""
        with self._lock:
            self._accepted[normalise(prompt)] += 1
            self._reindex()

    def suggest(self, q: str, k: int = 8) -> list[str]:
        """Whole prompts that continue what was typed (accepted prompts first, then captions), then the
        typed text with its last word completed from the caption vocabulary."""
        typed = normalise(q)
        if not typed:
            return []
        out: list[str] = []

        def put(items):
            for s in items:
                if s != typed and s not in out and len(out) < k:
                    out.append(s)

        put(self._accepted_index.top(typed, k))
        put(self.phrases.top(typed, k))
        if not q.endswith(" "):
            head, _, last = typed.rpartition(" ")
            put((f"{head} {w}" if head else w) for w in self.words.top(last, k))
        return out
