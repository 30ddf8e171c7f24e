"""What crosses devices in the compiled step (tensor and data parallel), read from its HLO: the
Megatron pattern (one all-reduce after the embedding, two per layer) and the vocab-parallel LM
head (the logits rows gathered once, never the LM head's weights). Run in a subprocess on fake
CPU devices, since JAX fixes its device count at start-up."""

from __future__ import annotations

import textwrap

import pytest

from pijax.testing import run_on_cpu_devices

SCRIPT = textwrap.dedent("""
    import json, re
    from pijax import LLM
    from pijax.batch import empty_step_input

    result = {}
    for mesh in [(1, 2), (2, 2)]:
        llm = LLM("tiny-random", mesh_shape=mesh, num_pages=64, max_num_seqs=4,
                  max_num_batched_tokens=64, max_model_len=256)
        eng = llm.engine
        words = -(-eng.model_config.vocab_size // 32)
        batch = empty_step_input(64, 4, 16, words, eng.num_data_shards)
        text = eng._step.compiled_text(eng.model.params, eng.kv_pool, batch)
        ops = re.findall(r"= (\\S+) (all-gather|all-reduce)\\(", text)
        result[str(mesh)] = {
            "ops": [[kind, shape] for shape, kind in ops],
            "layers": eng.model_config.num_layers,
            "hidden": eng.model_config.hidden_size,
            "vocab": eng.model_config.vocab_size,
        }
    print("RESULT" + json.dumps(result))
""")


@pytest.mark.slow
def test_tp_step_gathers_logits_not_weights_and_all_reduces_twice_a_layer():
    r = run_on_cpu_devices(SCRIPT, 4)
    for mesh, data in [("(1, 2)", 1), ("(2, 2)", 2)]:
        m = r[mesh]
        h, v, n = m["hidden"], m["vocab"], m["layers"]
        gathers = [shape for kind, shape in m["ops"] if kind == "all-gather"]
        # The logits of each data shard's 4 sequence rows, gathered over the vocabulary.
        assert [g.split("{")[0] for g in gathers] == [f"f32[{4 * data},{v}]"], (mesh, gathers)
        rows = [shape for kind, shape in m["ops"] if kind == "all-reduce"]
        # Row-parallel matmuls (o_proj, down_proj) and the vocab-parallel embedding, each over
        # one data shard's 64 token rows: activations are split over `data`, not replicated.
        assert rows.count(f"f32[64,{h}]{{1,0}}") == 2 * n + 1, (mesh, rows)
