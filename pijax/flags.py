"""The engine's command-line flags, declared once for every script.

    from pijax import flags as engine_flags
    engine_flags.define_engine_flags()                      # at import, beside the script's own
    ...
    engine = Engine.from_source(engine_flags.model_source(), engine_flags.engine_config())

Each flag defaults to None ("the config's default"), so only what the command line sets becomes
an override, and a script's preset (the bench's) keeps everything else. The overrides go through
`config.engine_config_from_overrides`, the one parser `LLM(...)` uses too: a bad value fails there
with the field and the allowed values. A script that gives a flag another meaning (generate's
sampling `--seed`, the bench's list-valued `--kv_cache_dtype`) leaves it out with `exclude`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from absl import flags

from pijax.config import (
    DEFAULT_MODEL,
    AttentionImpl,
    DType,
    EngineConfig,
    KVCacheDType,
    engine_config_from_overrides,
    parse_mesh,
)


@dataclasses.dataclass(frozen=True)
class _Flag:
    name: str
    define: Callable[..., Any]
    help: str
    key: str | None = None  # the override key (default: the flag's name)
    parse: Callable[[Any], Any] = lambda v: v
    enum_values: tuple[str, ...] | None = None
    is_override: bool = True  # False: read by the script itself (`model_source`)


def _values(e) -> tuple[str, ...]:
    return tuple(m.value for m in e)


ENGINE_FLAGS: tuple[_Flag, ...] = (
    _Flag(
        "model",
        flags.DEFINE_string,
        "HF checkpoint dir, converted orbax dir, or preset name (default: the embedded default "
        "model).",
        is_override=False,
    ),
    _Flag(
        "mesh",
        flags.DEFINE_string,
        "Device mesh 'DATA,MODEL' (default 1,1).",
        "mesh_shape",
        parse_mesh,
    ),
    _Flag("dtype", flags.DEFINE_enum, "Weight and activation dtype.", enum_values=_values(DType)),
    _Flag(
        "attention_impl",
        flags.DEFINE_enum,
        "Attention path (auto: the Pallas kernel on GPU/TPU, the reference on CPU).",
        enum_values=_values(AttentionImpl),
    ),
    _Flag("page_size", flags.DEFINE_integer, "KV page size in tokens."),
    _Flag(
        "num_pages",
        flags.DEFINE_integer,
        "KV pool pages per data shard (default: a memory fraction).",
    ),
    _Flag("memory_fraction", flags.DEFINE_float, "Share of free device memory for the KV pool."),
    _Flag(
        "kv_cache_dtype",
        flags.DEFINE_enum,
        "KV cache dtype (a quantized one needs a passing quality gate to serve).",
        enum_values=_values(KVCacheDType),
    ),
    _Flag("enable_prefix_reuse", flags.DEFINE_bool, "Reuse cached prompt prefixes."),
    _Flag("enable_chunked_prefill", flags.DEFINE_bool, "Split long prompts over steps."),
    _Flag("max_num_seqs", flags.DEFINE_integer, "Sequences per step (per data shard)."),
    _Flag(
        "max_num_batched_tokens", flags.DEFINE_integer, "Token budget per step (per data shard)."
    ),
    _Flag("max_model_len", flags.DEFINE_integer, "Prompt + completion tokens per request."),
    _Flag("max_waiting", flags.DEFINE_integer, "Queued requests before refusing new ones."),
    _Flag(
        "overlap_scheduling",
        flags.DEFINE_bool,
        "Schedule step N+1 while the device runs step N (default on; off: synchronous loop).",
    ),
    _Flag(
        "audit_log",
        flags.DEFINE_string,
        "Append the prefix-reuse audit log to this file.",
        "audit_log_path",
    ),
    _Flag(
        "compilation_cache_dir",
        flags.DEFINE_string,
        "Persistent JAX compilation cache directory (default: $PIJAX_COMPILATION_CACHE, else "
        "~/.cache/pijax/jax under $XDG_CACHE_HOME); 'off' disables it.",
    ),
    _Flag("seed", flags.DEFINE_integer, "Engine seed (random presets, unseeded sampling)."),
)
_BY_NAME = {f.name: f for f in ENGINE_FLAGS}


def _check_names(names: Iterable[str], what: str) -> None:
    unknown = sorted(set(names) - set(_BY_NAME))
    if unknown:
        raise ValueError(f"{what}: unknown engine flag(s) {unknown}; allowed: {sorted(_BY_NAME)}")


def define_engine_flags(
    *,
    exclude: Iterable[str] = (),
    defaults: dict[str, Any] | None = None,
    flag_values: flags.FlagValues = flags.FLAGS,
) -> None:
    """Declare the engine flags (all but `exclude`); `defaults` replaces a flag's None default
    (a set default counts as an override like a command-line value)."""
    exclude, defaults = set(exclude), dict(defaults or {})
    _check_names(exclude, "exclude")
    _check_names(defaults, "defaults")
    for f in ENGINE_FLAGS:
        if f.name in exclude:
            continue
        default = defaults.get(f.name)
        if f.enum_values is not None:
            f.define(f.name, default, list(f.enum_values), f.help, flag_values=flag_values)
        else:
            f.define(f.name, default, f.help, flag_values=flag_values)


def engine_overrides(flag_values: flags.FlagValues = flags.FLAGS) -> dict[str, Any]:
    """The engine options the defined flags set, keyed as `engine_config_from_overrides` takes
    them (flags left at None are absent)."""
    out = {}
    for f in ENGINE_FLAGS:
        if not f.is_override or f.name not in flag_values or flag_values[f.name].value is None:
            continue
        out[f.key or f.name] = f.parse(flag_values[f.name].value)
    return out


def engine_config(flag_values: flags.FlagValues = flags.FLAGS) -> EngineConfig:
    return engine_config_from_overrides(**engine_overrides(flag_values))


def model_source(flag_values: flags.FlagValues = flags.FLAGS) -> str:
    """`--model`, else the embedded default model."""
    return flag_values["model"].value or DEFAULT_MODEL
