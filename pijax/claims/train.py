"""Train the default claim-review model on the synthetic corpus (CPU-sized).

The pipeline `scripts/train_default_model.py` drives: generate the corpus, train the BPE
tokenizer, encode `prompt + answer` sequences, and fit a small `LlamaModel` with AdamW on the
answer tokens only (the policy and claim are context, not targets). Training uses the model's own
`forward_dense`; there is no second model definition. The claim tokens are targets too, at a
small weight (`context_loss_weight`): the claim table repeats itself (each line's diagnosis is one
listed in the header, dates recur, a duplicate repeats a whole line), and predicting those repeats
is what teaches the model to copy, which the answer needs for the claim id and every flag's codes
and dates; on answer tokens alone a 1600-step run never learned to copy. The policy segment, the same in every
sequence, is passed as `forward_dense`'s shared prefix: computed once per batch rather than once
per row (the same logits; about a third less work at batch 8).

Budget: on a shared 2-core CPU the cost is tokens x (parameters + attention over the length), so
sequences are grouped into a few length buckets (one compile each) and the learning rate follows
warmup -> constant -> linear decay over a progress measure that is the larger of steps done and
wall time used, so a run capped by `time_budget_s` still ends with its decay phase.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tokenizers
from flax import nnx
from tqdm import tqdm

from pijax.claims import agent
from pijax.claims.bpe import special_token_ids, train_tokenizer, training_texts
from pijax.claims.codes import FlagCode
from pijax.claims.corpus import Example, generate_example, generate_examples
from pijax.claims.prompt import (
    BOS,
    END,
    EOS,
    PAD,
    policy_scaffold,
    render_claim_segment,
    render_policy_segment,
    render_target,
)
from pijax.config import ModelConfig
from pijax.model.llama import LlamaModel

BUCKET = 64  # sequence lengths are padded up to a multiple of this (one compile per bucket)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. The defaults are the reproduction recipe: one run from scratch that
    fits an hour of a 2-core CPU (`time_budget_s` stops it, `steps` bounds it on faster
    hardware); the shipped checkpoint continued from such runs (its model card lists them)."""

    steps: int = 8000
    seed: int = 0
    num_examples: int | None = None  # distinct training claims; default steps * batch_size
    batch_size: int = 8
    learning_rate: float = 4e-3
    warmup_steps: int = 30
    decay_fraction: float = 0.5  # the last share of progress decays the learning rate to 0
    weight_decay: float = 0.1
    # Loss weight of the claim tokens (answer tokens: 1). Small: a claim's ids and dates are
    # drawn at random, so at 0.3 most of the minimized loss was unpredictable claim tokens.
    context_loss_weight: float = 0.05
    time_budget_s: float | None = 50 * 60.0  # stop (after decaying) once training took this long
    vocab_size: int = 1024  # one token per digit leaves few merges to learn: ~1020 are used
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 2048
    tokenizer_examples: int = 4000
    data_offset: int = 0  # index of the first training claim (a continued run takes fresh ones)
    log_every: int = 10
    curriculum_steps: int = 150  # the first steps train on the shorter half of the claims
    checkpoint_every: int = 0  # steps between `on_checkpoint` calls (0: none before the end)
    agent_share: float = 0.2  # share of the claims trained with the agent's investigation turns
    # Oversampling: claims with one of these flag types make up at least `focus_share` of the
    # training claims (the others are skipped as needed; see `training_examples`). The default
    # pair is the one the model learns slowest (a comparison across lines; a lookup per line).
    focus_flags: tuple[str, ...] = ("DUPLICATE_BILLING", "DIAGNOSIS_MISMATCH")
    focus_share: float = 0.5

    def __post_init__(self):
        for name in (
            "steps",
            "batch_size",
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "tokenizer_examples",
            "log_every",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be a multiple of num_heads={self.num_heads}"
            )
        if not 0 <= self.context_loss_weight <= 1:
            raise ValueError(
                f"context_loss_weight must be in [0, 1]; got {self.context_loss_weight}"
            )
        for name in ("agent_share", "focus_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1]; got {getattr(self, name)}")
        unknown = sorted(set(self.focus_flags) - set(FlagCode.__members__))
        if unknown:
            raise ValueError(
                f"focus_flags must be flag types of {sorted(FlagCode.__members__)}; got {unknown}"
            )
        if not 0 <= self.decay_fraction < 1:
            raise ValueError(f"decay_fraction must be in [0, 1); got {self.decay_fraction}")

    @property
    def total_examples(self) -> int:
        return self.num_examples or self.steps * self.batch_size


@dataclasses.dataclass
class TrainResult:
    model: LlamaModel
    model_config: ModelConfig
    tokenizer: tokenizers.Tokenizer
    steps_done: int
    examples_seen: int
    tokens_seen: int  # positions run through the model (padded rows + the prefix once)
    target_tokens_seen: int
    train_seconds: float
    losses: list[tuple[int, float]]  # (step, mean answer-token loss over the last log interval)
    stopped_by: str  # "steps" or "time_budget"
    data_end: int = 0  # index after the last training claim drawn (a continued run starts here)


# --- data ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Encoded:
    ids: np.ndarray  # claim segment + answer token ids (the sequence after the shared prefix)
    targets: np.ndarray  # bool per token of `ids`: the model's own turns (loss weight 1)

    @property
    def answer_start(self) -> int:
        """Index in `ids` of the first answer token (the findings JSON)."""
        return int(np.argmax(self.targets))


@dataclasses.dataclass(frozen=True)
class EncodedCorpus:
    prefix: np.ndarray  # the policy segment's ids: every training sequence opens with them
    rows: list[Encoded]


def training_examples(cfg: TrainConfig) -> tuple[list[Example], int]:
    """`cfg.total_examples` training claims from index `cfg.data_offset` on, and the index after
    the last one drawn (where a continued run should start).

    With `focus_flags`, the claims are drawn in index order and a claim without any of those flag
    types is skipped whenever keeping it would bring the focus claims' share below
    `focus_share`: the hard flag types get more of the gradient, and nothing is repeated.
    """
    if not cfg.focus_flags or cfg.focus_share == 0:
        end = cfg.data_offset + cfg.total_examples
        return generate_examples(cfg.seed, cfg.total_examples, "train", cfg.data_offset), end
    out: list[Example] = []
    others = 0
    index = cfg.data_offset
    while len(out) < cfg.total_examples:
        ex = generate_example(cfg.seed, index, "train")
        index += 1
        if any(f.code.value in cfg.focus_flags for f in ex.findings.flags):
            out.append(ex)
        elif others + 1 <= (1 - cfg.focus_share) * (len(out) + 1):
            out.append(ex)
            others += 1
    return out, index


def transcript(example: Example, agent_turns: bool) -> list[tuple[str, bool]]:
    """The text pieces after the policy segment, each with whether it is the model's own turn.

    Plain: the claim segment, then the findings JSON and `<|end|>`. With `agent_turns`, the
    review agent's investigation follows (`pijax.claims.agent`): the tool request, the model's
    tool calls, the FAKE lookups' output, the narrative request, the narrative. Each piece is
    one prompt segment of the agent's session, tokenized on its own as the server does.
    """
    pieces = [
        (render_claim_segment(example.claim), False),
        (render_target(example.findings, example.narrative), True),
    ]
    if agent_turns:
        codes = {line.number: line.code for line in example.claim.lines}
        calls = agent.findings_calls(example.findings, codes)
        pieces += [
            (agent.TOOL_REQUEST, False),
            (calls + END, True),
            (agent.tool_output_segment(agent.parse_tool_calls(calls)), False),
            (example.narrative + END, True),
        ]
    return pieces


def encode_examples(
    tok: tokenizers.Tokenizer,
    examples: Sequence[Example],
    agent_share: float = 0.0,
    seed: int = 0,
) -> EncodedCorpus:
    """Token ids and target masks; a seeded `agent_share` of the claims carry the agent turns."""
    # The policy segment is the same for every claim and ends before a special token, so it is
    # encoded once (prefix + row is exactly the whole prompt's encoding; see prompt.py).
    policy = tok.encode(render_policy_segment(policy_scaffold()), add_special_tokens=False).ids
    rng = random.Random(f"agent-turns/{seed}")
    pieces = [transcript(ex, rng.random() < agent_share) for ex in examples]
    flat = [text for p in pieces for text, _ in p]
    encoded = iter(tok.encode_batch(flat, add_special_tokens=False))
    rows = []
    for p in pieces:
        ids: list[int] = []
        targets: list[bool] = []
        for _, is_target in p:
            piece = next(encoded).ids
            ids += piece
            targets += [is_target] * len(piece)
        rows.append(Encoded(np.asarray(ids, np.int32), np.asarray(targets, bool)))
    return EncodedCorpus(np.asarray(policy, np.int32), rows)


def batches(
    data: Sequence[Encoded], batch_size: int, seed: int, pad_id: int, short_first: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless (tokens, loss mask) batches of similar length, in a seeded order per epoch.

    `mask[b, t] = 1` where token t is a target (the model's own turns: the findings, and the
    agent turns' tool calls and narrative), i.e. predicted from position t-1.
    `short_first`: a curriculum; the first epoch opens with up to this many batches of the
    shorter half of the lengths (fewer lines: the answer format and the copying of the claim id
    and codes are learned on cheap steps before the long claims come).
    """
    rng = random.Random(seed)
    epoch = 0
    while True:
        order = list(range(len(data)))
        rng.shuffle(order)
        by_bucket: dict[int, list[int]] = {}
        for i in order:
            by_bucket.setdefault(_bucket(len(data[i].ids)), []).append(i)
        plan = [
            (length, idx[k : k + batch_size])
            for length, idx in sorted(by_bucket.items())
            for k in range(0, len(idx) - batch_size + 1, batch_size)
        ]
        if not plan:  # fewer examples than one batch per bucket: pad the batch by repeating
            length = max(by_bucket)
            plan = [(length, (order * batch_size)[:batch_size])]
        rng.shuffle(plan)
        if epoch == 0 and short_first:
            median = sorted(length for length, _ in plan)[len(plan) // 2]
            short = [i for i, (length, _) in enumerate(plan) if length <= median][:short_first]
            chosen = set(short)
            plan = [plan[i] for i in short] + [p for i, p in enumerate(plan) if i not in chosen]
        epoch += 1
        for length, idx in plan:
            tokens = np.full((batch_size, length), pad_id, np.int32)
            mask = np.zeros((batch_size, length), np.float32)
            for row, i in enumerate(idx):
                ex = data[i]
                tokens[row, : len(ex.ids)] = ex.ids
                mask[row, : len(ex.ids)] = ex.targets
            yield tokens, mask


def _bucket(n: int) -> int:
    return -(-n // BUCKET) * BUCKET


# --- model and optimizer ------------------------------------------------------------------------


def model_config(cfg: TrainConfig, tok: tokenizers.Tokenizer) -> ModelConfig:
    ids = special_token_ids(tok)
    return ModelConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.hidden_size // cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=ids[BOS],
        eos_token_ids=(ids[END], ids[EOS]),
    )


def init_model(mcfg: ModelConfig, seed: int) -> LlamaModel:
    """`LlamaModel`'s init, with the residual-branch outputs scaled by 1/sqrt(2 * layers).

    The scaling (as in GPT-2) keeps the residual stream's variance flat with depth, which lets a
    tiny model take a large learning rate from the first step.
    """
    model = LlamaModel(mcfg, rngs=nnx.Rngs(seed))
    scale = 1.0 / math.sqrt(2 * mcfg.num_layers)
    for layer in model.layers:
        for kernel in (layer.self_attn.o_proj.kernel, layer.mlp.down_proj.kernel):
            kernel[...] = kernel[...] * scale
    return model


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    def factory(learning_rate):
        return optax.chain(
            optax.clip_by_global_norm(1.0),
            optax.adamw(
                learning_rate,
                b1=0.9,
                b2=0.95,
                weight_decay=cfg.weight_decay,
                mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p),
            ),
        )

    return optax.inject_hyperparams(factory)(learning_rate=cfg.learning_rate)


def learning_rate(cfg: TrainConfig, step: int, progress: float) -> float:
    """Warmup over `warmup_steps`, constant, then linear decay over the last `decay_fraction`."""
    warm = min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    decay_start = 1.0 - cfg.decay_fraction
    if progress <= decay_start or cfg.decay_fraction == 0:
        return cfg.learning_rate * warm
    return cfg.learning_rate * warm * max(0.0, (1.0 - progress) / cfg.decay_fraction)


def loss_weights(
    tokens: np.ndarray, mask: np.ndarray, pad_id: int, context_weight: float
) -> np.ndarray:
    """Per-token loss weights: 1 on answer tokens, `context_weight` on the other real tokens."""
    return (mask + context_weight * ((tokens != pad_id) & (mask == 0))).astype(np.float32)


def _loss(graphdef, params, prefix, tokens, weights, mask):
    """(weighted mean NLL: what is minimized, mean NLL of the answer tokens: what is logged)."""
    logits = nnx.merge(graphdef, params).forward_dense(tokens[:, :-1], prefix)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    w, m = weights[:, 1:], mask[:, 1:]
    answer = jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0)
    return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0), answer


def make_train_step(graphdef, optimizer: optax.GradientTransformation) -> Callable:
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, prefix, tokens, weights, mask, lr):
        opt_state.hyperparams["learning_rate"] = lr
        (_, answer_loss), grads = jax.value_and_grad(
            functools.partial(_loss, graphdef), has_aux=True
        )(params, prefix, tokens, weights, mask)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, answer_loss

    return train_step


# --- the loop -----------------------------------------------------------------------------------


def train(
    cfg: TrainConfig,
    tokenizer_path: str | Path,
    log: Callable[[str], None] = print,
    init_from: str | Path | None = None,
    on_checkpoint: Callable[[int, LlamaModel, tokenizers.Tokenizer], None] | None = None,
) -> TrainResult:
    """Corpus -> tokenizer (saved to `tokenizer_path`) -> trained model.

    With `init_from` (an HF checkpoint directory this function wrote), training continues from
    its weights and tokenizer; the model shape flags of `cfg` are then ignored.
    `on_checkpoint(step, model, tokenizer)` is called every `cfg.checkpoint_every` steps with the
    model holding the weights so far (so a run stopped early still leaves a checkpoint).
    """
    examples, data_end = training_examples(cfg)
    if init_from is None:
        tok = train_tokenizer(training_texts(examples[: cfg.tokenizer_examples]), cfg.vocab_size)
    else:
        tok = tokenizers.Tokenizer.from_file(str(Path(init_from) / "tokenizer.json"))
    Path(tokenizer_path).parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(tokenizer_path))
    corpus = encode_examples(tok, examples, cfg.agent_share, cfg.seed)
    data, prefix_len = corpus.rows, len(corpus.prefix)
    lengths = prefix_len + np.array([len(d.ids) for d in data])
    answer_share = np.mean([d.targets.sum() / (prefix_len + len(d.ids)) for d in data])
    log(
        f"corpus: {len(data)} claims, sequence length mean {lengths.mean():.0f} max "
        f"{lengths.max()} (shared policy prefix {prefix_len}), answer share {answer_share:.2f}"
        f"; vocab {tok.get_vocab_size()}; claims {cfg.data_offset}..{data_end - 1}"
    )
    if lengths.max() > cfg.max_position_embeddings:
        raise ValueError(
            f"a training sequence has {lengths.max()} tokens > "
            f"max_position_embeddings={cfg.max_position_embeddings}"
        )

    if init_from is None:
        mcfg = model_config(cfg, tok)
        model = init_model(mcfg, cfg.seed)
    else:
        from pijax.model.loader import load_model
        from pijax.sharding import make_mesh

        model = load_model(init_from, dtype="float32", mesh=make_mesh((1, 1))).model()
        mcfg = model.config
    graphdef, params = nnx.split(model)
    optimizer = make_optimizer(cfg)
    opt_state = optimizer.init(params)
    step_fn = make_train_step(graphdef, optimizer)
    log(
        f"model: {num_params(params):,} parameters, {mcfg.num_layers} layers, width "
        f"{mcfg.hidden_size}, {mcfg.num_heads} heads / {mcfg.num_kv_heads} kv heads"
    )

    pad_id = special_token_ids(tok)[PAD]
    stream = batches(data, cfg.batch_size, cfg.seed, pad_id, short_first=cfg.curriculum_steps)
    prefix = jnp.asarray(corpus.prefix)
    losses: list[tuple[int, float]] = []
    window: list[float] = []
    tokens_seen = target_seen = 0
    start = time.monotonic()
    stopped_by = "steps"
    bar = tqdm(range(cfg.steps), desc="train", unit="step", mininterval=5.0)
    step = 0
    for step in bar:
        elapsed = time.monotonic() - start
        progress = step / cfg.steps
        if cfg.time_budget_s:
            progress = max(progress, elapsed / cfg.time_budget_s)
        if progress >= 1.0:
            stopped_by = "time_budget"
            break
        tokens, mask = next(stream)
        lr = learning_rate(cfg, step, progress)
        weights = loss_weights(tokens, mask, pad_id, cfg.context_loss_weight)
        params, opt_state, loss = step_fn(
            params,
            opt_state,
            prefix,
            jnp.asarray(tokens),
            jnp.asarray(weights),
            jnp.asarray(mask),
            jnp.float32(lr),
        )
        tokens_seen += tokens.size + len(corpus.prefix)
        target_seen += int(mask.sum())
        window.append(float(loss))
        bar.set_postfix(loss=f"{window[-1]:.3f}", lr=f"{lr:.1e}", refresh=False)
        if (step + 1) % cfg.log_every == 0:
            losses.append((step + 1, float(np.mean(window))))
            log(
                f"step {step + 1}/{cfg.steps} loss {losses[-1][1]:.4f} lr {lr:.2e} "
                f"len {tokens.shape[1]} elapsed {time.monotonic() - start:.0f}s "
                f"tok/s {tokens_seen / (time.monotonic() - start):.0f}"
            )
            window = []
        if on_checkpoint and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            nnx.update(model, params)
            on_checkpoint(step + 1, model, tok)
    else:
        step = cfg.steps
    bar.close()
    if window:
        losses.append((step, float(np.mean(window))))
    jax.block_until_ready(params)
    seconds = time.monotonic() - start
    nnx.update(model, params)
    return TrainResult(
        model,
        mcfg,
        tok,
        step,
        step * cfg.batch_size,
        tokens_seen,
        target_seen,
        seconds,
        losses,
        stopped_by,
        data_end,
    )


def num_params(state) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))
