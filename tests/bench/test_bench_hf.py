"""The transformers baseline: the engine's random weights exported with `save_hf_checkpoint`,
the smoke workload through `generate` in padded batches (needs the `reference` extra)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from pijax.bench import hf  # noqa: E402
from pijax.bench.driver import ArrivalSpec  # noqa: E402
from pijax.bench.metrics import summarize  # noqa: E402
from pijax.bench.presets import load_bench_preset  # noqa: E402
from pijax.config import DType  # noqa: E402
from pijax.model.loader import load_model  # noqa: E402
from pijax.sharding import make_mesh  # noqa: E402
from pijax.workload import generate_workload  # noqa: E402

pytestmark = pytest.mark.reference


@pytest.mark.slow
def test_hf_baseline_runs_the_request_list(tmp_path):
    preset = load_bench_preset("smoke")
    model = load_model(preset.model, dtype=DType.FLOAT32, mesh=make_mesh((1, 1)))
    hf_model = hf.load(hf.export_weights(model, tmp_path / "hf"))
    workload = generate_workload(preset.workload)
    run = hf.run_hf(hf_model, workload, ArrivalSpec(clients=3), batch_size=2)
    assert run.conversations_done == len(workload.conversations)
    assert len(run.turns) == workload.num_requests
    for t in run.turns:
        conv = workload.conversations[t.conversation]
        assert t.output_tokens == conv.turns[t.turn].output_len
        assert t.prompt_tokens == workload.prompt_len(conv, t.turn)  # history: drawn lengths
        assert t.cached_tokens == 0  # no reuse across generate calls
        assert t.token_times == sorted(t.token_times) and t.finish >= t.token_times[-1]
    assert all(s.running <= 2 for s in run.steps)
    s = summarize(run)
    assert "memory" not in s and s["compilations_after_warmup"] is None
    assert s["throughput"]["output_tokens_per_s"] > 0
