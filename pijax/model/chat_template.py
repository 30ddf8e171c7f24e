"""Chat templates: OpenAI-style `messages` -> prompt text, rendered as transformers renders them.

    template = ChatTemplate.from_dir("path/to/checkpoint")       # None if the model has none
    text = template.render(messages, add_generation_prompt=True)
    ids = tokenizer.encode(text, add_bos=False)                  # the template writes BOS itself

Where a checkpoint keeps its template, in the order transformers reads it: `chat_template.jinja`
beside the tokenizer files, else the `chat_template` entry of `tokenizer_config.json` (a string,
or a list of `{"name", "template"}` of which `default` is used).

Rendering follows transformers' `apply_chat_template`: a sandboxed Jinja2 environment with
`trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, `{% generation %}` blocks (they
only mark assistant text for training masks, so here they render their body), a `tojson` filter
that keeps non-ASCII text as is, the globals `raise_exception(message)` and
`strftime_now(format)`, and the variables `messages`, `add_generation_prompt`, `tools`,
`documents` plus the tokenizer's special tokens (`bos_token`, `eos_token`, `pad_token`,
`unk_token`). The rendered text is tokenized without adding BOS: templates write it themselves.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


class ChatTemplateError(ValueError):
    """The template cannot be loaded, or refuses these messages (its `raise_exception`)."""


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body (transformers uses the block
    to find assistant tokens; serving needs only the text)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message):
    raise ChatTemplateError(f"the chat template refused the messages: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, "jinja2.ext.loopcontrols"],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None):
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"chat template does not parse: {e}") from None
        self.source = source
        self.special_tokens = dict(special_tokens or {})

    @classmethod
    def from_dir(cls, path: str | Path) -> ChatTemplate | None:
        """The template of the checkpoint (or tokenizer) directory `path`; None if it has none."""
        path = Path(path)
        config = _read_json(path / TOKENIZER_CONFIG)
        specials = {k: _token_text(config.get(k)) for k in SPECIAL_TOKEN_KEYS}
        specials = {k: v for k, v in specials.items() if v is not None}
        file = path / TEMPLATE_FILE
        if file.is_file():
            return cls(file.read_text(encoding="utf-8"), specials)
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: use "default"
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if isinstance(source, str) and source:
            return cls(source, specials)
        return None

    @classmethod
    def from_file(cls, path: str | Path, special_tokens: Mapping[str, str] | None = None):
        return cls(Path(path).read_text(encoding="utf-8"), special_tokens)

    def render(
        self,
        messages: Sequence[Mapping],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping] | None = None,
        documents: Sequence[Mapping] | None = None,
        **extra,
    ) -> str:
        variables = {
            **self.special_tokens,
            **extra,
            "messages": [dict(m) for m in messages],
            "add_generation_prompt": add_generation_prompt,
            "tools": tools,
            "documents": documents,
        }
        try:
            return self._template.render(**variables)
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ChatTemplateError(f"{path}: not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # the serialized AddedToken form
        value = value.get("content")
    return value if isinstance(value, str) else None
