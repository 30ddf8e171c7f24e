"""The quality gate: thresholds, reports and what `serve.py` enforces; the script end to end.

The script runs in subprocesses with tiny settings (2 prompts of at most 40 tokens, 8 new tokens,
prefill and decode both 16-row batches so each pool compiles one shape). Its figures on
`tiny-random` are far inside the default thresholds (top-1 1.0, mean KL ~1e-5), so a pass is
what should happen; the impossible thresholds (KL and attention error of exactly 0) must fail.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pijax.config import KVCacheDType
from pijax.quant_gate import (
    GateError,
    PromptFigures,
    Thresholds,
    check_gate_report,
    enforce_gate,
    jsonl_prompts,
    load_thresholds,
    make_report,
    model_identity,
    read_report,
    summarize,
    write_report,
)

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "kv_quant_eval.py"
TINY_ARGS = [
    "--model=tiny-random",
    "--kv_cache_dtype=int8",
    "--prompt_source=random",
    "--num_prompts=2",
    "--max_new_tokens=8",
    "--max_prompt_tokens=40",
    "--batch_size=2",
    "--prefill_chunk=8",
]


def prompt_figures(top1=1.0, kl=1e-5, div=None, err=(1e-3, 2e-3)):
    return PromptFigures(
        name="p",
        num_prompt_tokens=40,
        num_generated=10,
        greedy_agreement=1.0 if div is None else div / 10,
        first_divergence=div,
        top1_agreement=top1,
        mean_kl=kl,
        max_kl=2 * kl,
        attention_rel_error=err,
    )


def report_for(model="tiny-random", dtype=KVCacheDType.INT8, thresholds=None, **fig):
    prompts = [prompt_figures(**fig), prompt_figures()]
    err2 = np.array([sum(p.attention_rel_error[i] ** 2 for p in prompts) for i in range(2)])
    figures = summarize(prompts, err2, np.full(2, 2.0))
    return make_report(model, dtype, thresholds or load_thresholds(), figures, prompts, {})


def test_packaged_thresholds_are_the_issue_defaults():
    t = load_thresholds()
    assert (t.min_top1_agreement, t.max_mean_kl) == (0.99, 0.01)
    assert t == Thresholds()


def test_threshold_file_errors_name_the_field(tmp_path):
    bad = tmp_path / "t.json"
    bad.write_text(json.dumps({"min_top1_agreemnt": 0.9}))
    with pytest.raises(GateError, match="unknown threshold.*min_top1_agreemnt"):
        load_thresholds(bad)
    bad.write_text(json.dumps({"max_mean_kl": -1}))
    with pytest.raises(GateError, match="max_mean_kl"):
        load_thresholds(bad)


def test_failures_name_each_failed_threshold():
    r = report_for(top1=0.9, kl=0.05)
    assert not r.passed
    assert [f.split(":")[0] for f in r.failures] == ["min_top1_agreement", "max_mean_kl"]
    assert report_for().passed
    strict = Thresholds(min_greedy_agreement=1.0, max_attention_rel_error=1e-4)
    assert [f.split(":")[0] for f in report_for(div=3, thresholds=strict).failures] == [
        "min_greedy_agreement",
        "max_attention_rel_error",
    ]


def test_overall_figures_pool_positions_and_layers():
    fg = report_for(top1=0.8, kl=0.03, div=4).figures
    assert fg.top1_agreement == pytest.approx(0.9)
    assert fg.mean_kl == pytest.approx((0.03 + 1e-5) / 2)
    assert (fg.num_diverged, fg.earliest_divergence, fg.greedy_agreement) == (1, 4, 0.7)
    assert fg.worst_layer == 1


def test_report_round_trip_and_serve_check(tmp_path):
    path = tmp_path / "gate.json"
    write_report(report_for(), path)
    assert json.loads(json.dumps(read_report(path).to_json())) == json.loads(path.read_text())
    assert check_gate_report(path, "tiny-random", "int8").passed
    with pytest.raises(GateError, match="not fp8_e4m3"):
        check_gate_report(path, "tiny-random", "fp8_e4m3")
    with pytest.raises(
        GateError, match="is for model preset:tiny-random.*not preset:tiny-random-4kv"
    ):
        check_gate_report(path, "tiny-random-4kv", "int8")


def test_serve_check_refuses_failed_tampered_and_loose_reports(tmp_path):
    path = tmp_path / "gate.json"
    write_report(report_for(top1=0.5), path)
    with pytest.raises(GateError, match="FAILED.*min_top1_agreement"):
        check_gate_report(path, "tiny-random", "int8")
    d = json.loads(path.read_text())
    d["passed"], d["failures"] = True, []  # hand-edited: the figures still fail
    path.write_text(json.dumps(d))
    with pytest.raises(GateError, match="FAILED.*min_top1_agreement"):
        check_gate_report(path, "tiny-random", "int8")
    write_report(report_for(top1=0.5, thresholds=Thresholds(min_top1_agreement=0.4)), path)
    with pytest.raises(GateError, match="looser.*min_top1_agreement=0.4"):
        check_gate_report(path, "tiny-random", "int8")
    path.write_text("{")
    with pytest.raises(GateError, match="not valid JSON"):
        check_gate_report(path, "tiny-random", "int8")


def test_a_checkpoint_changed_in_place_is_another_model(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"weights-1")
    path = tmp_path / "gate.json"
    write_report(report_for(model=str(ckpt)), path)
    assert check_gate_report(path, str(ckpt), "int8")
    moved = Path(tmp_path / "moved")
    ckpt.rename(moved)  # the same files elsewhere: the same model
    assert check_gate_report(path, str(moved), "int8")
    (moved / "model.safetensors").write_bytes(b"weights-2")
    with pytest.raises(GateError, match="gate this model"):
        check_gate_report(path, str(moved), "int8")
    assert model_identity(str(moved))[0] == f"dir:{moved.resolve()}"


def test_enforce_gate(tmp_path, caplog):
    enforce_gate("auto", "tiny-random", None, False)  # nothing to gate
    with pytest.raises(GateError, match="needs a passing quality-gate report.*kv_quant_eval.py"):
        enforce_gate("int8", "tiny-random", None, False)
    with caplog.at_level(logging.WARNING, logger="pijax.quant_gate"):
        enforce_gate("int8", "tiny-random", None, True)
    assert "WITHOUT a quality gate" in caplog.text
    path = tmp_path / "gate.json"
    write_report(report_for(), path)
    enforce_gate(KVCacheDType.INT8, "tiny-random", str(path), False)
    with pytest.raises(GateError, match="cannot read"):
        enforce_gate("int8", "tiny-random", str(tmp_path / "missing.json"), False)


def test_jsonl_prompts(tmp_path):
    from pijax.model.tokenizer import ByteTokenizer

    f = tmp_path / "p.jsonl"
    f.write_text('{"id": "a", "prompt": "claim 1"}\n\n{"prompt_token_ids": [5, 6, 7, 8]}\n')
    got = jsonl_prompts(f, ByteTokenizer(add_bos_default=False), 320, max_prompt_tokens=3)
    assert [(p.name, p.token_ids) for p in got] == [("a", tuple(b"m 1")), ("p.jsonl:3", (6, 7, 8))]
    f.write_text('{"prompt_token_ids": [400]}\n')
    with pytest.raises(
        GateError, match=r"p.jsonl:1: prompt_token_ids must be integers in \[0, 320\)"
    ):
        jsonl_prompts(f, ByteTokenizer(), 320)


def run_script(*args: str) -> subprocess.Popen:
    # PYTHONPATH: the repo root, so the script imports this checkout however pijax is installed.
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
        JAX_PLATFORMS="cpu",
    )
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *TINY_ARGS, *args],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_gate_script_passes_int8_and_fails_impossible_thresholds(tmp_path):
    impossible = tmp_path / "impossible.json"
    impossible.write_text(json.dumps({"max_mean_kl": 0.0, "max_attention_rel_error": 0.0}))
    ok_report, bad_report = tmp_path / "ok.json", tmp_path / "bad.json"
    procs = [
        run_script(f"--report={ok_report}"),
        run_script(f"--report={bad_report}", f"--thresholds={impossible}"),
    ]
    (ok_out, ok_err), (bad_out, bad_err) = (p.communicate(timeout=600) for p in procs)
    assert procs[0].returncode == 0, ok_err[-3000:]
    report = check_gate_report(ok_report, "tiny-random", "int8")
    fg = report.figures
    assert fg.top1_agreement >= 0.99 and 0 < fg.mean_kl <= 0.01
    assert len(fg.attention_rel_error) == 4 and 0 < fg.max_attention_rel_error < 0.05
    assert report.settings["prompt_source_used"] == "random"
    assert "PASS" in ok_out

    assert procs[1].returncode == 1, bad_err[-3000:]
    assert "KV quant gate FAILED for int8: max_mean_kl" in bad_err
    assert "max_attention_rel_error" in bad_err
    bad = json.loads(bad_report.read_text())
    assert bad["passed"] is False and len(bad["failures"]) == 2
    assert read_report(bad_report).figures.mean_kl == bad["figures"]["mean_kl"] > 0


@pytest.mark.slow
def test_serve_refuses_int8_without_a_gate_report_and_names_the_way_out(tmp_path):
    """`serve.py --kv_cache_dtype=int8` stops before loading anything unless given a passing
    report (a failing one is refused too) or --skip_kv_quant_gate."""
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    serve = [
        sys.executable,
        str(REPO / "scripts" / "serve.py"),
        "--model=tiny-random",
        "--kv_cache_dtype=int8",
        "--insecure_dev_mode",
        "--port=0",
        "--http_port=0",
    ]
    for extra, needle in [
        ([], "--skip_kv_quant_gate"),
        ([f"--kv_quant_gate_report={bad}"], str(bad)),
    ]:
        proc = subprocess.run(
            serve + extra, env=env, cwd=REPO, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode != 0
        assert "kv_quant_eval.py" in proc.stderr or needle in proc.stderr, proc.stderr[-2000:]
        assert needle in proc.stderr, proc.stderr[-2000:]
        assert "engine ready" not in proc.stderr + proc.stdout
