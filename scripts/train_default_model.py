"""Train pijax's embedded default claim-review model on the synthetic corpus, on CPU.

    pip install -e ".[train]"     # optax
    python scripts/train_default_model.py --out_dir /tmp/default_model

The defaults are the reproduction recipe: one run from scratch in under an hour of a 2-core CPU
(50 minutes of training, then the held-out evaluation). The shipped checkpoint continued from such
a run in further stages (`--init_from`, `--data_offset`); its model card lists every command.

Generates the synthetic payment-integrity corpus (`pijax.claims`; no real patient data), trains a
byte-level BPE tokenizer on it, trains a small Llama with AdamW on the answer tokens, writes an HF
checkpoint directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
generation_config.json) that pijax and transformers both load, then evaluates it on held-out
claims through the engine, greedy, without and with JSON-schema constrained decoding: the share
of answers that validate against the findings schema and the share whose flags match the rules.
Writes eval.json and train_report.json beside the checkpoint.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax
from absl import app, flags, logging
from flax import nnx

from pijax.claims import evaluate, train
from pijax.claims.chat_template import write_chat_template
from pijax.claims.corpus import generate_examples
from pijax.claims.prompt import (
    BOS,
    END,
    PAD,
    policy_scaffold,
    render_claim_segment,
    render_policy_segment,
    render_prompt,
)
from pijax.model.hf_io import save_hf_checkpoint

FLAGS = flags.FLAGS
_DEFAULTS = train.TrainConfig()  # one set of defaults: the reproduction recipe
flags.DEFINE_string("out_dir", "pijax/data/default_model", "Checkpoint directory to write.")
flags.DEFINE_integer(
    "steps", _DEFAULTS.steps, "Training steps (an upper bound with --time_budget_min)."
)
flags.DEFINE_integer(
    "seed", _DEFAULTS.seed, "Seed of the corpus, the initialization and the data order."
)
flags.DEFINE_integer("num_examples", None, "Distinct training claims (default steps * batch).")
flags.DEFINE_integer("batch_size", _DEFAULTS.batch_size, "Sequences per step.")
flags.DEFINE_float("learning_rate", _DEFAULTS.learning_rate, "Peak AdamW learning rate.")
flags.DEFINE_integer("warmup_steps", _DEFAULTS.warmup_steps, "Linear warmup steps.")
flags.DEFINE_float(
    "decay_fraction",
    _DEFAULTS.decay_fraction,
    "Last share of training that decays the learning rate linearly to 0.",
)
flags.DEFINE_float(
    "context_loss_weight",
    _DEFAULTS.context_loss_weight,
    "Loss weight of the claim tokens (the answer's "
    "is 1): what teaches the model to copy codes and ids.",
)
flags.DEFINE_string(
    "init_from",
    None,
    "Continue training from this checkpoint directory (its "
    "weights and tokenizer; the model shape flags are ignored).",
)
flags.DEFINE_integer(
    "data_offset",
    0,
    "Index of the first training claim (a continued run "
    "should take claims the first run did not see).",
)
flags.DEFINE_float(
    "time_budget_min",
    _DEFAULTS.time_budget_s / 60.0,
    "Stop training after this many minutes (the learning-rate decay is scheduled to finish by "
    "then; 0: no limit). The default fits the one-hour CPU reproduction, evaluation included.",
)
flags.DEFINE_integer(
    "vocab_size", _DEFAULTS.vocab_size, "BPE vocabulary size (special tokens included)."
)
flags.DEFINE_integer("hidden_size", _DEFAULTS.hidden_size, "Model width.")
flags.DEFINE_integer("intermediate_size", _DEFAULTS.intermediate_size, "MLP hidden width.")
flags.DEFINE_integer("num_layers", _DEFAULTS.num_layers, "Decoder layers.")
flags.DEFINE_integer("num_heads", _DEFAULTS.num_heads, "Attention heads.")
flags.DEFINE_integer(
    "num_kv_heads", _DEFAULTS.num_kv_heads, "Key/value heads (grouped-query attention)."
)
flags.DEFINE_enum("checkpoint_dtype", "float32", ["float32", "bfloat16"], "Weights on disk.")
flags.DEFINE_integer("eval_claims", 64, "Held-out claims to evaluate (0 skips evaluation).")
flags.DEFINE_integer("eval_max_new_tokens", 512, "Answer budget per held-out claim.")
flags.DEFINE_bool("constrained_eval", True, "Also evaluate with JSON-schema constrained decoding.")
flags.DEFINE_integer("log_every", _DEFAULTS.log_every, "Steps between loss log lines.")
flags.DEFINE_bool(
    "eval_only", False, "Only evaluate the checkpoint in --out_dir again (eval.json, README.md)."
)
flags.DEFINE_integer(
    "curriculum_steps",
    _DEFAULTS.curriculum_steps,
    "The first steps train on the shorter half of the claims (curriculum).",
)
flags.DEFINE_integer(
    "checkpoint_every",
    0,
    "Steps between intermediate checkpoints written to --checkpoint_dir (0: none), so a run "
    "stopped early still leaves a model.",
)
flags.DEFINE_float(
    "agent_share",
    _DEFAULTS.agent_share,
    "Share of the training claims that also carry the review agent's investigation turns "
    "(tool calls, FAKE lookups, narrative; pijax.claims.agent).",
)
flags.DEFINE_list(
    "focus_flags",
    list(_DEFAULTS.focus_flags),
    "Flag types to oversample (e.g. DUPLICATE_BILLING,DIAGNOSIS_MISMATCH); see --focus_share.",
)
flags.DEFINE_float(
    "focus_share",
    _DEFAULTS.focus_share,
    "Least share of training claims with one of --focus_flags (0: natural).",
)
flags.DEFINE_string(
    "checkpoint_dir", None, "Where intermediate checkpoints go (default --out_dir)."
)


def tokenizer_config(max_len: int) -> dict:
    # The rendered prompt carries <bos> itself, so loaders must not add another.
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": BOS,
        "eos_token": END,
        "pad_token": PAD,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
    }


def run_eval(out: Path, seed: int, num_claims: int, max_new_tokens: int, constrained: bool) -> dict:
    from pijax.engine import LLM

    examples = generate_examples(seed, num_claims, split="heldout")
    prompts = [render_prompt(policy_scaffold(), ex.claim) for ex in examples]
    max_len, seqs, page = 1536, 32, 16
    llm = LLM(
        str(out),
        max_model_len=max_len,
        max_num_seqs=seqs,
        max_num_batched_tokens=1024,
        page_size=page,
        num_pages=1 + seqs * max_len // page,
    )
    result: dict = {
        "split": "heldout",
        "seed": seed,
        "num_claims": num_claims,
        "decoding": "greedy",
        "max_new_tokens": max_new_tokens,
    }
    t = time.monotonic()
    result["unconstrained"] = evaluate.evaluate_unconstrained(
        llm, prompts, examples, max_new_tokens
    ).to_json()
    result["unconstrained"]["seconds"] = round(time.monotonic() - t, 1)
    if not constrained:
        result["constrained"] = {"skipped": "--noconstrained_eval"}
        return result
    t = time.monotonic()
    report, outs = evaluate.evaluate_constrained_outputs(llm, prompts, examples, max_new_tokens)
    result["constrained"] = report.to_json()
    result["constrained"]["goals"] = report.goals()
    print("eval constrained:\n" + evaluate.format_report(report))
    result["constrained"]["seconds"] = round(time.monotonic() - t, 1)
    t = time.monotonic()
    agent = evaluate.evaluate_agent(
        llm,
        render_policy_segment(policy_scaffold()),
        [render_claim_segment(ex.claim) for ex in examples],
        outs,
        examples,
    )
    result["agent"] = agent.to_json()
    result["agent"]["seconds"] = round(time.monotonic() - t, 1)
    print(f"eval agent turns (after the constrained findings): {agent_summary(result['agent'])}")
    return result


def agent_summary(r: dict) -> str:
    return (
        f"well-formed tool calls {_pct(r['calls_share'])}, the calls the findings call for "
        f"{_pct(r['calls_match_share'])}, narrative cites flagged lines "
        f"{_pct(r['narrative_cites_share'])}, narrative repeats the findings' "
        f"{_pct(r['narrative_follows_findings_share'])}"
    )


def main(argv):
    del argv
    if FLAGS.eval_only:
        return eval_only(Path(FLAGS.out_dir))
    t0 = time.monotonic()
    cfg = train.TrainConfig(
        steps=FLAGS.steps,
        seed=FLAGS.seed,
        num_examples=FLAGS.num_examples,
        batch_size=FLAGS.batch_size,
        learning_rate=FLAGS.learning_rate,
        warmup_steps=FLAGS.warmup_steps,
        decay_fraction=FLAGS.decay_fraction,
        context_loss_weight=FLAGS.context_loss_weight,
        data_offset=FLAGS.data_offset,
        time_budget_s=60.0 * FLAGS.time_budget_min if FLAGS.time_budget_min > 0 else None,
        vocab_size=FLAGS.vocab_size,
        hidden_size=FLAGS.hidden_size,
        intermediate_size=FLAGS.intermediate_size,
        num_layers=FLAGS.num_layers,
        num_heads=FLAGS.num_heads,
        num_kv_heads=FLAGS.num_kv_heads,
        log_every=FLAGS.log_every,
        checkpoint_every=FLAGS.checkpoint_every,
        curriculum_steps=FLAGS.curriculum_steps,
        agent_share=FLAGS.agent_share,
        focus_flags=tuple(FLAGS.focus_flags),
        focus_share=FLAGS.focus_share,
    )
    out = Path(FLAGS.out_dir)
    with tempfile.TemporaryDirectory() as staging:
        tok_path = Path(staging) / "tokenizer.json"
        previous = None
        if FLAGS.init_from:
            report_path = Path(FLAGS.init_from) / "train_report.json"
            previous = json.loads(report_path.read_text()) if report_path.is_file() else None
        (Path(staging) / "tokenizer_config.json").write_text(
            json.dumps(tokenizer_config(cfg.max_position_embeddings), indent=2) + "\n"
        )

        def write_checkpoint(directory: Path, model) -> None:
            save_hf_checkpoint(
                model.config,
                nnx.state(model, nnx.Param),
                tok_path,
                directory,
                FLAGS.checkpoint_dtype,
            )
            write_chat_template(directory)  # its default system message: the policy scaffold

        def on_checkpoint(step: int, model, tok) -> None:
            directory = Path(FLAGS.checkpoint_dir or out)
            write_checkpoint(directory, model)
            (directory / "checkpoint_step.txt").write_text(f"{step}\n")
            logging.info("checkpoint at step %d: %s", step, directory)

        result = train.train(
            cfg,
            tok_path,
            log=lambda m: logging.info("%s", m),
            init_from=FLAGS.init_from,
            on_checkpoint=on_checkpoint if FLAGS.checkpoint_every else None,
        )
        write_checkpoint(out, result.model)
    train_done = time.monotonic()
    weights = out / "model.safetensors"
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "train_seconds": round(result.train_seconds, 1),
        "steps": result.steps_done,
        "stopped_by": result.stopped_by,
        "examples_seen": result.examples_seen,
        "data_end": result.data_end,
        "tokens_seen": result.tokens_seen,
        "answer_tokens_seen": result.target_tokens_seen,
        "final_loss": result.losses[-1][1] if result.losses else None,
        "loss_curve": [[s, round(v, 4)] for s, v in result.losses],
        "num_params": train.num_params(nnx.state(result.model, nnx.Param)),
        "checkpoint_bytes": weights.stat().st_size,
        "checkpoint_dtype": FLAGS.checkpoint_dtype,
        "model": result.model_config.to_hf_dict(),
        "train_config": {k: v for k, v in vars(cfg).items()},
        "continued_from": previous,  # the report of the run whose weights this one started from
        "machine": {
            "backend": jax.default_backend(),
            "cpu_count": os.cpu_count(),
            "jax": jax.__version__,
            "python": platform.python_version(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
        },
    }
    _write_json(out / "train_report.json", report)
    logging.info(
        "checkpoint: %s (%.1f MB), %s parameters, trained %d steps in %.0f s",
        out,
        report["checkpoint_bytes"] / 1e6,
        f"{report['num_params']:,}",
        result.steps_done,
        result.train_seconds,
    )

    if FLAGS.eval_claims > 0:
        ev = run_eval(
            out, FLAGS.seed, FLAGS.eval_claims, FLAGS.eval_max_new_tokens, FLAGS.constrained_eval
        )
        _write_json(out / "eval.json", ev)
        for mode in ("unconstrained", "constrained"):
            r = ev[mode]
            if "skipped" in r:
                print(f"eval {mode}: skipped ({r['skipped']})")
            else:
                print(
                    f"eval {mode}: {r['num_claims']} held-out claims, schema-valid "
                    f"{r['schema_valid_share']:.1%}, flags match {r['flags_match_share']:.1%}, "
                    f"exact {r['exact_match_share']:.1%}"
                )
    report["eval_seconds"] = round(time.monotonic() - train_done, 1)
    report["total_seconds"] = round(time.monotonic() - t0, 1)
    _write_json(out / "train_report.json", report)
    (out / "README.md").write_text(model_card(report, ev if FLAGS.eval_claims > 0 else None))
    print(
        f"train_report: {report['num_params']:,} params, {report['checkpoint_bytes']:,} bytes, "
        f"train {report['train_seconds']:.0f} s, total {report['total_seconds']:.0f} s"
    )


def eval_only(out: Path) -> None:
    """Evaluate the checkpoint in `out` again (eval.json, the model card), without training."""
    report = json.loads((out / "train_report.json").read_text())
    t = time.monotonic()
    ev = run_eval(
        out, FLAGS.seed, FLAGS.eval_claims, FLAGS.eval_max_new_tokens, FLAGS.constrained_eval
    )
    _write_json(out / "eval.json", ev)
    report["eval_seconds"] = round(time.monotonic() - t, 1)
    _write_json(out / "train_report.json", report)
    (out / "README.md").write_text(model_card(report, ev))


def model_card(report: dict, ev: dict | None) -> str:
    m = report["model"]
    lines = [
        "# pijax default claim-review model",
        "",
        "A small Llama-architecture model trained by `scripts/train_default_model.py` on the",
        "synthetic payment-integrity corpus of `pijax.claims`. SYNTHETIC DATA ONLY: it has never",
        "seen a real claim and must not be used to review one. It exists so that pijax's first",
        "command prints a readable review and exercises the tokenizer, checkpoint loading and",
        "structured output.",
        "",
        f"- {report['num_params']:,} parameters: {m['num_hidden_layers']} layers, width "
        f"{m['hidden_size']}, {m['num_attention_heads']} heads / {m['num_key_value_heads']} kv "
        f"heads, vocabulary {m['vocab_size']} (byte-level BPE, one token per digit)",
        f"- trained {report['steps']} steps ({report['examples_seen']:,} claims) in "
        f"{report['train_seconds'] / 60:.1f} min on {report['machine']['cpu_count']} CPU cores",
        f"- `model.safetensors`: {report['checkpoint_bytes'] / 2**20:.1f} MiB "
        f"({report['checkpoint_dtype']})",
        f"- command: `{report['command']}`",
    ]
    runs, prev = [], report.get("continued_from")
    while prev:  # earliest run first
        runs.insert(
            0,
            f"- continued from: {prev['steps']} steps ({prev['examples_seen']:,} claims) "
            f"in {prev['train_seconds'] / 60:.1f} min, command `{prev['command']}`",
        )
        prev = prev.get("continued_from")
    lines += runs + [
        "",
        "Prompt format (`pijax.claims.prompt`): `<bos><|policy|>{policy}\\n<|claim|>{claim}\\n"
        "<|review|>`; the answer is the findings JSON (`configs/schemas/findings.schema.json`)",
        "followed by `<|end|>`. In a share of the training rows (`--agent_share`) the review",
        "agent's investigation follows (`pijax.claims.agent`): the model's tool calls, the FAKE",
        "lookups' output, and the narrative it then writes.",
    ]
    if ev is not None:
        lines += [
            "",
            f"Held-out evaluation ({ev['num_claims']} claims of the `heldout` split, never "
            "trained on; greedy; `eval.json`; `pijax.claims.evaluate`):",
            "",
        ]
        for mode in ("unconstrained", "constrained"):
            r = ev[mode]
            if "skipped" in r:
                lines.append(f"- {mode}: skipped ({r['skipped']})")
                continue
            lines.append(
                f"- {mode}: schema-valid {_pct(r['schema_valid_share'])}, claim id exact "
                f"{_pct(r.get('claim_id_share'))}, flags match {_pct(r['flags_match_share'])}, "
                f"action {_pct(r['action_match_share'])}, narrative cites flagged lines "
                f"{_pct(r.get('narrative_cites_share'))}, exact {_pct(r['exact_match_share'])}"
            )
        r = ev.get("constrained", {})
        if "per_flag" in r:
            lines += ["", "Per flag type (constrained): true / predicted, precision, recall", ""]
            for code, f in r["per_flag"].items():
                lines.append(
                    f"- {code}: {f['support']} / {f['predicted']}, {_pct(f['precision'])}, "
                    f"{_pct(f['recall'])}"
                )
        if "calls_share" in ev.get("agent", {}):
            lines += [
                "",
                "Review-agent turns after the constrained findings (`pijax.claims.agent`; "
                "tool calls, FAKE lookups, narrative; greedy): " + agent_summary(ev["agent"]),
            ]
        if "goals" in r:
            lines += ["", "Goals (held-out, greedy, constrained):", ""]
            for name, g in r["goals"].items():
                m = g["measured"]
                gap = (
                    ""
                    if g["met"] or m is None
                    else f", short by {100 * (g['goal'] - m):.0f} points"
                )
                lines.append(
                    f"- {name} >= {g['goal']:.0%}: {_pct(m)} "
                    f"({'met' if g['met'] else 'missed'}{gap})"
                )
    return "\n".join(lines) + "\n"


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


if __name__ == "__main__":
    app.run(main)
