"""The overlap probe: a steady decode batch timed per step with overlapped scheduling on and off.
No timing is asserted: only that both idle shares are fractions of the run, that every timed step
has its dispatch and ready stamps, and that the two modes produce the same tokens."""

from __future__ import annotations

import pytest

from pijax.bench import probes
from pijax.config import engine_config_from_overrides
from pijax.engine import Engine

OPTS = dict(
    max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, page_size=16, num_pages=64
)


@pytest.fixture(scope="module")
def result():
    sync = Engine.from_source("tiny-random", engine_config_from_overrides(**OPTS))
    made = []

    def make_engine(overlap: bool) -> Engine:
        # One model for both modes, as the bench suite does.
        config = engine_config_from_overrides(**OPTS, overlap_scheduling=overlap)
        engine = Engine(sync.model, config, sync.mesh)
        made.append(engine)
        return engine

    out = probes.overlap_idle_probe(make_engine, decodes=6, prompt_tokens=20, steps=12, repeats=2)
    return out, made, sync


@pytest.mark.slow
def test_sizes_fit_a_small_engine(result):
    _, _, big = result
    small = dict(OPTS, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128, num_pages=20)
    engine = Engine(big.model, engine_config_from_overrides(**small), big.mesh)
    decodes, prompt, steps = probes.fit_steady_decode(engine, 16, 64, 64)
    assert (decodes, prompt) == (4, 32)
    settle = -(-decodes * prompt // 32) + 2
    # 19 usable pages of 16 tokens: 4 pages (64 tokens) per sequence, the tighter limit here.
    assert steps == 64 - prompt - settle - 4
    assert prompt + settle + steps + 4 <= 64
    tiny = dict(small, num_pages=6)
    with pytest.raises(ValueError, match="too small for a steady decode"):
        probes.fit_steady_decode(
            Engine(big.model, engine_config_from_overrides(**tiny), big.mesh), 16, 64, 64
        )


@pytest.mark.slow
def test_shares_are_fractions_for_both_modes(result):
    out, _, _ = result
    for mode in ("sync", "overlap"):
        m = out[mode]
        assert m["steps"] == 24, mode  # every timed step was stamped at dispatch
        assert [r["steps"] for r in m["runs"]] == [12, 12], mode
        for r in m["runs"]:
            assert 0.0 <= r["idle_share"] <= 1.0, (mode, r)
        assert 0.0 <= m["idle_share"] <= 1.0, (mode, m)
        assert 0.0 <= m["ran_dry_share"] <= 1.0, (mode, m)
        assert m["wall_s"] > 0 and 0.0 <= m["idle_s"] <= m["wall_s"], (mode, m)
        assert m["finished_in_window"] == 0, mode  # the window is steady decode only
    assert out["idle_share"] == out["overlap"]["idle_share"]
    assert out["sync_idle_share"] == out["sync"]["idle_share"]


@pytest.mark.slow
def test_outputs_equal_between_modes_and_hook_removed(result):
    out, made, _ = result
    assert out["outputs_equal"] is True
    assert [e.config.scheduler.overlap_scheduling for e in made] == [False, True]
    for engine in made:
        assert engine.on_dispatch is None
        assert not engine.has_unfinished_requests()


def test_timer_pairs_each_dispatch_with_its_ready():
    import jax.numpy as jnp

    timer = probes.StepTimer()
    for i in range(3):
        timer(jnp.full((4,), i) * 2)
    timer.close()
    assert len(timer.dispatch) == len(timer.ready) == 3
    assert len(timer.ready_at_dispatch) == 2
    assert all(r >= d for d, r in zip(timer.dispatch, timer.ready, strict=True))
    s = timer.summary()
    assert s["steps"] == 3 and 0.0 <= s["idle_share"] <= 1.0


@pytest.mark.slow
def test_goal_rows_and_report_line(result):
    from pijax.bench.report import goals_table, probes_section
    from pijax.bench.suite import goals

    out, _, _ = result
    rows = {g["goal"]: g for g in goals({"configs": {}, "probes": {"overlap": out}})}
    row = rows["overlap: device idle share of wall time between steps, steady decode"]
    assert row["measured"] == out["idle_share"]
    assert row["met"] == (out["idle_share"] <= 0.05)
    ref = [g for name, g in rows.items() if name.startswith("(reference) synchronous loop")]
    assert len(ref) == 1 and ref[0]["measured"] == out["sync_idle_share"]
    line = probes_section({"overlap": out})
    assert "overlapped" in line and "synchronous" in line and "same tokens: yes" in line
    assert f"{100 * out['sync_idle_share']:.1f}%" in goals_table(list(rows.values()))
