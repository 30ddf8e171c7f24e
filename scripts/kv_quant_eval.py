"""The KV-cache quantization quality gate: full-precision vs quantized KV on domain prompts.

    python scripts/kv_quant_eval.py --model pijax/data/default_model --kv_cache_dtype int8 \
        --report gate/int8.json
    python scripts/kv_quant_eval.py --model tiny-random --prompts_jsonl my_prompts.jsonl \
        --thresholds stricter.json --report gate/int8.json

Prompts: the payment-integrity generator's held-out claims with the policy scaffold when
`pijax.claims` is installed (`--prompt_source=auto|claims`), a JSONL of your own
(`--prompts_jsonl`, one `{"prompt": "..."}` or `{"prompt_token_ids": [...]}` a line), or
synthetic random tokens (`--prompt_source=random`; says nothing about claims).

Writes the JSON report (`--report`) whether the gate passes or not, prints the figures, and exits
1 naming each failed threshold when the candidate is not acceptable. `scripts/serve.py
--kv_cache_dtype=int8 --kv_quant_gate_report=PATH` starts only with a passing report for the same
model and dtype. See `pijax/quant_gate.py` for what each figure measures. Both runs go through
the engine (two `Engine`s, and the step's `compare_pools` probe variant for teacher forcing).
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags

from pijax.config import DEFAULT_MODEL, parse_mesh
from pijax.quant_gate import (
    GateError,
    GateReport,
    GateSettings,
    PromptSource,
    load_thresholds,
    run_gate,
    write_report,
)

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "model",
    None,
    "HF checkpoint dir, converted orbax dir, or preset name (default: the embedded default model)",
)
flags.DEFINE_enum("kv_cache_dtype", "int8", ["int8", "fp8_e4m3"], "Candidate KV cache dtype.")
flags.DEFINE_string("report", None, "Write the JSON gate report here.")
flags.DEFINE_string("thresholds", None, "Thresholds JSON (default: configs/quant_gate.json).")
flags.DEFINE_enum(
    "prompt_source",
    PromptSource.AUTO.value,
    [m.value for m in PromptSource],
    "auto = claims: synthetic claim-review prompts; random: random token ids; jsonl: a file.",
)
flags.DEFINE_string("prompts_jsonl", None, "JSONL of prompts (implies --prompt_source=jsonl).")
flags.DEFINE_integer("num_prompts", 16, "Prompts from the generator (all of a JSONL's lines).")
flags.DEFINE_integer("max_new_tokens", 64, "Greedy tokens per prompt (N).")
flags.DEFINE_integer(
    "max_prompt_tokens",
    None,
    "Keep at most this many tokens of each prompt "
    "(its end). Default: prompts at their natural length.",
)
flags.DEFINE_integer("prompt_seed", 0, "Seed of the generated prompts.")
flags.DEFINE_enum(
    "dtype",
    "float32",
    ["float32", "bfloat16"],
    "Weights, activations and the full-precision reference pool.",
)
flags.DEFINE_enum(
    "attention_impl",
    "auto",
    ["auto", "reference", "pallas", "pallas_interpret"],
    "Attention path (as the server would use it).",
)
flags.DEFINE_integer("page_size", 16, "KV page size in tokens.")
flags.DEFINE_integer(
    "prefill_chunk",
    128,
    "Step token budget per sequence (the engines' max_num_batched_tokens = batch_size x this).",
)
flags.DEFINE_integer("batch_size", 8, "Prompts run together (the engines' max_num_seqs).")
flags.DEFINE_integer("model_seed", 0, "Initialization seed of random presets.")
flags.DEFINE_string("mesh", "1,1", "Device mesh 'DATA,MODEL'.")


def print_report(r: GateReport) -> None:
    fg = r.figures
    print(
        f"KV quant gate: {r.model_id} kv_cache_dtype={r.kv_cache_dtype} "
        f"({r.settings['prompt_source_used']} prompts)"
    )
    print(
        f"{'prompt':<32} {'tokens':>6} {'gen':>4} {'greedy':>6} {'div@':>5} {'top1':>6} "
        f"{'mean KL':>9} {'max KL':>9} {'attn err':>9}"
    )
    for p in r.prompts:
        div = "-" if p.first_divergence is None else str(p.first_divergence)
        print(
            f"{p.name[:32]:<32} {p.num_prompt_tokens:>6} {p.num_generated:>4} "
            f"{p.greedy_agreement:>6.3f} {div:>5} {p.top1_agreement:>6.3f} {p.mean_kl:>9.2e} "
            f"{p.max_kl:>9.2e} {p.max_attention_rel_error:>9.2e}"
        )
    print(f"overall over {fg.num_prompts} prompts, {fg.num_positions} teacher-forced positions:")
    print(f"  top-1 agreement        {fg.top1_agreement:.4f}")
    print(f"  mean KL                {fg.mean_kl:.3e}  (max {fg.max_kl:.3e})")
    print(
        f"  greedy agreement       {fg.greedy_agreement:.4f}  ({fg.num_diverged} diverged, "
        f"earliest at token {fg.earliest_divergence})"
    )
    print(
        "  attention rel. error   "
        + " ".join(f"L{i}:{e:.2e}" for i, e in enumerate(fg.attention_rel_error))
        + f"  (worst layer {fg.worst_layer})"
    )
    limits = ", ".join(f"{k}={v}" for k, v in r.thresholds.to_dict().items() if v is not None)
    print(f"thresholds: {limits}")
    print("PASS" if r.passed else "FAIL: " + "; ".join(r.failures))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    try:
        thresholds = load_thresholds(FLAGS.thresholds)
        settings = GateSettings(
            model=FLAGS.model or DEFAULT_MODEL,
            kv_cache_dtype=FLAGS.kv_cache_dtype,
            prompt_source=PromptSource.JSONL if FLAGS.prompts_jsonl else FLAGS.prompt_source,
            prompts_jsonl=FLAGS.prompts_jsonl,
            num_prompts=FLAGS.num_prompts,
            max_new_tokens=FLAGS.max_new_tokens,
            max_prompt_tokens=FLAGS.max_prompt_tokens,
            prompt_seed=FLAGS.prompt_seed,
            dtype=FLAGS.dtype,
            attention_impl=FLAGS.attention_impl,
            page_size=FLAGS.page_size,
            prefill_chunk=FLAGS.prefill_chunk,
            batch_size=FLAGS.batch_size,
            model_seed=FLAGS.model_seed,
        )
        report = run_gate(settings, thresholds, parse_mesh(FLAGS.mesh))
    except (GateError, ValueError) as e:
        raise app.UsageError(str(e), exitcode=2) from None
    if FLAGS.report:
        write_report(report, FLAGS.report)
        logging.info("gate report written to %s", FLAGS.report)
    print_report(report)
    if not report.passed:
        print(
            f"KV quant gate FAILED for {report.kv_cache_dtype}: " + "; ".join(report.failures),
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
