"""Admission instead of thrash (issue 14): two requests that each fit the KV pool alone but not
together, run one after the other and then together, on the real engine.

    python scripts/bench_admission.py                      # 900+900 and 900+600 in 128 pages of 16
    python scripts/bench_admission.py --model tiny-random --out benchmarks/results/admission.json

Reports wall time of each mode, their ratio (goal: together <= 1.3x sequential), preemptions and
tokens computed. Greedy, `ignore_eos`, so both modes produce the same tokens. Wall times are
figures of this machine, not assertions (the test suite checks the preemption count instead).
"""

from __future__ import annotations

import json
import time

from absl import app, flags

from pijax import LLM, SamplingParams

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "tiny-random", "Model (preset name or checkpoint).")
flags.DEFINE_integer("num_pages", 129, "KV pool pages (one is the null page).")
flags.DEFINE_integer("page_size", 16, "Tokens per page.")
flags.DEFINE_multi_string("shape", ["900+900", "900+600"], "PROMPT+MAX_TOKENS of each request.")
flags.DEFINE_integer("max_num_batched_tokens", 256, "Token budget per step.")
flags.DEFINE_string("out", None, "Write the report as JSON here too.")


def run(llm: LLM, prompts, params, together: bool) -> tuple[float, list]:
    engine = llm.engine
    before = engine.stats().num_preemptions
    t0 = time.perf_counter()
    outs = (
        llm.generate(prompts, params, use_tqdm=False)
        if together
        else [
            o
            for p, q in zip(prompts, params, strict=True)
            for o in llm.generate([p], [q], use_tqdm=False)
        ]
    )
    return time.perf_counter() - t0, outs, engine.stats().num_preemptions - before


def main(argv):
    del argv
    shapes = [tuple(int(x) for x in s.split("+")) for s in FLAGS.shape]
    llm = LLM(
        FLAGS.model,
        num_pages=FLAGS.num_pages,
        page_size=FLAGS.page_size,
        max_model_len=max(n + m for n, m in shapes),
        max_num_seqs=4,
        max_num_batched_tokens=FLAGS.max_num_batched_tokens,
    )
    prompts = [[1 + (7 * i + j) % 200 for j in range(n)] for i, (n, _) in enumerate(shapes)]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for _, m in shapes]
    run(llm, [p[:64] for p in prompts], params, together=True)  # compile the step shapes
    seq_s, seq_out, seq_pre = run(llm, prompts, params, together=False)
    tog_s, tog_out, tog_pre = run(llm, prompts, params, together=True)
    same = [o.token_ids for o in seq_out] == [o.token_ids for o in tog_out]
    report = {
        "model": FLAGS.model,
        "pool": f"{FLAGS.num_pages - 1} pages of {FLAGS.page_size}",
        "shapes": FLAGS.shape,
        "sequential_s": round(seq_s, 2),
        "together_s": round(tog_s, 2),
        "ratio": round(tog_s / seq_s, 3),
        "preemptions_together": tog_pre,
        "preemptions_sequential": seq_pre,
        "same_tokens": same,
    }
    print(json.dumps(report, indent=2))
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    app.run(main)
