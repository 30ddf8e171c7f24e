"""The transformers baseline: the same weights and the same requests through `generate`.

What a team would otherwise build: a static-batching loop over `AutoModelForCausalLM.generate`.
Up to `batch_size` requests that have arrived are left-padded into one batch and generated
together until the longest of them is done (`min_new_tokens = max_new_tokens` = the batch's
longest drawn output: with a real model the shorter rows would emit EOS and keep occupying their
slot, which is what padding costs). The next batch starts when this one returns. There is no KV
reuse across calls, so every session turn re-prefills its whole history.

Token times come from a logits processor that stamps the clock at each decoding step (as if the
tokens were streamed); a request finishes when its batch returns, which is when `generate` hands
it back. Needs the `reference` extra (torch, transformers).
"""

from __future__ import annotations

import collections
import time
from pathlib import Path

from pijax.bench.driver import ArrivalDriver, ArrivalSpec
from pijax.bench.runner import RunResult, StepSample, TurnRecord, turn_kind
from pijax.model.hf_io import save_hf_checkpoint
from pijax.model.loader import LoadedModel
from pijax.workload import Workload


def available() -> bool:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def export_weights(model: LoadedModel, out_dir: str | Path, dtype: str = "float32") -> Path:
    """The engine's (random) weights as an HF checkpoint transformers can load."""
    return save_hf_checkpoint(model.config, model.params, None, out_dir, dtype)


def skip_reason(jax_backend: str) -> str | None:
    """Why the baseline cannot run here, or None. Against an engine on an accelerator, a
    transformers baseline on the CPU would be no comparison: it needs torch with CUDA."""
    if not available():
        return "needs the reference extra (pip install -e .[reference])"
    import torch

    if jax_backend != "cpu" and not torch.cuda.is_available():
        return f"the engine runs on {jax_backend} but this torch has no CUDA"
    return None


def load(checkpoint: str | Path, dtype: str = "float32"):
    """The checkpoint in transformers, on the GPU when torch has one."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    return (
        transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, dtype))
        .eval()
        .to("cuda" if torch.cuda.is_available() else "cpu")
    )


def tune_threads(model, batch_size: int, prompt_len: int = 64) -> dict:
    """Warm the model up and give torch its best intra-op thread count on this machine.

    On a small CPU shared with other work, torch's OpenMP threads can spin against each other
    and run an order of magnitude slower than one thread (seen on a loaded 2-core machine: a
    64-token forward at 0.6 s with 2 threads, 0.02 s with 1). A fair baseline runs at its best,
    so each candidate count is timed on a representative forward and the fastest is kept.
    Returns the chosen count and the timings."""
    import os

    import torch

    ids = torch.ones((batch_size, prompt_len), dtype=torch.long, device=model.device)
    timings = {}
    with torch.no_grad():
        for n in sorted({1, os.cpu_count() or 1}):
            torch.set_num_threads(n)
            model.generate(
                input_ids=ids[:1, :8],
                max_new_tokens=2,
                min_new_tokens=2,
                do_sample=False,
                pad_token_id=0,
            )  # first-call setup
            best = float("inf")
            for _ in range(3):
                t = time.monotonic()
                model(ids)
                best = min(best, time.monotonic() - t)
            timings[n] = best
    chosen = min(timings, key=timings.get)
    torch.set_num_threads(chosen)
    return {"chosen": chosen, "forward_s_by_threads": timings}


class _StepClock:
    """A logits processor that only records when each decoding step's logits were ready."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.monotonic())
        return scores


def run_hf(
    model,
    workload: Workload,
    arrival: ArrivalSpec,
    *,
    batch_size: int,
    pad_token_id: int = 0,
    name: str = "hf-transformers",
    bar=None,
) -> RunResult:
    import torch
    from transformers import LogitsProcessorList

    start = time.monotonic()
    driver = ArrivalDriver(workload, arrival, start)
    ready: collections.deque = collections.deque()
    turns: list[TurnRecord] = []
    steps: list[StepSample] = []
    while not driver.done:
        ready.extend(driver.due(time.monotonic()))
        if not ready:
            nxt = driver.next_time()
            if nxt is None:
                break
            time.sleep(max(0.0, nxt - time.monotonic()))
            continue
        batch = [ready.popleft() for _ in range(min(batch_size, len(ready)))]
        prompts = [[t for s in p.prompt for t in s.content] for p in batch]
        width = max(map(len, prompts))
        ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, pr in enumerate(prompts):
            ids[i, width - len(pr) :] = torch.tensor(pr)
            mask[i, width - len(pr) :] = 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        new = max(p.output_len for p in batch)
        clock = _StepClock()
        t0 = time.monotonic()
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=pad_token_id,
                logits_processor=LogitsProcessorList([clock]),
            )
        t1 = time.monotonic()
        steps.append(StepSample(t1, t1 - t0, len(batch), len(ready), None, None))
        for i, p in enumerate(batch):
            n = p.output_len
            tokens = out[i, width : width + n].tolist()
            turns.append(
                TurnRecord(
                    request_id=p.request_id,
                    conversation=p.conv.index,
                    turn=p.turn,
                    kind=turn_kind(p),
                    claim_kind=p.conv.kind,
                    arrival=p.arrival,
                    first_scheduled=t0,
                    token_times=clock.times[:n],
                    finish=t1,
                    prompt_tokens=len(prompts[i]),
                    cached_tokens=0,
                )
            )
            driver.finished(p, t1, tokens)
            if bar is not None:
                bar.update(1)
    return RunResult(
        name=name,
        start=start,
        end=time.monotonic(),
        turns=turns,
        steps=steps,
        conversations_done=driver.num_done,
        conversations_dropped=0,
        compiles_during_run=None,
        preemptions=None,
        prefix=None,
    )
