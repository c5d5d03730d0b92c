"""Write src/tessera/prompts/caption_vocab.json: how often each word appears in the captions of the
training data, split by style (emoji names vs. the other captions: Tux Paint photo cut-outs and nature
photos), and the distinct captions themselves ("phrases", for the server's prompt auto-complete). Prompt
enhancement adds only details this vocabulary knows.

    .venv/bin/python scripts/build_prompt_vocab.py data/demo128
"""
import json
import re
import sqlite3
import sys
from collections import Counter
from pathlib import Path

data = Path(sys.argv[1] if len(sys.argv) > 1 else "data/demo128")
db = sqlite3.connect(data / "catalog.sqlite")
captions = [r[0] or "" for r in db.execute("SELECT caption FROM images WHERE status='kept'")]
emoji, other = Counter(), Counter()
for c in captions:
    words = set(re.findall(r"[a-z]+", c.lower()))
    (emoji if "emoji" in words else other).update(words)
out = Path(__file__).resolve().parents[1] / "src" / "tessera" / "prompts" / "caption_vocab.json"
phrases = Counter(" ".join(re.findall(r"[\w'-]+", c.lower())) for c in captions)
out.write_text(json.dumps({"source": str(data), "captions": len(captions), "emoji": dict(sorted(emoji.items())),
                           "other": dict(sorted(other.items())),
                           "phrases": dict(sorted(p for p in phrases.items() if p[0]))}, indent=0) + "\n")
print(out, len(emoji), len(other))
