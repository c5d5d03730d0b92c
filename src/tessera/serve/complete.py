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
    """Suggestions from the captions (shared) and from accepted prompts, which are scoped to their owner:
    an API key's prompts are suggested to that key only (`owner` = its key id; None = the local user of a
    server without keys)."""

    def __init__(self, phrases: dict[str, int], words: dict[str, int], accepted: list[str] = (),
                 owned: list[tuple[str | None, str]] = ()):
        self.phrases = _PrefixIndex(phrases)
        self.words = _PrefixIndex(words)
        self._accepted: dict[str | None, Counter] = {}
        self._index: dict[str | None, _PrefixIndex] = {}
        self._lock = threading.Lock()
        for owner, p in [*((None, p) for p in accepted), *owned]:
            self._accepted.setdefault(owner, Counter())[normalise(p)] += 1
        for owner in self._accepted:
            self._reindex(owner)

    @classmethod
    def from_vocab(cls, owned: list[tuple[str | None, str]] = ()) -> "Completer":
        vocab = json.loads(resources.files("tessera.prompts").joinpath("caption_vocab.json").read_text())
        words = Counter(vocab["emoji"]) + Counter(vocab["other"])
        return cls(vocab.get("phrases", {}), dict(words), owned=owned)

    def _reindex(self, owner: str | None) -> None:
        self._index[owner] = _PrefixIndex({k: v for k, v in self._accepted[owner].items() if k})

    def add(self, prompt: str, owner: str | None = None) -> None:
        """A prompt `owner` generated with: suggested to them from now on (more uses rank it higher)."""
        with self._lock:
            self._accepted.setdefault(owner, Counter())[normalise(prompt)] += 1
            self._reindex(owner)

    def suggest(self, q: str, k: int = 8, owner: str | None = None) -> list[str]:
        """Whole prompts that continue what was typed (`owner`'s accepted prompts first, then captions),
        then the typed text with its last word completed from the caption vocabulary."""
        typed = normalise(q)
        if not typed:
            return []
        out: list[str] = []

        def put(items):
            for s in items:
                if s != typed and s not in out and len(out) < k:
                    out.append(s)

        if owner in self._index:
            put(self._index[owner].top(typed, k))
        put(self.phrases.top(typed, k))
        if not q.endswith(" "):
            head, _, last = typed.rpartition(" ")
            put((f"{head} {w}" if head else w) for w in self.words.top(last, k))
        return out
