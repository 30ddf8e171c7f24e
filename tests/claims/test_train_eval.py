"""Training data plumbing, the learning-rate schedule and scoring."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from flax import nnx

from pijax.claims import train
from pijax.claims.evaluate import (
    GOALS,
    format_report,
    narrative_cites,
    score_answer,
    summarize,
)
from pijax.claims.prompt import policy_scaffold, render_findings_json, render_prompt, render_target


def test_encoded_sequence_is_prompt_then_answer(tokenizer, examples):
    corpus = train.encode_examples(tokenizer, examples[:5])
    prefix = corpus.prefix.tolist()
    for ex, enc in zip(examples[:5], corpus.rows, strict=True):
        prompt = tokenizer.encode(
            render_prompt(policy_scaffold(), ex.claim), add_special_tokens=False
        ).ids
        answer = tokenizer.encode(
            render_target(ex.findings, ex.narrative), add_special_tokens=False
        ).ids
        assert prefix + enc.ids.tolist() == prompt + answer
        assert len(prefix) + enc.answer_start == len(prompt)


def test_batches_mask_only_answer_tokens(tokenizer, examples):
    data = train.encode_examples(tokenizer, examples).rows
    stream = train.batches(data, batch_size=4, seed=0, pad_id=0)
    for _ in range(3):
        tokens, mask = next(stream)
        assert tokens.shape == mask.shape and tokens.shape[1] % train.BUCKET == 0
        for row in range(tokens.shape[0]):
            match = [
                d
                for d in data
                if len(d.ids) <= tokens.shape[1]
                and np.array_equal(tokens[row, : len(d.ids)], d.ids)
            ]
            enc = match[0]
            expected = np.zeros(tokens.shape[1])
            expected[enc.answer_start : len(enc.ids)] = 1
            np.testing.assert_array_equal(mask[row], expected)
            assert (tokens[row, len(enc.ids) :] == 0).all()


def test_batches_are_seeded(tokenizer, examples):
    data = train.encode_examples(tokenizer, examples).rows
    a = [next(train.batches(data, 4, seed=1, pad_id=0))[0] for _ in range(1)]
    b = [next(train.batches(data, 4, seed=1, pad_id=0))[0] for _ in range(1)]
    np.testing.assert_array_equal(a[0], b[0])


def test_loss_weights_answer_one_context_small_padding_zero():
    tokens = np.array([[5, 6, 7, 8, 0, 0]])
    mask = np.array([[0, 0, 1, 1, 0, 0]], np.float32)
    w = train.loss_weights(tokens, mask, pad_id=0, context_weight=0.25)
    np.testing.assert_array_equal(w, [[0.25, 0.25, 1, 1, 0, 0]])
    assert w.dtype == np.float32


def test_learning_rate_warms_up_holds_and_decays():
    cfg = train.TrainConfig(steps=100, learning_rate=1e-3, warmup_steps=10, decay_fraction=0.2)
    lr = [train.learning_rate(cfg, s, s / 100) for s in range(100)]
    assert lr[0] == pytest.approx(1e-4)
    assert lr[9] == lr[50] == lr[80] == pytest.approx(1e-3)
    assert lr[90] == pytest.approx(5e-4)
    assert lr[99] < 1e-4
    # A time budget moves progress ahead of the step count: decay starts early.
    assert train.learning_rate(cfg, 20, 0.9) == pytest.approx(5e-4)


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="num_heads"):
        train.TrainConfig(hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="steps"):
        train.TrainConfig(steps=0)


def test_score_answer(examples):
    ex = next(e for e in examples if e.findings.flags)
    truth = render_findings_json(ex.findings, ex.narrative)
    s = score_answer(truth + "<|end|>", ex)
    assert s.parsed and s.schema_valid and s.flags_match and s.action_match and s.exact_match
    obj = json.loads(truth)
    obj["narrative"] = "Different words."
    s = score_answer(json.dumps(obj), ex)
    assert s.schema_valid and s.flags_match and not s.exact_match
    obj["flags"] = obj["flags"][1:]
    assert not score_answer(json.dumps(obj), ex).flags_match
    assert score_answer('{"claim_id": "CLM', ex).parsed is False
    report = summarize([truth, "nonsense"], [ex, ex])
    assert report.schema_valid_share == 0.5 and report.flags_match_share == 0.5


def test_reviewer_figures_per_flag_claim_id_and_narrative(examples):
    flagged = [e for e in examples if len(e.findings.flags) >= 2][:2]
    clean = next(e for e in examples if not e.findings.flags)
    assert len(flagged) == 2
    right = [render_findings_json(e.findings, e.narrative) for e in flagged]
    # A wrong answer for the first claim: another claim id, its first flag dropped and one
    # invented (MODIFIER_MISUSE on line 99), the narrative citing nothing.
    obj = json.loads(right[0])
    dropped = obj["flags"].pop(0)
    obj["flags"].append(dict(dropped, code="MODIFIER_MISUSE", line=99))
    obj["claim_id"] = "CLM-000000"
    obj["narrative"] = "Pay it."
    answers = [json.dumps(obj), right[1], render_findings_json(clean.findings, clean.narrative)]
    report = summarize(answers, [*flagged, clean])
    assert report.claim_id_share == pytest.approx(2 / 3, abs=1e-4)
    assert report.flags_match_share == pytest.approx(2 / 3, abs=1e-4)
    assert report.narrative_cites_share == 0.5  # two claims with flags, one cited
    true_counts: dict[str, int] = {}
    for e in (*flagged, clean):
        for f in e.findings.flags:
            true_counts[f.code.value] = true_counts.get(f.code.value, 0) + 1
    for code, fig in report.per_flag.items():
        assert fig["support"] == true_counts.get(code, 0), code
    d = report.per_flag[dropped["code"]]
    assert d["recall"] == pytest.approx((d["support"] - 1) / d["support"], abs=1e-4)
    m = report.per_flag["MODIFIER_MISUSE"]
    assert m["predicted"] >= 1 and m["precision"] < 1
    goals = report.goals()
    assert set(goals) == set(GOALS)
    assert not goals["claim_id_share"]["met"] and goals["claim_id_share"]["goal"] == 0.99
    text = format_report(report)
    assert "claim id exact 67%" in text and "MISSED" in text and dropped["code"] in text


def test_narrative_cites_each_flagged_line_with_its_reference(examples):
    ex = next(e for e in examples if len(e.findings.flags) >= 2)
    assert narrative_cites(ex.narrative, ex) is True
    first = ex.findings.flags[0]
    assert narrative_cites(ex.narrative.replace(f"Line {first.line}:", "Row:"), ex) is False
    # The reference must be named with its own line, not only somewhere in the text.
    wrong = ex.narrative.replace(first.policy_reference, "PI-XXX-00", 1)
    if first.policy_reference not in wrong.split(f"Line {first.line}:")[1].split("Line ")[0]:
        assert narrative_cites(wrong, ex) is False
    assert narrative_cites(None, ex) is False
    clean = next(e for e in examples if not e.findings.flags)
    assert narrative_cites("anything", clean) is None


def test_curriculum_opens_with_short_batches(tokenizer, examples):
    data = train.encode_examples(tokenizer, examples).rows
    lengths = sorted(train._bucket(len(d.ids)) for d in data)
    plain = train.batches(data, 2, seed=3, pad_id=0)
    short = train.batches(data, 2, seed=3, pad_id=0, short_first=4)
    firsts = [next(short)[0].shape[1] for _ in range(4)]
    assert max(firsts) <= lengths[len(lengths) // 2]
    # The same batches in the first epoch, only reordered.
    counts: dict[int, int] = {}
    for n in lengths:
        counts[n] = counts.get(n, 0) + 1
    epoch = sum(c // 2 for c in counts.values())
    short = train.batches(data, 2, seed=3, pad_id=0, short_first=4)
    a = sorted(next(plain)[0].tobytes() for _ in range(epoch))
    b = sorted(next(short)[0].tobytes() for _ in range(epoch))
    assert a == b


@pytest.mark.slow
def test_tiny_training_run_lowers_the_loss(tmp_path):
    cfg = train.TrainConfig(
        steps=12,
        num_examples=64,
        batch_size=4,
        learning_rate=3e-3,
        warmup_steps=2,
        vocab_size=400,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        tokenizer_examples=64,
        log_every=4,
    )
    result = train.train(cfg, tmp_path / "tokenizer.json", log=lambda m: None)
    assert (tmp_path / "tokenizer.json").is_file()
    assert result.steps_done == 12 and result.stopped_by == "steps"
    assert result.losses[-1][1] < result.losses[0][1]


@pytest.mark.slow
def test_training_continues_from_a_saved_checkpoint(tmp_path):
    from pijax.model.hf_io import save_hf_checkpoint

    cfg = train.TrainConfig(
        steps=3,
        num_examples=8,
        batch_size=4,
        learning_rate=1e-2,
        warmup_steps=1,
        vocab_size=400,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        tokenizer_examples=8,
        log_every=1,
    )
    first = train.train(cfg, tmp_path / "tokenizer.json", log=lambda m: None)
    ckpt = tmp_path / "ckpt"
    save_hf_checkpoint(
        first.model_config,
        nnx.state(first.model, nnx.Param),
        tmp_path / "tokenizer.json",
        ckpt,
        "float32",
    )
    more = dataclasses.replace(cfg, data_offset=8, hidden_size=64)  # shape flags are ignored
    second = train.train(more, tmp_path / "tokenizer2.json", log=lambda m: None, init_from=ckpt)
    assert second.model_config == first.model_config
    assert second.tokenizer.to_str() == first.tokenizer.to_str()
    assert second.losses[0][1] < first.losses[0][1]  # starts where the first run got to
