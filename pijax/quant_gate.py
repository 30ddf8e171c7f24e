"""The KV-cache quantization quality gate: a quantized cache is switched on only after it has been
measured against full precision on domain prompts, for this model.

The gate runs the same model over the same prompts twice, with a full-precision pool (`auto`: the
model's dtype) and with the candidate pool (`int8`, `fp8_e4m3`), and measures, per prompt and
overall:

  * greedy agreement: each side decodes up to N tokens greedily on its own; the share of the
    full-precision tokens before the first divergence (1.0 = identical), and where it diverged;
  * teacher forcing along the full-precision trajectory: the prompt plus the full-precision
    continuation is fed through both pools, and at every position that predicts a generated token,
    KL(full || candidate) of the next-token distributions and whether their argmaxes agree. This
    is the decision figure: greedy agreement stops measuring at the first divergence and hides
    how close a divergence was;
  * per-layer attention error: at each layer the same input (the full-precision residual stream)
    attends over a full-precision and over a quantized pool; the relative error
    `||a_q - a|| / ||a||` (Frobenius, over all positions of a prompt) of the attention block's
    output. The input being shared isolates each layer's own quantization error from the error
    carried up from the layers below, so a bad layer (outlier channels) shows as itself.

`Thresholds` (from `configs/quant_gate.json`, or a file of the same form) decide pass or fail;
the result is a JSON `GateReport` naming the model (`model_identity`), the cache dtype, the
settings, the figures and the failed thresholds. `enforce_gate` is what `scripts/serve.py` calls
before building an engine with a quantized cache: no passing report for the same model and dtype,
no start (unless the gate is skipped explicitly, which is logged as a warning).

Everything runs through the engine, the one thing that runs the model over the paged pool: two
`Engine`s over the same loaded model (full-precision and candidate cache; prefix reuse off, so
every token is computed) for the greedy runs, and the candidate engine's step in its probe
variant (`StepFunction.compare_pools`: the same batch builder, the model's own `probed` forward)
for the teacher-forced figures. So the candidate is quantized on write exactly as in serving,
and a change to the model changes what is gated with it. The engine's tests check that an int8
pool behaves the same under prefix reuse and preemption.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import enum
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from pijax.config import KVCacheDType, engine_config_from_overrides, load_preset, preset_names
from pijax.engine import Engine
from pijax.kv_pool import KVPool, LayerKV, check_kv_cache_dtype
from pijax.request import SamplingParams

log = logging.getLogger(__name__)

REPORT_VERSION = 1
THRESHOLDS_RESOURCE = "quant_gate.json"  # in `configs/` (package `pijax.configs`)


class GateError(ValueError):
    """A quantized KV cache may not be switched on: no report, a failing one, or another model's."""


# --- thresholds ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Pass criteria on the overall figures. A threshold set to None is reported, not gated."""

    min_top1_agreement: float | None = 0.99
    max_mean_kl: float | None = 0.01
    min_greedy_agreement: float | None = None
    max_attention_rel_error: float | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise GateError(
                    f"threshold {f.name} must be null or a finite number >= 0; got {v!r}"
                )

    @classmethod
    def from_dict(cls, d: dict, source: str) -> Thresholds:
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(allowed) - {"description"})
        if unknown:
            raise GateError(f"{source}: unknown threshold(s) {unknown}; allowed: {allowed}")
        return cls(**{k: d[k] for k in allowed if k in d})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def failures(self, figures: Figures) -> list[str]:
        """One line per failed threshold, naming it, the figure and the limit."""
        out = []
        for name, value, limit, ok in self._checks(figures):
            if limit is not None and not ok:
                out.append(f"{name}: {value:.6g} (limit {limit:.6g})")
        return out

    def _checks(self, fg: Figures):
        yield (
            "min_top1_agreement",
            fg.top1_agreement,
            self.min_top1_agreement,
            self.min_top1_agreement is None or fg.top1_agreement >= self.min_top1_agreement,
        )
        yield (
            "max_mean_kl",
            fg.mean_kl,
            self.max_mean_kl,
            self.max_mean_kl is None or fg.mean_kl <= self.max_mean_kl,
        )
        yield (
            "min_greedy_agreement",
            fg.greedy_agreement,
            self.min_greedy_agreement,
            self.min_greedy_agreement is None or fg.greedy_agreement >= self.min_greedy_agreement,
        )
        yield (
            "max_attention_rel_error",
            fg.max_attention_rel_error,
            self.max_attention_rel_error,
            self.max_attention_rel_error is None
            or fg.max_attention_rel_error <= self.max_attention_rel_error,
        )

    def looser_than(self, floor: Thresholds) -> list[str]:
        """Thresholds of `self` that accept something `floor` would reject."""
        out = []
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(floor, f.name)
            if theirs is None:
                continue
            looser = mine is None or (mine < theirs if f.name.startswith("min_") else mine > theirs)
            if looser:
                out.append(f"{f.name}={mine} (deployment floor {theirs})")
        return out


def load_thresholds(path: str | Path | None = None) -> Thresholds:
    """Thresholds from a JSON file, or the packaged defaults (`configs/quant_gate.json`)."""
    if path is None:
        res = resources.files("pijax.configs") / THRESHOLDS_RESOURCE
        source, text = f"configs/{THRESHOLDS_RESOURCE}", res.read_text()
    else:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise GateError(f"{source}: cannot read thresholds: {e}") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise GateError(f"{source}: not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise GateError(f"{source}: thresholds must be a JSON object")
    return Thresholds.from_dict(d, source)


# --- figures ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PromptFigures:
    name: str
    num_prompt_tokens: int
    num_generated: int  # full-precision tokens compared (up to and including a stop token)
    greedy_agreement: float  # tokens before the first divergence / num_generated
    first_divergence: int | None  # index into the generated tokens; None = identical
    top1_agreement: float
    mean_kl: float
    max_kl: float
    attention_rel_error: tuple[float, ...]  # per layer

    @property
    def max_attention_rel_error(self) -> float:
        return max(self.attention_rel_error, default=0.0)


@dataclasses.dataclass(frozen=True)
class Figures:
    """Overall figures. Teacher-forced ones are over all compared positions of all prompts;
    greedy agreement is the mean over prompts; the attention error is, per layer, pooled over
    prompts, and `max_attention_rel_error` is the worst layer's."""

    num_prompts: int
    num_positions: int
    top1_agreement: float
    mean_kl: float
    max_kl: float
    greedy_agreement: float
    num_diverged: int
    earliest_divergence: int | None
    attention_rel_error: tuple[float, ...]
    max_attention_rel_error: float
    worst_layer: int


def summarize(prompts: Sequence[PromptFigures], err2: np.ndarray, ref2: np.ndarray) -> Figures:
    """`err2`, `ref2`: squared attention error and reference norms summed per layer."""
    n = np.array([p.num_generated for p in prompts], float)
    layer_err = tuple(float(x) for x in np.sqrt(err2 / np.maximum(ref2, 1e-30)))
    divs = [p.first_divergence for p in prompts if p.first_divergence is not None]
    return Figures(
        num_prompts=len(prompts),
        num_positions=int(n.sum()),
        top1_agreement=float(np.dot(n, [p.top1_agreement for p in prompts]) / n.sum()),
        mean_kl=float(np.dot(n, [p.mean_kl for p in prompts]) / n.sum()),
        max_kl=max(p.max_kl for p in prompts),
        greedy_agreement=float(np.mean([p.greedy_agreement for p in prompts])),
        num_diverged=len(divs),
        earliest_divergence=min(divs) if divs else None,
        attention_rel_error=layer_err,
        max_attention_rel_error=max(layer_err),
        worst_layer=int(np.argmax(layer_err)),
    )


# --- measuring through the engine ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GatePrompt:
    name: str
    token_ids: tuple[int, ...]


def _pool_like(pool: KVPool, dtype=None) -> KVPool:
    """Fresh pages with `pool`'s shapes and shardings: of `dtype` and unquantized when given,
    else of `pool`'s own dtype (with unit scales if it is quantized)."""

    def zeros(x, dt=None):
        return jnp.zeros(x.shape, dt or x.dtype, device=x.sharding)

    def ones(x):
        return None if x is None else jnp.ones(x.shape, x.dtype, device=x.sharding)

    if dtype is not None:
        return tuple(LayerKV(zeros(lk.k, dtype), zeros(lk.v, dtype)) for lk in pool)
    return tuple(
        LayerKV(zeros(lk.k), zeros(lk.v), ones(lk.k_scale), ones(lk.v_scale)) for lk in pool
    )


class PoolComparisonProbe:
    """A `StepProbe` for the engine: each step runs through `StepFunction.compare_pools`
    against a reference pool (`ref_dtype`, unquantized) and a probe pool (the engine's dtype),
    both laid out page for page like the engine's own, and each token's figures are kept by
    (request id, position). A token computed again (after a preemption) overwrites its figures."""

    def __init__(self, engine, ref_dtype):
        self.ref_pool = _pool_like(engine.kv_pool, ref_dtype)
        self.probe_pool = _pool_like(engine.kv_pool)
        self.tokens: dict[str, dict[int, tuple]] = collections.defaultdict(dict)

    def __call__(self, step, plan, params, kv_pool, batch):
        packed, cmp, kv_pool, self.ref_pool, self.probe_pool = step.compare_pools(
            params, kv_pool, self.ref_pool, self.probe_pool, batch
        )
        kl, agree, err2, ref2 = (
            np.asarray(x) for x in (cmp.kl, cmp.top1_agree, cmp.attn_err2, cmp.attn_ref2)
        )
        cu = batch.meta.cu_q_lens
        for i, s in enumerate(plan.seqs):
            seen = self.tokens[s.request_id]
            for r in range(int(cu[i]), int(cu[i + 1])):
                seen[int(batch.positions[r])] = (float(kl[r]), bool(agree[r]), err2[r], ref2[r])
        return packed, kv_pool


def _run(engine, tag: str, prompts: Sequence[Sequence[int]], params, probe=None) -> list[list[int]]:
    """All prompts through `engine` (continuous batching); each one's output tokens."""
    ids = [f"gate-{tag}-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts, strict=True):
        engine.add_request(rid, list(p), params)
    done: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step(probe):
            if out.finished:
                done[out.request_id] = list(out.token_ids)
    return [done[rid] for rid in ids]


def evaluate(
    ref: Engine, cand: Engine, prompts: Sequence[GatePrompt], max_new_tokens: int
) -> tuple[Figures, list[PromptFigures]]:
    """All figures for `prompts`. `ref` and `cand` are engines over the same model, with a
    full-precision and the candidate cache, and prefix reuse off (every token computed).

    Greedy agreement: each engine decodes up to `max_new_tokens` greedily, stopping at the
    model's EOS (kept, and compared). Teacher forcing: `cand` runs every prompt plus the
    full-precision continuation (less its last token) through `PoolComparisonProbe`."""
    ids = [list(p.token_ids) for p in prompts]
    greedy = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    ref_gen = _run(ref, "ref", ids, greedy)
    log.info("gate: full-precision greedy done (%d prompts)", len(ids))
    cand_gen = _run(cand, "cand", ids, greedy)
    log.info("gate: candidate greedy done")
    probe = PoolComparisonProbe(cand, ref.kv_pool[0].k.dtype)
    forced = [p + g[:-1] for p, g in zip(ids, ref_gen, strict=True)]
    _run(cand, "forced", forced, dataclasses.replace(greedy, max_tokens=1), probe)
    log.info("gate: teacher forcing done")

    per_prompt: list[PromptFigures] = []
    num_layers = len(cand.kv_pool)
    err2, ref2 = np.zeros(num_layers), np.zeros(num_layers)
    for i, p in enumerate(prompts):
        seen = probe.tokens[f"gate-forced-{i}"]
        n, start = len(ref_gen[i]), len(ids[i]) - 1  # position `start + j` predicts token j
        kl = np.array([seen[start + j][0] for j in range(n)])
        agree = np.array([seen[start + j][1] for j in range(n)])
        e2 = np.sum([seen[q][2] for q in range(len(forced[i]))], axis=0)
        r2 = np.sum([seen[q][3] for q in range(len(forced[i]))], axis=0)
        err2 += e2
        ref2 += r2
        cand_i = cand_gen[i]
        div = next((j for j in range(n) if j >= len(cand_i) or cand_i[j] != ref_gen[i][j]), None)
        per_prompt.append(
            PromptFigures(
                name=p.name,
                num_prompt_tokens=len(p.token_ids),
                num_generated=n,
                greedy_agreement=(n if div is None else div) / n,
                first_divergence=div,
                top1_agreement=float(agree.mean()),
                mean_kl=float(kl.mean()),
                max_kl=float(kl.max()),
                attention_rel_error=tuple(float(x) for x in np.sqrt(e2 / np.maximum(r2, 1e-30))),
            )
        )
    return summarize(per_prompt, err2, ref2), per_prompt


def gate_engines(
    model, mesh: Mesh, s: GateSettings, max_len: int, num_prompts: int
) -> tuple[Engine, Engine]:
    """(full-precision engine, candidate engine) over one loaded model: `batch_size` sequences
    at a time, a step budget of `batch_size * prefill_chunk` tokens, pages for every sequence
    at its full length (no preemption), prefix reuse off."""
    if s.kv_cache_dtype is KVCacheDType.AUTO:
        raise GateError(
            "the candidate kv_cache_dtype must be quantized (int8 or fp8_e4m3); got auto"
        )
    batch = min(s.batch_size, num_prompts)
    opts = dict(
        page_size=s.page_size,
        num_pages=1 + batch * -(-max_len // s.page_size),
        max_num_seqs=batch,
        max_num_batched_tokens=batch * s.prefill_chunk,
        max_model_len=max_len,
        enable_prefix_reuse=False,
        dtype=s.dtype,
        attention_impl=s.attention_impl,
        mesh_shape=tuple(mesh.devices.shape),
    )
    return tuple(
        Engine(model, engine_config_from_overrides(**opts, kv_cache_dtype=dt), mesh)
        for dt in (KVCacheDType.AUTO, s.kv_cache_dtype)
    )


# --- prompts ------------------------------------------------------------------------------------


def claims_prompts(
    tokenizer, num: int, seed: int, max_prompt_tokens: int | None = None
) -> list[GatePrompt]:
    """Claim-review prompts of the payment-integrity generator (`pijax.claims`): the policy
    scaffold plus a held-out synthetic claim, at their natural length. Over-long prompts keep
    their end (the claim and the review marker)."""
    # Imported here, not at module level: the engine core never loads the claims package
    # (tests/unit/test_import_contract.py); only a gate run on claim prompts does.
    from pijax.claims.corpus import generate_example
    from pijax.claims.prompt import policy_scaffold, render_prompt

    out = []
    for i in range(num):
        ex = generate_example(seed, i, split="heldout")
        ids = tokenizer.encode(render_prompt(policy_scaffold(), ex.claim))
        out.append(
            GatePrompt(f"claims/heldout/{seed}/{i}", tuple(_keep_end(ids, max_prompt_tokens)))
        )
    return out


def random_prompts(
    vocab_size: int,
    num: int,
    seed: int,
    max_prompt_tokens: int | None = None,
    exclude: Sequence[int] = (),
) -> list[GatePrompt]:
    """SYNTHETIC RANDOM prompts, not domain data: a shared random "scaffold" (standing in for a
    policy prefix) plus a random "claim" of log-normal length. For models without a domain
    generator; a gate on these says nothing about claims."""
    rng = np.random.default_rng(seed)
    limit = max_prompt_tokens or 1024
    allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(exclude, int))
    scaffold = rng.choice(allowed, size=max(1, limit // 2)).tolist()
    out = []
    for i in range(num):
        n = int(np.clip(rng.lognormal(math.log(max(limit // 4, 1)), 0.5), 1, limit - len(scaffold)))
        claim = rng.choice(allowed, size=max(n, 1)).tolist()
        out.append(GatePrompt(f"synthetic-random/{seed}/{i}", tuple(scaffold + claim)))
    return out


def jsonl_prompts(
    path: str | Path, tokenizer, vocab_size: int, max_prompt_tokens: int | None = None
) -> list[GatePrompt]:
    """One JSON object a line: `{"prompt": "text"}` or `{"prompt_token_ids": [...]}`, with an
    optional `"id"`."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise GateError(f"{where}: not valid JSON: {e}") from None
        if not isinstance(rec, dict) or ("prompt" in rec) == ("prompt_token_ids" in rec):
            raise GateError(f"{where}: need exactly one of 'prompt' (text) or 'prompt_token_ids'")
        if "prompt" in rec:
            ids = tokenizer.encode(str(rec["prompt"]))
        else:
            ids = rec["prompt_token_ids"]
            if not all(isinstance(t, int) and 0 <= t < vocab_size for t in ids):
                raise GateError(f"{where}: prompt_token_ids must be integers in [0, {vocab_size})")
        if not ids:
            raise GateError(f"{where}: empty prompt")
        name = str(rec.get("id", f"{Path(path).name}:{n}"))
        out.append(GatePrompt(name, tuple(_keep_end(ids, max_prompt_tokens))))
    if not out:
        raise GateError(f"{path}: no prompts")
    return out


def _keep_end(ids: Sequence[int], limit: int | None) -> list[int]:
    return list(ids) if limit is None or len(ids) <= limit else list(ids[-limit:])


# --- model identity and reports -----------------------------------------------------------------


def model_identity(source: str | Path) -> tuple[str, str]:
    """(model id, fingerprint) of a model source as `load_model` resolves it (a directory wins
    over a preset of the same name). The fingerprint covers the checkpoint's files (names, sizes,
    contents; the first and last MiB of files over 8 MiB), so a checkpoint replaced in place
    is another model."""
    path = Path(source).expanduser()
    if path.is_dir():
        return f"dir:{path.resolve()}", _dir_fingerprint(path)
    if str(source) in preset_names():
        preset = json.dumps(load_preset(str(source)), sort_keys=True).encode()
        return f"preset:{source}", "sha256:" + hashlib.sha256(preset).hexdigest()
    raise GateError(
        f"{source}: no such checkpoint directory, and not a preset; presets: {preset_names()}"
    )


def _dir_fingerprint(root: Path) -> str:
    h = hashlib.sha256()
    big, edge = 8 << 20, 1 << 20
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        if any(part.startswith(".") for part in f.relative_to(root).parts):
            continue
        size = f.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        with f.open("rb") as fh:
            if size <= big:
                h.update(fh.read())
            else:
                h.update(fh.read(edge))
                fh.seek(size - edge)
                h.update(fh.read(edge))
    return "sha256:" + h.hexdigest()


@dataclasses.dataclass(frozen=True)
class GateReport:
    model_id: str
    model_fingerprint: str
    kv_cache_dtype: str
    passed: bool
    failures: tuple[str, ...]
    thresholds: Thresholds
    figures: Figures
    prompts: tuple[PromptFigures, ...]
    settings: dict
    version: int = REPORT_VERSION

    def to_json(self) -> dict:
        return {
            "version": self.version,
            "model_id": self.model_id,
            "model_fingerprint": self.model_fingerprint,
            "kv_cache_dtype": self.kv_cache_dtype,
            "passed": self.passed,
            "failures": list(self.failures),
            "thresholds": self.thresholds.to_dict(),
            "figures": dataclasses.asdict(self.figures),
            "settings": self.settings,
            "prompts": [dataclasses.asdict(p) for p in self.prompts],
        }

    @classmethod
    def from_json(cls, d: dict, source: str) -> GateReport:
        if not isinstance(d, dict) or d.get("version") != REPORT_VERSION:
            got = d.get("version") if isinstance(d, dict) else type(d).__name__
            raise GateError(
                f"{source}: not a version-{REPORT_VERSION} KV quant gate report (version {got!r})"
            )
        try:
            fig = dict(d["figures"])
            fig["attention_rel_error"] = tuple(fig["attention_rel_error"])
            prompts = tuple(
                PromptFigures(**{**p, "attention_rel_error": tuple(p["attention_rel_error"])})
                for p in d["prompts"]
            )
            return cls(
                model_id=d["model_id"],
                model_fingerprint=d["model_fingerprint"],
                kv_cache_dtype=d["kv_cache_dtype"],
                passed=bool(d["passed"]),
                failures=tuple(d["failures"]),
                thresholds=Thresholds.from_dict(d["thresholds"], source),
                figures=Figures(**fig),
                prompts=prompts,
                settings=dict(d["settings"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise GateError(f"{source}: malformed KV quant gate report: {e!r}") from None


def make_report(
    source: str,
    kv_dtype: KVCacheDType,
    thresholds: Thresholds,
    figures: Figures,
    prompts: Sequence[PromptFigures],
    settings: dict,
) -> GateReport:
    model_id, fingerprint = model_identity(source)
    failures = tuple(thresholds.failures(figures))
    settings = {
        **settings,
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    return GateReport(
        model_id,
        fingerprint,
        kv_dtype.value,
        not failures,
        failures,
        thresholds,
        figures,
        tuple(prompts),
        settings,
    )


def write_report(report: GateReport, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report.to_json(), indent=2) + "\n")


def read_report(path: str | Path) -> GateReport:
    try:
        d = json.loads(Path(path).read_text())
    except OSError as e:
        raise GateError(f"KV quant gate report {path}: cannot read: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise GateError(f"KV quant gate report {path}: not valid JSON: {e}") from None
    return GateReport.from_json(d, str(path))


def check_gate_report(path: str | Path, model_id: str, dtype: KVCacheDType | str) -> GateReport:
    """The report at `path` if it is a passing gate for model source `model_id` (a checkpoint
    directory or preset name, as given to `serve.py --model`) and cache `dtype`; else GateError.

    Passing means: the same model (its fingerprint; a moved copy of the same checkpoint counts),
    the same dtype, every threshold met when re-checked from the recorded figures (a hand-edited
    `passed` does not count), and thresholds no looser than the packaged defaults
    (`configs/quant_gate.json`), which are the deployment's floor.
    """
    dtype = KVCacheDType.parse(dtype)
    report = read_report(path)
    where = f"KV quant gate report {path}"
    if report.kv_cache_dtype != dtype.value:
        raise GateError(
            f"{where} is for kv_cache_dtype={report.kv_cache_dtype}, not "
            f"{dtype.value}; run scripts/kv_quant_eval.py --kv_cache_dtype="
            f"{dtype.value}"
        )
    want_id, want_fp = model_identity(model_id)
    if report.model_fingerprint != want_fp:
        raise GateError(
            f"{where} is for model {report.model_id} ({report.model_fingerprint[:19]}"
            f"...), not {want_id} ({want_fp[:19]}...): gate this model"
        )
    if report.model_id != want_id:
        log.info("%s was made for %s; %s has the same fingerprint", where, report.model_id, want_id)
    failures = report.thresholds.failures(report.figures)
    if failures or not report.passed:
        raise GateError(
            f"{where}: the gate FAILED for {want_id} {dtype.value}: "
            + "; ".join(failures or ["report marked as failed"])
        )
    looser = report.thresholds.looser_than(load_thresholds())
    if looser:
        raise GateError(
            f"{where} passed under thresholds looser than the deployment's "
            f"(configs/{THRESHOLDS_RESOURCE}): " + "; ".join(looser)
        )
    return report


def enforce_gate(
    kv_cache_dtype: KVCacheDType | str,
    model_source: str,
    gate_report_path: str | None,
    skip_gate: bool,
) -> None:
    """Refuse to start a quantized KV cache without a passing gate report for this model and
    dtype (`check_gate_report`). `skip_gate` starts anyway, with a warning in the log."""
    dtype = KVCacheDType.parse(kv_cache_dtype)
    if dtype is KVCacheDType.AUTO:
        return
    if skip_gate:
        log.warning(
            "kv_cache_dtype=%s for %s WITHOUT a quality gate (--skip_kv_quant_gate): "
            "output quality against full precision is unmeasured",
            dtype.value,
            model_source,
        )
        return
    if not gate_report_path:
        raise GateError(
            f"kv_cache_dtype={dtype.value} needs a passing quality-gate report for this model: "
            f"run `python scripts/kv_quant_eval.py --model={model_source} "
            f"--kv_cache_dtype={dtype.value} --report=PATH` and pass "
            "--kv_quant_gate_report=PATH (or --skip_kv_quant_gate, logged as a warning)"
        )
    report = check_gate_report(gate_report_path, model_source, dtype)
    fg = report.figures
    log.info(
        "KV quant gate passed for %s %s (%s): top-1 agreement %.4f, mean KL %.2e, greedy "
        "agreement %.3f, worst layer attention error %.2e over %d prompts",
        report.model_id,
        dtype.value,
        gate_report_path,
        fg.top1_agreement,
        fg.mean_kl,
        fg.greedy_agreement,
        fg.max_attention_rel_error,
        fg.num_prompts,
    )


# --- one gate run -------------------------------------------------------------------------------


class PromptSource(enum.Enum):
    AUTO = "auto"  # the default: the claims generator (kept as a name for existing reports)
    CLAIMS = "claims"  # synthetic claim-review prompts (`pijax.claims`)
    RANDOM = "random"  # random token ids: say nothing about claim review
    JSONL = "jsonl"  # a JSONL file of prompts (`prompts_jsonl`)

    @classmethod
    def parse(cls, value: str | PromptSource) -> PromptSource:
        if isinstance(value, cls):
            return value
        allowed = [m.value for m in cls]
        if value not in allowed:
            raise GateError(f"prompt_source must be one of {allowed}; got {value!r}")
        return cls(value)


@dataclasses.dataclass(frozen=True)
class GateSettings:
    model: str  # checkpoint directory or preset name
    kv_cache_dtype: KVCacheDType
    prompt_source: PromptSource = PromptSource.AUTO
    prompts_jsonl: str | None = None
    num_prompts: int = 16
    max_new_tokens: int = 64
    max_prompt_tokens: int | None = None
    prompt_seed: int = 0
    dtype: str = "float32"  # weights and activations; the reference pool has this dtype
    attention_impl: str = "auto"
    page_size: int = 16
    prefill_chunk: int = 128
    batch_size: int = 8
    model_seed: int = 0  # random presets only

    def __post_init__(self):
        object.__setattr__(self, "kv_cache_dtype", KVCacheDType.parse(self.kv_cache_dtype))
        object.__setattr__(self, "prompt_source", PromptSource.parse(self.prompt_source))
        if (self.prompt_source is PromptSource.JSONL) != (self.prompts_jsonl is not None):
            raise GateError("prompts_jsonl is required with prompt_source=jsonl, and only then")
        for name in ("num_prompts", "max_new_tokens", "page_size", "prefill_chunk", "batch_size"):
            if getattr(self, name) < 1:
                raise GateError(f"{name} must be >= 1; got {getattr(self, name)}")


def gate_prompts(
    s: GateSettings, tokenizer, vocab_size: int, stop_ids: Sequence[int]
) -> tuple[PromptSource, list[GatePrompt]]:
    """(the source actually used, the prompts)."""
    if s.prompt_source is PromptSource.JSONL:
        return PromptSource.JSONL, jsonl_prompts(
            s.prompts_jsonl, tokenizer, vocab_size, s.max_prompt_tokens
        )
    if s.prompt_source in (PromptSource.AUTO, PromptSource.CLAIMS):
        return PromptSource.CLAIMS, claims_prompts(
            tokenizer, s.num_prompts, s.prompt_seed, s.max_prompt_tokens
        )
    vocab = min(vocab_size, getattr(tokenizer, "vocab_size", vocab_size))
    return PromptSource.RANDOM, random_prompts(
        vocab, s.num_prompts, s.prompt_seed, s.max_prompt_tokens, exclude=stop_ids
    )


def run_gate(
    s: GateSettings, thresholds: Thresholds | None = None, mesh_shape: tuple[int, int] = (1, 1)
) -> GateReport:
    """Load the model, build the prompts, measure, and judge. Never raises on a failing gate:
    the report says so (`passed`, `failures`)."""
    from pijax.model.loader import load_model
    from pijax.sharding import make_mesh

    thresholds = thresholds or load_thresholds()
    check_kv_cache_dtype(s.kv_cache_dtype)  # before loading weights
    mesh = make_mesh(mesh_shape)
    model = load_model(
        s.model, dtype=s.dtype, mesh=mesh, attention_impl=s.attention_impl, seed=s.model_seed
    )
    stop_ids = tuple(model.eos_token_ids)
    source, prompts = gate_prompts(s, model.tokenizer, model.config.vocab_size, stop_ids)
    prompts = prompts[: s.num_prompts]
    max_len = max(len(p.token_ids) for p in prompts) + s.max_new_tokens
    ref, cand = gate_engines(model, mesh, s, max_len, len(prompts))
    log.info(
        "gate: %s vs auto on %d %s prompts (%d-%d tokens), %d new tokens each",
        s.kv_cache_dtype.value,
        len(prompts),
        source.value,
        min(len(p.token_ids) for p in prompts),
        max(len(p.token_ids) for p in prompts),
        s.max_new_tokens,
    )
    figures, per_prompt = evaluate(ref, cand, prompts, s.max_new_tokens)
    settings = {
        k: (v.value if isinstance(v, enum.Enum) else v) for k, v in dataclasses.asdict(s).items()
    }
    settings["prompt_source_used"] = source.value
    return make_report(s.model, s.kv_cache_dtype, thresholds, figures, per_prompt, settings)
