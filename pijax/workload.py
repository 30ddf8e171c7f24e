"""The payment-integrity mix: a seeded generator of claim-review traffic, shared by tests and bench.

What one run contains (DESIGN.md, "Performance: how we measure"):

  * one policy scaffold (`policy_tokens`, default 1,024) that every review starts with, registered
    by the caller as a trusted prefix of zone `shared:policy`;
  * conversations. Most are single claim reviews: scaffold + a claim payload (private scope).
    Claim lengths are a two-component log-normal mixture: professional claims of a few hundred
    tokens and institutional claims with attachments, out to several thousand (the long tail);
  * a share of multi-turn tool-calling sessions: 1-3 follow-up turns, each appending the previous
    turn's output and 200-800 tokens of tool output. A session's claim and history are scoped
    `session:<id>`, so the engine may keep them between turns;
  * per turn, an output length (structured findings + narrative). The client's `max_tokens` is a
    cap (`max_tokens_cap`) above it: a real model stops at EOS, the cap is what a contiguous
    engine has to reserve;
  * arrivals: conversations either arrive as a Poisson process (`arrival_times(rate)`, the same
    draws scaled by 1/rate, so a rate sweep replays the same request list) or are fed by N
    closed-loop clients (the runner's business). Follow-up turns arrive when the previous turn
    has finished, plus `think_time_s`.

Tokens are drawn so that no tokenizer is needed (uniform over `token_range`), or, given a
tokenizer, come from claim-like text encoded by it. Everything is a pure function of the config
and seed: the same `WorkloadConfig` gives the same request list on every machine.

This module knows nothing of engines, clocks or devices.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable, Sequence

import numpy as np

from pijax.request import PromptSegment, Scope

POLICY_ZONE = "policy"


class ClaimKind(enum.Enum):
    PROFESSIONAL = "professional"  # a physician's claim: a few hundred tokens
    INSTITUTIONAL = "institutional"  # a facility claim with attachments: the long tail


@dataclasses.dataclass(frozen=True)
class LogNormal:
    """A log-normal length distribution given by its median, clipped to [lo, hi]."""

    median: float
    sigma: float
    lo: int
    hi: int

    def __post_init__(self):
        if not (self.median > 0 and self.sigma >= 0 and 1 <= self.lo <= self.hi):
            raise ValueError(f"LogNormal needs median > 0, sigma >= 0, 1 <= lo <= hi; got {self}")

    def sample(self, rng: np.random.Generator) -> int:
        x = rng.lognormal(math.log(self.median), self.sigma)
        return int(min(self.hi, max(self.lo, round(x))))


@dataclasses.dataclass(frozen=True)
class WorkloadConfig:
    num_conversations: int = 64
    seed: int = 0
    policy_tokens: int = 1024
    institutional_share: float = 0.3
    professional_claim: LogNormal = LogNormal(median=250, sigma=0.5, lo=48, hi=1200)
    institutional_claim: LogNormal = LogNormal(median=1000, sigma=0.6, lo=200, hi=4000)
    structured_output: tuple[int, int] = (48, 160)  # uniform: the findings JSON
    narrative_output: LogNormal = LogNormal(median=120, sigma=0.6, lo=8, hi=600)
    max_tokens_cap: int = 1024
    session_share: float = 0.25
    follow_up_turns: tuple[int, int] = (1, 3)
    tool_tokens: tuple[int, int] = (200, 800)
    follow_up_output: LogNormal = LogNormal(median=96, sigma=0.5, lo=8, hi=400)
    max_context: int = 4096  # prompt + output of every turn fits in this
    num_tenants: int = 4
    think_time_s: float = 0.0  # between a turn's end and the next turn (tool latency)
    token_range: tuple[int, int] = (0, 256)  # [lo, hi) for tokenizer-free draws

    def __post_init__(self):
        for name in ("num_conversations", "policy_tokens", "max_tokens_cap", "num_tenants"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{name} must be an integer >= 1; got {v!r}")
        for name in ("institutional_share", "session_share"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {v!r}")
        for name in ("structured_output", "follow_up_turns", "tool_tokens", "token_range"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be (lo, hi) with 0 <= lo <= hi; got {(lo, hi)}")
        if self.policy_tokens + self.professional_claim.lo + 1 > self.max_context:
            raise ValueError(
                f"max_context={self.max_context} cannot hold the policy scaffold "
                f"({self.policy_tokens}) plus the shortest claim"
            )

    @classmethod
    def from_dict(cls, d: dict) -> WorkloadConfig:
        """From a JSON preset section: distributions as {median, sigma, lo, hi}, pairs as lists."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(fields)
        if unknown:
            raise ValueError(
                f"unknown workload field(s) {sorted(unknown)}; allowed: {sorted(fields)}"
            )
        kw = {}
        for k, v in d.items():
            default = fields[k].default
            if isinstance(default, LogNormal):
                v = LogNormal(**v)
            elif isinstance(default, tuple):
                v = tuple(v)
            kw[k] = v
        return cls(**kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Turn:
    new_tokens: tuple[int, ...]  # turn 0: the claim payload; later turns: tool output
    output_len: int


@dataclasses.dataclass(frozen=True)
class Conversation:
    index: int
    kind: ClaimKind
    tenant: str
    session_id: str | None  # None: a single-turn review
    turns: tuple[Turn, ...]
    unit_gap: float  # unit-rate exponential gap before this conversation's arrival

    @property
    def claim_tokens(self) -> int:
        return len(self.turns[0].new_tokens)


@dataclasses.dataclass(frozen=True)
class Workload:
    config: WorkloadConfig
    policy: tuple[int, ...]
    conversations: tuple[Conversation, ...]

    @property
    def num_requests(self) -> int:
        return sum(len(c.turns) for c in self.conversations)

    def arrival_times(self, rate: float) -> list[float]:
        """Seconds after the start at which each conversation arrives, Poisson at `rate`/s."""
        if not rate > 0:
            raise ValueError(f"rate must be > 0 conversations/s; got {rate!r}")
        return (np.cumsum([c.unit_gap for c in self.conversations]) / rate).tolist()

    def prompt(self, conv: Conversation, history: Sequence[int], turn: int) -> list[PromptSegment]:
        """The prompt of `turn`: scaffold (`shared:policy`), then the conversation's own tokens —
        `history` (claim, earlier outputs and tool outputs) and this turn's new tokens — scoped
        `session:<id>` in a session and `private` otherwise."""
        own = tuple(history) + conv.turns[turn].new_tokens
        scope = Scope.parse(f"session:{conv.session_id}") if conv.session_id else Scope()
        return [
            PromptSegment(self.policy, Scope.parse(f"shared:{POLICY_ZONE}")),
            PromptSegment(own, scope),
        ]

    def prompt_len(self, conv: Conversation, turn: int) -> int:
        """Prompt tokens of `turn` (history lengths are known in advance: outputs have their
        drawn lengths)."""
        n = len(self.policy)
        for t in conv.turns[:turn]:
            n += len(t.new_tokens) + t.output_len
        return n + len(conv.turns[turn].new_tokens)

    def summary(self) -> dict:
        convs = self.conversations
        prompts = [self.prompt_len(c, i) for c in convs for i in range(len(c.turns))]
        outputs = [t.output_len for c in convs for t in c.turns]
        claims = [c.claim_tokens for c in convs]
        return {
            "conversations": len(convs),
            "requests": self.num_requests,
            "sessions": sum(c.session_id is not None for c in convs),
            "institutional": sum(c.kind is ClaimKind.INSTITUTIONAL for c in convs),
            "policy_tokens": len(self.policy),
            "claim_tokens": _describe(claims),
            "prompt_tokens": _describe(prompts),
            "output_tokens": _describe(outputs),
        }


def _describe(xs: Sequence[int]) -> dict:
    a = np.asarray(xs)
    return {
        "min": int(a.min()),
        "p50": float(np.median(a)),
        "p90": float(np.percentile(a, 90)),
        "max": int(a.max()),
        "total": int(a.sum()),
    }


# --- generation ----------------------------------------------------------------------------------

TokenSource = Callable[[np.random.Generator, int], tuple[int, ...]]


def random_tokens(lo: int, hi: int) -> TokenSource:
    def draw(rng: np.random.Generator, n: int) -> tuple[int, ...]:
        return tuple(int(t) for t in rng.integers(lo, hi, size=n))

    return draw


_WORDS = (
    "claim member provider billed allowed units modifier 25 59 76 CPT 99213 99214 99215 J1885 "
    "HCPCS ICD-10 E11.9 I10 M54.5 Z79.4 DRG 470 871 revenue code 0450 0360 place of service 11 "
    "21 23 date of service admission discharge attachment operative note itemized bill NCCI "
    "edit unbundling duplicate medically unlikely MUE prior authorization policy section "
    "coverage criteria documentation supports does not support units exceed finding overpayment "
    "recommend deny adjust pend review narrative the of and for with per"
).split()


def text_tokens(encode: Callable[[str], list[int]]) -> TokenSource:
    """Claim-like text through a real tokenizer, cut or padded (by repetition) to `n` tokens."""

    def draw(rng: np.random.Generator, n: int) -> tuple[int, ...]:
        ids: list[int] = []
        while len(ids) < n:
            words = rng.choice(_WORDS, size=max(8, n // 2))
            ids.extend(encode(" ".join(words)))
        return tuple(ids[:n])

    return draw


def generate_workload(config: WorkloadConfig, tokens: TokenSource | None = None) -> Workload:
    """The request list for `config`; `tokens` defaults to uniform draws over `token_range`.

    Separate random streams for structure and token content, so changing how tokens are drawn
    (random vs a tokenizer) leaves lengths, sessions and arrivals unchanged.
    """
    draw = tokens or random_tokens(*config.token_range)
    shape_rng = np.random.default_rng([config.seed, 0])
    token_rng = np.random.default_rng([config.seed, 1])
    policy = draw(token_rng, config.policy_tokens)
    convs = []
    for i in range(config.num_conversations):
        convs.append(_conversation(config, i, shape_rng, token_rng, draw))
    return Workload(config, policy, tuple(convs))


def _output_len(cfg: WorkloadConfig, rng: np.random.Generator) -> int:
    lo, hi = cfg.structured_output
    return int(rng.integers(lo, hi + 1)) + cfg.narrative_output.sample(rng)


def _conversation(
    cfg: WorkloadConfig,
    index: int,
    rng: np.random.Generator,
    token_rng: np.random.Generator,
    draw: TokenSource,
) -> Conversation:
    institutional = rng.random() < cfg.institutional_share
    dist = cfg.institutional_claim if institutional else cfg.professional_claim
    is_session = rng.random() < cfg.session_share
    n_follow = (
        int(rng.integers(cfg.follow_up_turns[0], cfg.follow_up_turns[1] + 1)) if is_session else 0
    )
    gap = float(rng.exponential(1.0))
    tenant = f"tenant-{int(rng.integers(cfg.num_tenants))}"
    out0 = _output_len(cfg, rng)
    # The first turn always fits: the claim is cut so scaffold + claim + output <= max_context.
    room = cfg.max_context - cfg.policy_tokens - out0
    claim_len = max(1, min(dist.sample(rng), room))
    plan = [(claim_len, out0)]
    used = cfg.policy_tokens + claim_len + out0
    for _ in range(n_follow):
        tool = int(rng.integers(cfg.tool_tokens[0], cfg.tool_tokens[1] + 1))
        out = cfg.follow_up_output.sample(rng)
        if used + tool + out > cfg.max_context:
            break  # the investigation would outgrow the context: it ends here
        plan.append((tool, out))
        used += tool + out
    turns = tuple(Turn(draw(token_rng, n), out) for n, out in plan)
    session = f"s{index}" if is_session and len(turns) > 1 else None
    kind = ClaimKind.INSTITUTIONAL if institutional else ClaimKind.PROFESSIONAL
    return Conversation(index, kind, tenant, session, turns, gap)
