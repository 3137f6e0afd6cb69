"""A small offline stand-in for the Qwen3 tokenizer (no download): Qwen3's chat template text, its
special and added tokens as single tokens, and a byte-level BPE with no merges underneath (every other
byte is one token), so text round-trips exactly. Token *ids* differ from Qwen3's; the rendered text and
the token boundaries around every chat-control token match.

The template (tests/fixtures/qwen3_chat_template.jinja) is the `chat_template` of Qwen/Qwen3-4B's
tokenizer_config.json as published (2025 revision, with `message.content is string` guards), written
out from public copies of it and checked against two of them for the system/tools, tool-response and
generation-prompt branches the tool protocol uses.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

TEMPLATE_PATH = Path(__file__).parent / "fixtures" / "qwen3_chat_template.jinja"
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # Qwen3 special tokens the chat uses
ADDED = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]


@lru_cache(maxsize=1)
def qwen3_style_tokenizer():
    """A transformers PreTrainedTokenizerFast with Qwen3's chat template, eos <|im_end|>, pad <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIAL})
    fast.add_tokens(ADDED)
    fast.chat_template = TEMPLATE_PATH.read_text()
    return fast
