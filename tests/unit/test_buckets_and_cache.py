"""Step-shape buckets (few, and always large enough) and where the compilation cache lives."""

from __future__ import annotations

import random

import pytest

from pijax.batch import Buckets
from pijax.config import EngineConfig, resolve_compilation_cache_dir


def default_buckets(width_ladder: bool) -> Buckets:
    s = EngineConfig().scheduler
    page = EngineConfig().cache.page_size
    return Buckets.for_limits(
        s.max_num_batched_tokens, s.max_num_seqs, s.max_model_len, page, width_ladder
    )


def test_default_limits_compile_few_shapes():
    single = list(default_buckets(False).grid())
    ladder = list(default_buckets(True).grid())
    assert len(set(single)) == len(single) and len(set(ladder)) == len(ladder)
    t_ladder = {t for t, _, _ in ladder}
    assert len(single) == len(t_ladder), "one shape per token bucket with a single width"
    assert len(ladder) == len(t_ladder) * len({w for _, _, w in ladder})


@pytest.mark.parametrize("width_ladder", [False, True])
def test_pick_covers_every_batch_and_is_in_the_grid(width_ladder):
    b = Buckets.for_limits(200, 24, 1000, 16, width_ladder)
    grid = set(b.grid())
    rng = random.Random(0)
    for _ in range(2000):
        tokens = rng.randint(1, 200)
        seqs = rng.randint(1, min(tokens, 24))
        width = rng.randint(1, -(-1000 // 16))
        T, S, W = b.pick(tokens, seqs, width)
        assert (T, S, W) in grid
        assert T >= tokens and S >= seqs and W >= width


def test_compilation_cache_default_location(monkeypatch, tmp_path):
    monkeypatch.delenv("PIJAX_COMPILATION_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert resolve_compilation_cache_dir(None) == str(tmp_path / "pijax" / "jax")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_compilation_cache_dir(None) == str(
        tmp_path / "home" / ".cache" / "pijax" / "jax"
    )


def test_compilation_cache_env_and_off(monkeypatch, tmp_path):
    monkeypatch.setenv("PIJAX_COMPILATION_CACHE", str(tmp_path / "c"))
    assert resolve_compilation_cache_dir(None) == str(tmp_path / "c")
    assert resolve_compilation_cache_dir(str(tmp_path / "d")) == str(tmp_path / "d")
    for off in ("off", "", "none"):
        assert resolve_compilation_cache_dir(off) is None
    monkeypatch.setenv("PIJAX_COMPILATION_CACHE", "off")
    assert resolve_compilation_cache_dir(None) is None


CACHE_SCRIPT = """
from pijax import LLM, SamplingParams
llm = LLM("tiny-random", num_pages=32, max_num_seqs=4, max_num_batched_tokens=16,
          max_model_len=64)
llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))
"""


@pytest.mark.slow
def test_compilation_cache_is_on_by_default_in_a_fresh_process(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PIJAX_COMPILATION_CACHE"}
    env.update(XDG_CACHE_HOME=str(tmp_path), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", CACHE_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cache = tmp_path / "pijax" / "jax"
    assert cache.is_dir() and any(cache.iterdir()), "no compiled step was cached"
    env["PIJAX_COMPILATION_CACHE"] = "off"
    env["XDG_CACHE_HOME"] = str(tmp_path / "other")
    proc = subprocess.run(
        [sys.executable, "-c", CACHE_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "other").exists(), "the cache was written although turned off"
