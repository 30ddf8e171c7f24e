"""Bench presets: `configs/bench/<name>.json`.

    {
      "description": "...",
      "model": "tiny-random",                # a model preset or checkpoint directory
      "engine": {"kv_cache_memory_bytes": ..., ...},  # engine_config_from_overrides keywords
      "workload": {...},                      # WorkloadConfig fields
      "arrival": {"mode": "closed", "clients": 8},
      "baselines": {"no_chunked_prefill_max_num_batched_tokens": 4096, "hf_batch_size": 8},
      "probes": {"decodes": 4, "context": 512, "steady_steps": 16, "long_prompt": 3968,
                 "ttft_requests": 4, "copy_mib": 256, "matmul_n": 1024},
      "sweep": {"rates_per_capacity": [0.25, 0.5, 1.0, 1.5], "num_conversations": 12}
    }

Every engine configuration of one run gets the same KV memory: presets size the pool in bytes
(`kv_cache_memory_bytes`), so baselines are compared at equal memory and a smaller cache dtype
(`--kv_cache_dtype=auto,int8`) buys more pages of the same bytes. Engines of one model and pool
shape share compiled step functions.
"""

from __future__ import annotations

import dataclasses
import json
from importlib import resources

from pijax.bench.driver import ArrivalSpec
from pijax.config import ConfigError
from pijax.workload import WorkloadConfig


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    decodes: int = 4
    context: int = 512
    steady_steps: int = 16
    long_prompt: int = 3968
    ttft_requests: int = 4
    copy_mib: int = 256
    matmul_n: int = 1024


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    # Poisson rates as multiples of the closed-loop capacity measured in the same run.
    rates_per_capacity: tuple[float, ...] = (0.25, 0.5, 1.0, 1.5)
    num_conversations: int = 12


@dataclasses.dataclass(frozen=True)
class BenchPreset:
    name: str
    description: str
    model: str
    engine: dict
    workload: WorkloadConfig
    arrival: ArrivalSpec
    no_chunk_budget: int
    hf_batch_size: int
    probes: ProbeConfig
    sweep: SweepConfig

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "model": self.model,
            "engine": self.engine,
            "workload": self.workload.to_dict(),
            "arrival": self.arrival.to_dict(),
            "baselines": {
                "no_chunked_prefill_max_num_batched_tokens": self.no_chunk_budget,
                "hf_batch_size": self.hf_batch_size,
            },
            "probes": dataclasses.asdict(self.probes),
            "sweep": dataclasses.asdict(self.sweep),
        }


def bench_preset_names() -> list[str]:
    root = resources.files("pijax.configs") / "bench"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".json"))


def load_bench_preset(name: str) -> BenchPreset:
    path = resources.files("pijax.configs") / "bench" / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"bench preset {name!r} not found; allowed: {bench_preset_names()}")
    return bench_preset_from_dict(name, json.loads(path.read_text()))


def _section(cls, d: dict, what: str):
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - fields
    if unknown:
        raise ConfigError(
            f"bench preset {what}: unknown field(s) {sorted(unknown)}; allowed: {sorted(fields)}"
        )
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def bench_preset_from_dict(name: str, d: dict) -> BenchPreset:
    allowed = {
        "description",
        "model",
        "engine",
        "workload",
        "arrival",
        "baselines",
        "probes",
        "sweep",
    }
    if set(d) - allowed:
        raise ConfigError(
            f"bench preset {name!r}: unknown section(s) {sorted(set(d) - allowed)}; "
            f"allowed: {sorted(allowed)}"
        )
    engine = dict(d.get("engine", {}))
    base = d.get("baselines", {})
    return BenchPreset(
        name=name,
        description=d.get("description", ""),
        model=d.get("model", "tiny-random"),
        engine=engine,
        workload=WorkloadConfig.from_dict(d.get("workload", {})),
        arrival=ArrivalSpec(**d.get("arrival", {})),
        no_chunk_budget=int(
            base.get("no_chunked_prefill_max_num_batched_tokens", engine.get("max_model_len", 2048))
        ),
        hf_batch_size=int(base.get("hf_batch_size", engine.get("max_num_seqs", 8))),
        probes=_section(ProbeConfig, d.get("probes", {}), "probes"),
        sweep=_section(SweepConfig, d.get("sweep", {}), "sweep"),
    )
