"""Configuration: a few small frozen dataclasses, validated once at construction.

`ModelConfig` describes the decoder (read from an HF `config.json` or a preset), `CacheConfig`
the paged KV pool, `SchedulerConfig` the per-step budgets, and `EngineConfig` ties them together
with the device mesh and dtypes. Every validation error is a `ConfigError` (a `ValueError`) that
names the field and the allowed values.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from importlib import resources
from pathlib import Path
from typing import Any

from pijax.kernels.impl import AttentionImpl


class ConfigError(ValueError):
    """A configuration field is missing or outside its allowed values."""


def _require(cond: bool, field: str, allowed: str, got: Any) -> None:
    if not cond:
        raise ConfigError(f"{field} must be {allowed}; got {got!r}")


class DType(enum.Enum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"

    @property
    def jnp(self):
        import jax.numpy as jnp

        return {DType.FLOAT32: jnp.float32, DType.BFLOAT16: jnp.bfloat16}[self]

    @classmethod
    def parse(cls, value: str | DType, field: str = "dtype") -> DType:
        if isinstance(value, DType):
            return value
        aliases = {
            "float32": cls.FLOAT32,
            "f32": cls.FLOAT32,
            "bfloat16": cls.BFLOAT16,
            "bf16": cls.BFLOAT16,
        }
        _require(value in aliases, field, f"one of {sorted(aliases)}", value)
        return aliases[value]


class KVCacheDType(enum.Enum):
    AUTO = "auto"  # the model's activation dtype
    INT8 = "int8"
    FP8_E4M3 = "fp8_e4m3"

    @classmethod
    def parse(cls, value: str | KVCacheDType) -> KVCacheDType:
        if isinstance(value, KVCacheDType):
            return value
        allowed = [m.value for m in cls]
        _require(value in allowed, "kv_cache_dtype", f"one of {allowed}", value)
        return cls(value)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent rope scaling (`rope_scaling.rope_type == "llama3"`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The Llama-family decoder: Llama 2/3, Qwen2/2.5 (qkv bias, tied embeddings), Mistral."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Sliding-window attention (Mistral, Qwen2): a token sees the `sliding_window` latest
    # positions (itself included) in layers `max_window_layers` and up; None = full attention.
    sliding_window: int | None = None
    max_window_layers: int = 0

    def layer_window(self, layer: int) -> int | None:
        """The attention window of `layer`, or None for full causal attention."""
        return self.sliding_window if layer >= self.max_window_layers else None

    def __post_init__(self):
        _require(
            self.sliding_window is None
            or (isinstance(self.sliding_window, int) and self.sliding_window > 0),
            "sliding_window",
            "None or a positive integer",
            self.sliding_window,
        )
        _require(
            isinstance(self.max_window_layers, int) and self.max_window_layers >= 0,
            "max_window_layers",
            "an integer >= 0",
            self.max_window_layers,
        )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            v = getattr(self, name)
            _require(isinstance(v, int) and v > 0, name, "a positive integer", v)
        _require(
            self.num_heads % self.num_kv_heads == 0,
            "num_key_value_heads",
            f"a divisor of num_attention_heads={self.num_heads}",
            self.num_kv_heads,
        )
        _require(
            self.architecture in SUPPORTED_ARCHITECTURES,
            "architectures",
            f"one of {list(SUPPORTED_ARCHITECTURES)}",
            self.architecture,
        )

    @classmethod
    def from_hf_dict(cls, cfg: dict, source: str = "config.json") -> ModelConfig:
        """Build from a Hugging Face `config.json` dict; errors name `source` and the field."""

        def get(key, default=dataclasses.MISSING):
            if key in cfg and cfg[key] is not None:
                return cfg[key]
            if default is dataclasses.MISSING:
                raise ConfigError(f"{source}: required field {key!r} is missing")
            return default

        archs = get("architectures", ["LlamaForCausalLM"])
        arch = archs[0] if isinstance(archs, list) and archs else archs
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"{source}: architectures={archs!r} is not supported; "
                f"allowed: {list(SUPPORTED_ARCHITECTURES)}"
            )
        sliding_window, max_window_layers = _sliding_window(cfg, arch, get, source)
        num_heads = get("num_attention_heads")
        hidden = get("hidden_size")
        rope_scaling = None
        rs = cfg.get("rope_scaling")
        if rs:
            rope_type = rs.get("rope_type", rs.get("type"))
            if rope_type == "llama3":
                rope_scaling = RopeScaling(
                    factor=float(rs["factor"]),
                    low_freq_factor=float(rs["low_freq_factor"]),
                    high_freq_factor=float(rs["high_freq_factor"]),
                    original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
                )
            elif rope_type not in (None, "default"):
                raise ConfigError(
                    f"{source}: rope_scaling.rope_type={rope_type!r} is not supported; "
                    "allowed: 'llama3', 'default' or null"
                )
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            vocab_size=get("vocab_size"),
            hidden_size=hidden,
            intermediate_size=get("intermediate_size"),
            num_layers=get("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=get("num_key_value_heads", num_heads),
            head_dim=get("head_dim", hidden // num_heads),
            max_position_embeddings=get("max_position_embeddings"),
            rms_norm_eps=float(get("rms_norm_eps", 1e-5)),
            rope_theta=float(get("rope_theta", 10000.0)),
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases (its config has no field for it); Llama may opt in.
            attention_bias=arch == "Qwen2ForCausalLM" or bool(get("attention_bias", False)),
            architecture=arch,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            sliding_window=sliding_window,
            max_window_layers=max_window_layers,
        )

    def to_hf_dict(self) -> dict:
        d = {
            "architectures": [self.architecture],
            "model_type": {
                "LlamaForCausalLM": "llama",
                "MistralForCausalLM": "mistral",
                "Qwen2ForCausalLM": "qwen2",
            }[self.architecture],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids)
            if len(self.eos_token_ids) != 1
            else self.eos_token_ids[0],
        }
        if self.rope_scaling is not None:
            d["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        if self.sliding_window is not None:
            d["sliding_window"] = self.sliding_window
            if self.architecture == "Qwen2ForCausalLM":
                d["use_sliding_window"] = True
                d["max_window_layers"] = self.max_window_layers
        return d


def _sliding_window(cfg: dict, arch: str, get, source: str) -> tuple[int | None, int]:
    """(window, first windowed layer) of an HF config, or a `ConfigError` for a layout we do not
    run. Mistral: `sliding_window` on every layer. Qwen2: only with `use_sliding_window`, on
    layers `max_window_layers` and up (or as its `layer_types` says, when that is a suffix).
    A window at least as long as the context is full attention. Llama has none."""
    if arch == "LlamaForCausalLM":
        return None, 0
    window = cfg.get("sliding_window")
    if arch == "Qwen2ForCausalLM" and not cfg.get("use_sliding_window", False):
        window = None
    if window in (None, 0):
        return None, 0
    if not isinstance(window, int) or window < 0:
        raise ConfigError(
            f"{source}: sliding_window must be null or a positive integer; got {window!r}"
        )
    if window >= get("max_position_embeddings"):
        return None, 0
    num_layers = get("num_hidden_layers")
    first = 0 if arch == "MistralForCausalLM" else int(cfg.get("max_window_layers", 28))
    types = cfg.get("layer_types")
    if types is not None:
        sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
        if sliding != list(range(num_layers - len(sliding), num_layers)):
            raise ConfigError(
                f"{source}: layer_types must put every sliding_attention layer after the "
                f"full_attention ones; got {types!r}"
            )
        first = num_layers - len(sliding)
    if first >= num_layers:
        return None, 0
    return window, first


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """The paged KV pool, sized by `num_pages`, else by an explicit byte budget
    (`kv_cache_memory_bytes`, per device), else by a `memory_fraction` of free device memory.
    A byte budget buys more pages of a smaller `kv_cache_dtype` (see `kv_pool`). On a mesh with
    a `data` axis of D, every data shard gets that many pages (`num_pages` is per shard; a byte
    budget is per device), so the pool holds D times the KV of one shard."""

    page_size: int = 16
    num_pages: int | None = None
    memory_fraction: float = 0.5
    kv_cache_memory_bytes: int | None = None
    kv_cache_dtype: KVCacheDType = KVCacheDType.AUTO
    enable_prefix_reuse: bool = True
    session_ttl_s: float = 600.0
    session_max_pages_fraction: float = 0.25  # share of the pool that idle sessions may pin
    audit_log_path: str | None = None
    # A quantized cache starts only with a passing gate report for the model and dtype
    # (scripts/kv_quant_eval.py), checked by Engine.from_source; skip_kv_quant_gate overrides it
    # (logged as a warning).
    kv_quant_gate_report: str | None = None
    skip_kv_quant_gate: bool = False

    def __post_init__(self):
        _require(
            self.page_size in (8, 16, 32, 64, 128),
            "page_size",
            "one of [8, 16, 32, 64, 128]",
            self.page_size,
        )
        _require(
            self.num_pages is None or (isinstance(self.num_pages, int) and self.num_pages >= 2),
            "num_pages",
            "None or an integer >= 2 (page 0 is the null page)",
            self.num_pages,
        )
        _require(
            0.0 < self.memory_fraction <= 0.95,
            "memory_fraction",
            "in (0, 0.95]",
            self.memory_fraction,
        )
        budget = self.kv_cache_memory_bytes
        _require(
            budget is None or (isinstance(budget, int) and budget > 0),
            "kv_cache_memory_bytes",
            "None or a positive integer (bytes per device)",
            self.kv_cache_memory_bytes,
        )
        object.__setattr__(self, "kv_cache_dtype", KVCacheDType.parse(self.kv_cache_dtype))
        _require(self.session_ttl_s > 0, "session_ttl_s", "> 0 seconds", self.session_ttl_s)
        _require(
            isinstance(self.skip_kv_quant_gate, bool),
            "skip_kv_quant_gate",
            "True or False",
            self.skip_kv_quant_gate,
        )
        _require(
            0 <= self.session_max_pages_fraction <= 1,
            "session_max_pages_fraction",
            "in [0, 1]",
            self.session_max_pages_fraction,
        )


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Per-step budgets (per data shard: on a mesh with a `data` axis of D, each shard runs
    its own `max_num_seqs` sequences and `max_num_batched_tokens` tokens a step).
    `max_model_len` caps prompt + generated tokens of one request."""

    max_num_seqs: int = 32
    max_num_batched_tokens: int = 256
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True
    max_waiting: int = 1024
    priority_aging_steps: int = 64  # a waiting request gains one priority class per this many steps
    # Baseline only: reserve KV for prompt + max_tokens at admission, as contiguous engines do.
    reserve_full_length: bool = False
    # Overlapped scheduling: the host schedules and builds step N+1 while the device runs step
    # N; decodes take their input token from step N's output on the device, and stop checks
    # run one step late (outputs are identical either way). False: the synchronous loop (for
    # debugging, and the baseline). Multi-host runs are always synchronous.
    overlap_scheduling: bool = True

    def __post_init__(self):
        _require(self.max_num_seqs >= 1, "max_num_seqs", "an integer >= 1", self.max_num_seqs)
        _require(
            self.max_num_batched_tokens >= self.max_num_seqs,
            "max_num_batched_tokens",
            f"an integer >= max_num_seqs={self.max_num_seqs}",
            self.max_num_batched_tokens,
        )
        _require(self.max_model_len >= 2, "max_model_len", "an integer >= 2", self.max_model_len)
        # Without chunking a prefill runs whole in one step, so every prompt must fit one.
        _require(
            self.enable_chunked_prefill or self.max_num_batched_tokens >= self.max_model_len,
            "max_num_batched_tokens",
            f"an integer >= max_model_len={self.max_model_len} "
            "when enable_chunked_prefill is False",
            self.max_num_batched_tokens,
        )
        _require(self.max_waiting >= 1, "max_waiting", "an integer >= 1", self.max_waiting)
        _require(
            self.priority_aging_steps >= 1,
            "priority_aging_steps",
            "an integer >= 1",
            self.priority_aging_steps,
        )


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    cache: CacheConfig = dataclasses.field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = dataclasses.field(default_factory=SchedulerConfig)
    dtype: DType = DType.FLOAT32
    mesh_shape: tuple[int, int] = (1, 1)  # (data, model)
    attention_impl: AttentionImpl = AttentionImpl.AUTO
    # None: the default location (see `resolve_compilation_cache_dir`); "off" disables the cache.
    compilation_cache_dir: str | None = None
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "dtype", DType.parse(self.dtype))
        object.__setattr__(self, "attention_impl", AttentionImpl.parse(self.attention_impl))
        ms = tuple(self.mesh_shape)
        _require(
            len(ms) == 2 and all(isinstance(x, int) and x >= 1 for x in ms),
            "mesh_shape",
            "two positive integers (data, model)",
            self.mesh_shape,
        )
        object.__setattr__(self, "mesh_shape", ms)


COMPILATION_CACHE_ENV = "PIJAX_COMPILATION_CACHE"  # a directory, or "off"
_CACHE_OFF = ("", "off", "none", "false", "0")


def resolve_compilation_cache_dir(value: str | None) -> str | None:
    """The persistent compilation cache directory for a config value, or None when it is off.

    On by default for every entry point (`LLM`, the scripts, the server), so a shape compiled
    once is not compiled again by the next process: `value` None means `$PIJAX_COMPILATION_CACHE`
    if set, else `$XDG_CACHE_HOME/pijax/jax` (`~/.cache/pijax/jax`). "off" (or "") turns it off.
    """
    import os

    if value is None:
        value = os.environ.get(COMPILATION_CACHE_ENV)
    if value is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return os.path.join(base, "pijax", "jax")
    if value.strip().lower() in _CACHE_OFF:
        return None
    return os.path.expanduser(value)


def parse_mesh(text: str) -> tuple[int, int]:
    """`"1,2"` or `"1x2"` -> (1, 2)."""
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"mesh must be 'DATA,MODEL' (e.g. '1,2'); got {text!r}") from None
    _require(
        len(shape) == 2 and all(x >= 1 for x in shape),
        "mesh",
        "'DATA,MODEL' with positive integers",
        text,
    )
    return shape  # type: ignore[return-value]


# --- presets -----------------------------------------------------------------------------------


def preset_names() -> list[str]:
    root = resources.files("pijax.configs") / "presets"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".json"))


def load_preset(name: str) -> dict:
    """A preset is a JSON file in `configs/presets/` with a `model` (HF config dict) section and
    optional `engine` overrides and `tokenizer` kind."""
    path = resources.files("pijax.configs") / "presets" / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"model preset {name!r} not found; allowed: {preset_names()}")
    return json.loads(path.read_text())


# The random-weight preset: what benchmarks and fast tests name explicitly.
DEFAULT_PRESET = "tiny-random"
# The embedded default model (`LLM()`, the scripts without --model): the small claim-review model
# trained by scripts/train_default_model.py and shipped as package data.
DEFAULT_MODEL = str(Path(__file__).resolve().parent / "data" / "default_model")

_CACHE_KEYS = {
    "page_size",
    "num_pages",
    "memory_fraction",
    "kv_cache_memory_bytes",
    "kv_cache_dtype",
    "enable_prefix_reuse",
    "session_ttl_s",
    "session_max_pages_fraction",
    "audit_log_path",
    "kv_quant_gate_report",
    "skip_kv_quant_gate",
}
_SCHED_KEYS = {
    "max_num_seqs",
    "max_num_batched_tokens",
    "max_model_len",
    "enable_chunked_prefill",
    "max_waiting",
    "priority_aging_steps",
    "reserve_full_length",
    "overlap_scheduling",
}
_ENGINE_KEYS = {"dtype", "mesh_shape", "attention_impl", "compilation_cache_dir", "seed"}


def engine_config_from_overrides(**overrides) -> EngineConfig:
    """Flat keyword overrides (as `LLM(...)` and the scripts take them) -> EngineConfig."""
    unknown = set(overrides) - _CACHE_KEYS - _SCHED_KEYS - _ENGINE_KEYS
    if unknown:
        raise ConfigError(
            f"unknown engine option(s) {sorted(unknown)}; allowed: "
            f"{sorted(_CACHE_KEYS | _SCHED_KEYS | _ENGINE_KEYS)}"
        )
    pick = lambda keys: {k: v for k, v in overrides.items() if k in keys and v is not None}  # noqa: E731
    return EngineConfig(
        cache=CacheConfig(**pick(_CACHE_KEYS)),
        scheduler=SchedulerConfig(**pick(_SCHED_KEYS)),
        **pick(_ENGINE_KEYS),
    )
