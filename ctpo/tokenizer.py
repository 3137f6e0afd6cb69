"""Tokenizers behind one small interface: `encode(str) -> list[int]`, `encode_plain(str) -> list[int]`,
`decode(ids) -> str`, `eos_token_id`, `pad_token_id`, `vocab_size`, `save(dir)`.

`encode` reads chat-control strings (`<|im_end|>`, `</tool_response>`, ...) as their special tokens, as a
prompt template needs; `encode_plain` never produces a special or added token: text a program printed
stays text (issue 21: a printed `<|im_end|>` would otherwise end the turn in the next prompt).

- `CharTokenizer`: the toy model's tokenizer, built locally (no hub): one id per printable ASCII
  character plus Qwen3's chat special tokens, each a single id, so the Qwen3 chat format renders
  identically for the toy model and for Qwen3.
- `HFTokenizer`: wraps a transformers tokenizer (Qwen3 on GPU) with the same interface.

The chat format itself (system prompt, template strings) lives in `configs/tir/`, rendered by
`ctpo.agent.template`; tokenizers only map text to ids.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

# Qwen3's chat special tokens (same strings as the Qwen3 tokenizer's added tokens).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
PAD = "<|endoftext|>"
EOS = "<|im_end|>"
_CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
TOKENIZER_FILE = "ctpo_char_tokenizer.json"
CHAT_TEMPLATE = (  # Qwen3's message layout (configs/tir/*.yaml `chat:`), for verl's dataset length checks
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class CharTokenizer:
    """Character-level tokenizer: specials first, then '\\n' and printable ASCII. Unknown chars map to '?'."""

    def __init__(self) -> None:
        self.vocab = list(SPECIAL_TOKENS) + list(_CHARS)
        self._id = {tok: i for i, tok in enumerate(self.vocab)}
        self.pad_token_id = self._id[PAD]
        self.eos_token_id = self._id[EOS]
        self.vocab_size = len(self.vocab)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        i, n = 0, len(text)
        while i < n:
            if text[i] == "<":
                for sp in SPECIAL_TOKENS:
                    if text.startswith(sp, i):
                        ids.append(self._id[sp])
                        i += len(sp)
                        break
                else:
                    ids.append(self._id["<"])
                    i += 1
                continue
            ids.append(self._id.get(text[i], self._id["?"]))
            i += 1
        return ids

    def encode_plain(self, text: str) -> list[int]:
        """One character id per character, `<` included: no special token."""
        unknown = self._id["?"]
        return [self._id.get(c, unknown) if len(c) == 1 else unknown for c in text]

    def decode(self, ids) -> str:
        return "".join(self.vocab[i] for i in ids if 0 <= i < self.vocab_size)

    def save(self, directory: str | Path) -> None:
        """Our file, plus the same tokenizer in transformers' format (`AutoTokenizer.from_pretrained(dir)`,
        which verl loads): the toy policy dir is a model dir for verl as it is for our own trainer."""
        from ctpo.io import write_json

        write_json(Path(directory) / TOKENIZER_FILE, {"kind": "char", "vocab": self.vocab})
        self.to_hf().save_pretrained(str(directory))

    def to_hf(self):
        """A transformers fast tokenizer with the same ids, encoding and decoding (one id per character,
        the chat specials as special tokens) and a Qwen3-style chat template."""
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.WordLevel(vocab=dict(self._id), unk_token="?"))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        tok.add_special_tokens(list(SPECIAL_TOKENS))
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token=EOS, pad_token=PAD, clean_up_tokenization_spaces=False,
            chat_template=CHAT_TEMPLATE,
        )

    @classmethod
    def load(cls, directory: str | Path) -> "CharTokenizer":
        path = Path(directory) / TOKENIZER_FILE
        data = json.loads(path.read_text())
        tok = cls()
        if data.get("vocab") != tok.vocab:
            raise ValueError(f"{path}: vocabulary differs from this version's CharTokenizer")
        return tok


class HFTokenizer:
    """A transformers tokenizer (e.g. Qwen3) behind the same interface. Imported lazily."""

    def __init__(self, name_or_path: str) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(name_or_path)
        self.eos_token_id = self._tok.convert_tokens_to_ids(EOS)
        self.pad_token_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else self.eos_token_id
        self.vocab_size = len(self._tok)

    @property
    def hf(self):
        """The wrapped transformers tokenizer (chat template, apply_chat_template) for verl's agent loops."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def encode_plain(self, text: str) -> list[int]:
        return hf_encode_plain(self._tok, text)

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def save(self, directory: str | Path) -> None:
        self._tok.save_pretrained(str(directory))


def hf_encode_plain(tok, text: str) -> list[int]:
    """Ids of `text` in a transformers tokenizer with no special or added token among them (Qwen3's
    `<tool_response>` is an added token that `split_special_tokens` would still match): each occurrence
    of an added token's string is encoded as its first character, then the rest, so it decodes to the
    same text. Everything else is encoded as usual."""
    added = sorted(tok.get_added_vocab(), key=len, reverse=True)
    if not added:
        return tok.encode(text, add_special_tokens=False)
    ids: list[int] = []
    pos = 0
    for m in re.finditer("|".join(map(re.escape, added)), text):
        if m.start() > pos:
            ids += tok.encode(text[pos : m.start()], add_special_tokens=False)
        ids += tok.encode(m.group()[0], add_special_tokens=False) + hf_encode_plain(tok, m.group()[1:])
        pos = m.end()
    if pos < len(text):
        ids += tok.encode(text[pos:], add_special_tokens=False)
    return ids


def load_tokenizer(directory_or_name: str | Path):
    """CharTokenizer if the directory holds ours, else a transformers tokenizer."""
    p = Path(directory_or_name)
    if (p / TOKENIZER_FILE).is_file():
        return CharTokenizer.load(p)
    return HFTokenizer(str(directory_or_name))
