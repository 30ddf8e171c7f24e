"""The engine flags every script shares (`pijax.flags`)."""

import pytest
from absl import flags

from pijax import flags as engine_flags
from pijax.config import DEFAULT_MODEL, ConfigError, EngineConfig, KVCacheDType


def parsed(*argv: str, **define) -> flags.FlagValues:
    fv = flags.FlagValues()
    engine_flags.define_engine_flags(flag_values=fv, **define)
    fv(["script", *argv])
    return fv


def test_unset_flags_are_no_overrides_and_give_the_default_config():
    fv = parsed()
    assert engine_flags.engine_overrides(fv) == {}
    assert engine_flags.engine_config(fv) == EngineConfig()
    assert engine_flags.model_source(fv) == DEFAULT_MODEL


def test_flags_map_to_config_fields():
    fv = parsed(
        "--model=tiny-random",
        "--mesh=1x2",
        "--kv_cache_dtype=int8",
        "--noenable_prefix_reuse",
        "--audit_log=audit.jsonl",
        "--max_num_seqs=3",
    )
    assert engine_flags.engine_overrides(fv) == {
        "mesh_shape": (1, 2),
        "kv_cache_dtype": "int8",
        "enable_prefix_reuse": False,
        "audit_log_path": "audit.jsonl",
        "max_num_seqs": 3,
    }
    cfg = engine_flags.engine_config(fv)
    assert cfg.mesh_shape == (1, 2) and cfg.scheduler.max_num_seqs == 3
    assert cfg.cache.kv_cache_dtype is KVCacheDType.INT8 and not cfg.cache.enable_prefix_reuse
    assert engine_flags.model_source(fv) == "tiny-random"


def test_every_override_flag_is_a_key_the_config_parser_accepts():
    """A flag whose key the parser does not know would fail only when someone set it."""
    values = {
        "mesh": "1,1",
        "dtype": "float32",
        "attention_impl": "reference",
        "kv_cache_dtype": "auto",
        "audit_log": "a.jsonl",
        "compilation_cache_dir": "cache",
        "memory_fraction": "0.3",
        "enable_prefix_reuse": "true",
        "enable_chunked_prefill": "true",
        "overlap_scheduling": "true",
        "max_num_batched_tokens": "2048",
        "max_model_len": "2048",
    }
    argv = []
    for f in engine_flags.ENGINE_FLAGS:
        if f.is_override:
            argv.append(f"--{f.name}={values.get(f.name, '64')}")
    fv = parsed(*argv)
    overrides = engine_flags.engine_overrides(fv)
    assert len(overrides) == sum(f.is_override for f in engine_flags.ENGINE_FLAGS)
    engine_flags.engine_config(fv)  # raises on an unknown key or a bad value


def test_exclude_and_defaults():
    fv = parsed("--page_size=32", exclude=["seed", "model"], defaults={"num_pages": 8})
    assert "seed" not in fv and "model" not in fv
    assert engine_flags.engine_overrides(fv) == {"page_size": 32, "num_pages": 8}
    with pytest.raises(ValueError, match="unknown engine flag"):
        engine_flags.define_engine_flags(flag_values=flags.FlagValues(), exclude=["sed"])


def test_bad_values_name_the_field():
    with pytest.raises(flags.IllegalFlagValueError):
        parsed("--kv_cache_dtype=int4")
    with pytest.raises(ConfigError, match="page_size"):
        engine_flags.engine_config(parsed("--page_size=12"))
    with pytest.raises(ConfigError, match="mesh"):
        engine_flags.engine_overrides(parsed("--mesh=two"))
