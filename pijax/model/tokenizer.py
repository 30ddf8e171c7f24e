"""Tokenizers: text <-> token ids, and streaming text deltas.

Two implementations of one small protocol (`TokenizerLike`):
  * `Tokenizer` wraps a Hugging Face `tokenizers.Tokenizer` read from `tokenizer.json`;
  * `ByteTokenizer` needs no file: ids 0..255 are the UTF-8 bytes, then `<bos>`, `<eos>`, `<pad>`.
    It is the tokenizer of the random-initialized presets.

`IncrementalDetokenizer` turns a growing list of generated ids into text deltas for streaming. It
never emits half of a UTF-8 character, and its deltas, concatenated (with `flush()` at the end),
equal `decode(all_ids)`.

This module knows nothing of models, requests or stop strings (the engine checks those on text).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import tokenizers

REPLACEMENT_CHAR = "\ufffd"


@runtime_checkable
class TokenizerLike(Protocol):
    """What the engine needs of a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def bos_token_id(self) -> int | None: ...

    @property
    def eos_token_ids(self) -> tuple[int, ...]: ...

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; `add_bos=None` follows the tokenizer's own default."""
        ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class Tokenizer:
    """A `tokenizer.json` tokenizer (BPE, Unigram, WordPiece, ... whatever `tokenizers` reads).

    BOS is added by this class, not by the file's post-processor, so `encode(text, add_bos=False)`
    never carries it. `add_bos=None` adds it when the original tokenizer would (its
    `tokenizer_config.json` `add_bos_token`, else whether its post-processor prepends BOS).
    """

    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_ids: Sequence[int] = (),
        add_bos_default: bool | None = None,
    ):
        self._tok = tok
        self._bos = bos_token_id
        self._eos = tuple(int(i) for i in eos_token_ids)
        if add_bos_default is None:
            add_bos_default = self._post_processor_adds_bos()
        self._add_bos_default = bool(add_bos_default) and bos_token_id is not None

    @classmethod
    def from_file(
        cls, path: str | Path, *, bos_token_id: int | None = None, eos_token_ids: Sequence[int] = ()
    ) -> Tokenizer:
        """Read `tokenizer.json` (and `tokenizer_config.json` beside it, when present).

        Raises `ValueError` naming the file when it is missing or unreadable.
        """
        path = Path(path)
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on missing or bad files
            raise ValueError(f"{path}: cannot read tokenizer: {e}") from e
        add_bos, bos_text = _read_tokenizer_config(path.parent / "tokenizer_config.json")
        if bos_token_id is None and bos_text is not None:
            bos_token_id = tok.token_to_id(bos_text)
        return cls(
            tok, bos_token_id=bos_token_id, eos_token_ids=eos_token_ids, add_bos_default=add_bos
        )

    def _post_processor_adds_bos(self) -> bool:
        if self._bos is None:
            return False
        ids = self._tok.encode("a", add_special_tokens=True).ids
        return bool(ids) and ids[0] == self._bos

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos

    @property
    def add_bos_default(self) -> bool:
        return self._add_bos_default

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos is None:
            add_bos = self._add_bos_default
        if add_bos:
            if self._bos is None:
                raise ValueError("add_bos=True but this tokenizer has no bos_token_id")
            ids = [self._bos, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def to_json_str(self) -> str:
        """The `tokenizer.json` text (for grammar engines that build their own token tables)."""
        return self._tok.to_str()


def _read_tokenizer_config(path: Path) -> tuple[bool | None, str | None]:
    """(`add_bos_token`, the BOS token's text) from `tokenizer_config.json`, when given."""
    if not path.is_file():
        return None, None
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e
    bos = cfg.get("bos_token")
    if isinstance(bos, dict):  # the serialized `AddedToken` form
        bos = bos.get("content")
    add_bos = cfg.get("add_bos_token")
    return (bool(add_bos) if add_bos is not None else None), (bos if isinstance(bos, str) else None)


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are bytes, then `<bos>`=256, `<eos>`=257, `<pad>`=258.

    Ids from 259 up to the model's vocabulary size (padding rows) decode to nothing.
    """

    NUM_BYTES = 256
    BOS, EOS, PAD = 256, 257, 258
    SPECIALS = {BOS: "<bos>", EOS: "<eos>", PAD: "<pad>"}

    def __init__(self, add_bos_default: bool = True):
        self._add_bos_default = add_bos_default

    @property
    def vocab_size(self) -> int:
        return self.NUM_BYTES + len(self.SPECIALS)

    @property
    def bos_token_id(self) -> int:
        return self.BOS

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return (self.EOS,)

    @property
    def pad_token_id(self) -> int:
        return self.PAD

    @property
    def add_bos_default(self) -> bool:
        return self._add_bos_default

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = list(text.encode("utf-8"))
        if self._add_bos_default if add_bos is None else add_bos:
            ids.insert(0, self.BOS)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out, pending = [], bytearray()
        for i in ids:
            i = int(i)
            if i < 0:
                raise ValueError(f"token id must be >= 0; got {i}")
            if i < self.NUM_BYTES:
                pending.append(i)
                continue
            if not skip_special_tokens and i in self.SPECIALS:
                out.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
                out.append(self.SPECIALS[i])
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)


class IncrementalDetokenizer:
    """Text deltas of a growing id sequence, for streaming.

    Decoding token by token breaks on multi-byte characters split across tokens, and decoding
    everything each step is quadratic. Instead, each step decodes a short window: the ids from the
    start of the previously emitted token run (`_prefix_offset`) to the end. The window's text
    minus the text of its already-emitted part (`_read_offset`) is the delta. Starting the window
    one run back keeps context-dependent decoders (a SentencePiece leading-space strip) consistent
    between the two decodes. A delta is held back while the window's text ends in U+FFFD, i.e.
    while the last character's bytes are incomplete; `flush()` releases it when the sequence ends.

    Invariant: `"".join(all deltas) + flush() == tokenizer.decode(all ids)` for decoders whose
    output over a run of tokens does not depend on tokens before the run (byte-level BPE, byte
    fallback, bytes).
    """

    def __init__(self, tokenizer: TokenizerLike, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start: where the last emitted run of ids began
        self._read_offset = 0  # ids before this have been emitted as text
        self._text_parts: list[str] = []

    @property
    def token_ids(self) -> list[int]:
        return list(self._ids)

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._text_parts)

    def step(self, new_ids: int | Sequence[int]) -> str:
        """Append one or more ids; return the newly complete text (possibly empty)."""
        if isinstance(new_ids, int):
            new_ids = (new_ids,)
        self._ids.extend(int(i) for i in new_ids)
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        full_text = self._decode(self._prefix_offset, len(self._ids))
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT_CHAR):
            return ""
        delta = full_text[len(prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._text_parts.append(delta)
        return delta

    def flush(self) -> str:
        """Release held-back text (a trailing incomplete character decodes as U+FFFD)."""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        full_text = self._decode(self._prefix_offset, len(self._ids))
        delta = full_text[len(prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        if delta:
            self._text_parts.append(delta)
        return delta

    def _decode(self, start: int, stop: int) -> str:
        if start >= stop:
            return ""
        return self._tok.decode(self._ids[start:stop], skip_special_tokens=self._skip)
