"""Generate completions with pijax.

    python scripts/generate.py --prompt "Claim 123: ..." --max_tokens 64
    python scripts/generate.py --model path/to/hf_checkpoint --prompt a --prompt b --temperature 0.7
"""

from __future__ import annotations

import logging
import time

from absl import app, flags

from pijax import LLM, SamplingParams
from pijax.config import parse_mesh

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "HF checkpoint dir, converted orbax dir, or preset name "
                    "(default: the embedded default model)")
flags.DEFINE_multi_string("prompt", None, "Prompt text (repeatable). Default: a sample claim.")
flags.DEFINE_integer("max_tokens", 64, "Tokens to generate per prompt.")
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1].")
flags.DEFINE_integer("top_k", 0, "Top-k (0 = off).")
flags.DEFINE_integer("seed", None, "Sampling seed (same seed, same output).")
flags.DEFINE_string("mesh", "1,1", "Device mesh 'DATA,MODEL'.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weight and activation dtype.")
flags.DEFINE_integer("page_size", 16, "KV page size in tokens.")
flags.DEFINE_integer("num_pages", None, "KV pool pages (default: a memory fraction).")
flags.DEFINE_bool("ignore_eos", False, "Keep generating past end-of-sequence.")


def default_prompts(llm: LLM) -> list[str]:
    try:
        from pijax.claims.samples import sample_review_prompt
    except ImportError:
        return ["Claim 1001: professional claim, CPT 99213 x2 on the same date of service."]
    return [sample_review_prompt()]


def main(argv):
    del argv
    logging.getLogger().setLevel(logging.INFO)
    llm = LLM(FLAGS.model, mesh_shape=parse_mesh(FLAGS.mesh), dtype=FLAGS.dtype,
              page_size=FLAGS.page_size, num_pages=FLAGS.num_pages)
    prompts = FLAGS.prompt or default_prompts(llm)
    params = SamplingParams(temperature=FLAGS.temperature, top_p=FLAGS.top_p, top_k=FLAGS.top_k,
                            seed=FLAGS.seed, max_tokens=FLAGS.max_tokens,
                            ignore_eos=FLAGS.ignore_eos)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    for prompt, out in zip(prompts, outs, strict=True):
        print(f"=== prompt ({len(out.prompt_token_ids)} tokens) ===\n{prompt}")
        print(f"=== completion ({len(out.token_ids)} tokens, {out.finish_reason.value}) ===")
        print(out.text)
    n = sum(len(o.token_ids) for o in outs)
    print(f"--- {n} tokens in {elapsed:.2f}s ({n / elapsed:.1f} tok/s incl. compilation; "
          f"{llm.engine.compile_count} compilations)")


if __name__ == "__main__":
    app.run(main)
