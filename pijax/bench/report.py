"""Write a bench run: `results.json` (everything), `results.md` (the tables), and the plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

from pijax.bench import meshes, plots
from pijax.bench.runner import RunResult

# Keys every results.json has (the CI test checks them).
REQUIRED_KEYS = (
    "schema_version",
    "preset",
    "environment",
    "model",
    "workload",
    "definitions",
    "ceilings",
    "configs",
    "ratios",
    "goals",
    "wall_s",
)
SUMMARY_KEYS = (
    "requests",
    "conversations",
    "makespan_s",
    "output_tokens",
    "latency_s",
    "throughput",
    "concurrency",
    "memory",
    "prefix",
    "compilations_after_warmup",
)


def _clean(x):
    """JSON without NaN/inf (they are not JSON): those become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write(
    results: dict, runs: dict[str, RunResult], out_dir: Path, *, with_plots: bool = True
) -> list[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    if with_plots and plots.available():
        results["plots"] = plots.write_all(results, runs, out_dir)
        files += results["plots"]
    elif with_plots:
        results["plots_skipped"] = plots.MISSING
    (out_dir / "results.json").write_text(json.dumps(_clean(results), indent=1) + "\n")
    (out_dir / "results.md").write_text(markdown(results))
    return ["results.json", "results.md", *files]


# --- Markdown ----------------------------------------------------------------------------------


def _f(x, unit: str = "", digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x}{unit}"
    if unit == "s":
        return f"{x * 1e3:.0f} ms" if abs(x) < 1 else f"{x:.2f} s"
    if unit == "%":
        return f"{100 * x:.1f}%"
    if unit == "x":
        return f"{x:.2f}×"
    return f"{x:.{digits}g}{unit}"


def _lat(s: dict, key: str) -> str:
    d = s["latency_s"][key]
    return " / ".join(_f(d[p], "s") for p in ("p50", "p90", "p99"))


def config_table(configs: dict) -> str:
    head = (
        "| configuration | output tok/s | claims/h | TTFT p50 / p90 / p99 | TPOT p50 / p90 / "
        "p99 | ITL p50 / p90 / p99 | queue p50 / p90 / p99 | e2e p50 / p90 / p99 | peak "
        "conc. | pool peak / mean | waste | preempt. | policy hit rate | compiles |"
    )
    ncols = head.count("|") - 1
    rows = [head, "|" + "---|" * ncols]
    for name, e in configs.items():
        s = e.get("summary")
        if s is None:
            rows.append(f"| {name} | skipped: {e.get('skipped', '')} |" + " |" * (ncols - 2))
            continue
        mem = s.get("memory") or {}
        prefix = s.get("prefix") or {}
        hit = (prefix.get("hit_rate_by_zone") or {}).get("policy")
        rows.append(
            f"| {name} | {_f(s['throughput']['output_tokens_per_s'])} "
            f"| {_f(s['throughput']['claims_per_hour'])} | {_lat(s, 'ttft')} | {_lat(s, 'tpot')} "
            f"| {_lat(s, 'itl')} | {_lat(s, 'queue')} | {_lat(s, 'e2e')} "
            f"| {s['concurrency']['peak']} "
            f"| {_f(mem.get('pool_utilization_peak'), '%')} / "
            f"{_f(mem.get('pool_utilization_mean'), '%')} "
            f"| {_f(mem.get('waste_mean'), '%')} | {_f(mem.get('preemptions'))} "
            f"| {_f(hit, '%')} | {_f(s['compilations_after_warmup'])} |"
        )
    return "\n".join(rows)


def ratio_table(ratios: dict) -> str:
    if not ratios:
        return "_(run with `--compare` for baselines)_"
    metrics = list(next(iter(ratios.values())))
    rows = [
        "| configuration / paged | " + " | ".join(metrics) + " |",
        "|---|" + "---|" * len(metrics),
    ]
    for name, r in ratios.items():
        rows.append(f"| {name} | " + " | ".join(_f(r[m], "x") for m in metrics) + " |")
    return "\n".join(rows)


def goals_table(goals: list[dict]) -> str:
    rows = ["| goal | target | measured | met |", "|---|---|---|---|"]
    for g in goals:
        v = g["measured"]
        pct = "waste" in g["goal"] or "share" in g["goal"]
        unit = "%" if pct else ("" if g["goal"].startswith("compilations") else "x")
        met = {True: "yes", False: "**no**", None: "–"}[g["met"]]
        rows.append(f"| {g['goal']} | {g['target']} | {_f(v, unit)} | {met} |")
    return "\n".join(rows)


def _shares(mode: dict) -> str:
    """Each repeat's idle share, as `a / b / c` (the overlap probe)."""
    return " / ".join(_f(r["idle_share"], "%") for r in mode.get("runs", [mode]))


def probes_section(p: dict) -> str:
    lines = []
    for name, la in p.get("long_arrival", {}).items():
        lines.append(
            f"- long arrival, **{name}** (budget {la['max_num_batched_tokens']} tokens/step): "
            f"{la['decodes']} decodes at ~{la['context']} tokens, then a "
            f"{la['long_prompt_tokens']}-token prompt. ITL p99 before "
            f"{_f(la['itl_p99_before_s'], 's')}"
            f", during its prefill {_f(la['itl_p99_during_s'], 's')} "
            f"(max {_f(la['itl_max_during_s'], 's')}; "
            f"ratio {_f(la['p99_during_over_before'], 'x')})"
            f"; its TTFT {_f(la['long_prompt_ttft_s'], 's')} over {la['steps_while_prefilling']} "
            f"steps."
        )
    for name, pf in p.get("prefill", {}).items():
        lines.append(
            f"- prefill-only steps, **{name}**: {pf['prompts']} x {pf['prompt_tokens']}-token "
            f"prompts in {pf['steps']} steps of <= {pf['max_num_batched_tokens']} tokens, "
            f"{_f(pf['seconds'], 's')}: {pf['achieved_tflops'] * 1e3:.1f} GFLOP/s achieved vs a "
            f"{pf['matmul_tflops'] * 1e3:.1f} GFLOP/s matmul "
            f"({_f(pf['achieved_over_matmul_rate'], 'x')})."
        )
    for name, ut in p.get("unloaded_ttft", {}).items():
        lines.append(
            f"- unloaded TTFT (scaffold + claim, one at a time), **{name}**: "
            f"p50 {_f(ut['ttft_p50_s'], 's')} over {ut['requests']} requests."
        )
    ov = p.get("overlap")
    if ov:
        o, sy = ov["overlap"], ov["sync"]
        lines.append(
            f"- overlap: {ov['decodes']} sequences in steady decode, {ov['steps']} steps timed "
            f"(dispatch and ready stamps), {ov.get('repeats', 1)} repeat(s) per mode, "
            f"alternating. Device idle between steps: overlapped {_f(o['idle_share'], '%')} of "
            f"{_f(o['wall_s'], 's')} ({_shares(o)}), synchronous {_f(sy['idle_share'], '%')} of "
            f"{_f(sy['wall_s'], 's')} ({_shares(sy)}); median ready-to-ready "
            f"{_f(o['period_s_median'], 's')} vs {_f(sy['period_s_median'], 's')}; result already "
            f"ready at the next dispatch in {_f(o['ran_dry_share'], '%')} vs "
            f"{_f(sy['ran_dry_share'], '%')} of steps; same tokens: "
            f"{'yes' if ov['outputs_equal'] else '**no**'}."
        )
    r = p.get("roofline")
    if r:
        lines.append(
            f"- decode roofline: {r['sequences']} sequences at ~{r['mean_context']:.0f} tokens; "
            f"floor {_f(r['floor_s'], 's')} ({r['bound']}-bound: {r['bytes_moved'] / 1e6:.1f} MB "
            f"moved, {r['flops'] / 1e9:.2f} GFLOP) vs measured step {_f(r['measured_step_s'], 's')}"
            f" → floor/measured = {_f(r['floor_over_measured'], 'x')}. "
            "The step actually runs the "
            f"bucket T={r['bucket']['tokens']}, W={r['bucket']['width']} pages; its "
            f"{r.get('attention', 'reference')} attention gathers "
            f"{r.get('kv_bytes_gathered', r.get('padded_kv_bytes_gathered', 0)) / 1e6:.1f} MB "
            "of KV for it."
        )
    return "\n".join(lines)


def sweep_table(sw: dict) -> str:
    rows = [
        f"Capacity (closed loop): {sw['capacity_conversations_per_s']:.3g} conversations/s; "
        f"{sw['num_conversations']} conversations per point.",
        "",
        "| rate (conv/s) | × capacity | output tok/s | claims/h | TTFT p50 | TTFT p99 | ITL p99 |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in sw["points"]:
        rows.append(
            f"| {p['rate_conversations_per_s']:.3g} | {p['rate_per_capacity']:g} "
            f"| {_f(p['output_tokens_per_s'])} | {_f(p['claims_per_hour'])} "
            f"| {_f(p['ttft_p50_s'], 's')} | {_f(p['ttft_p99_s'], 's')} "
            f"| {_f(p['itl_p99_s'], 's')} |"
        )
    return "\n".join(rows)


def header(results: dict) -> list[str]:
    env, pre, wl = results["environment"], results["preset"], results["workload"]
    load = ", ".join(f"{x:.1f}" for x in env.get("load_average") or [])
    parts = [
        f"# pijax bench: `{pre['name']}` on {env['device']} ({env['backend']})",
        "",
        f"{results['created']} · git {env.get('git') or '?'} · jax {env['jax']} · "
        f"{env['cpu_count']} CPUs ({env.get('cpu_model') or '?'}), load average at start {load}",
        "",
    ]
    if results.get("caveat"):
        parts += [f"**{results['caveat']}**", ""]
    if results.get("mode") == "remote":
        sv = results["server"]
        parts += [
            f"Measured over gRPC at the client against `{sv['target']}`: model "
            f"`{sv['model']}` ({sv['architecture']}), {sv['num_pages']} KV pages of "
            f"{sv['page_size']} tokens ({sv['kv_cache_dtype']}), max_num_seqs "
            f"{sv['max_num_seqs']}, mesh {sv['mesh_shape']}; tenant `{sv['tenant']}`; "
            f"policy scaffold {sv['policy_registration']}.",
            "",
        ]
    else:
        m = results["model"]
        parts += [
            f"Model `{m['source']}`: {m['parameters'] / 1e6:.2f} M parameters, {m['layers']} "
            f"layers, hidden {m['hidden']}, {m['heads']} heads / {m['kv_heads']} KV heads × "
            f"{m['head_dim']}. Engine: {', '.join(f'{k}={v}' for k, v in pre['engine'].items())}"
            + (
                f"; overrides: {results['engine_overrides']}"
                if results.get("engine_overrides")
                else ""
            )
            + ".",
            "",
        ]
    parts += [
        f"Workload (payment-integrity mix, seed {pre['workload']['seed']}): "
        f"{wl['conversations']} conversations, {wl['requests']} requests, {wl['sessions']} "
        f"multi-turn sessions, {wl['institutional']} institutional claims; policy scaffold "
        f"{wl['policy_tokens']} tokens; claim tokens p50 {wl['claim_tokens']['p50']:.0f} / max "
        f"{wl['claim_tokens']['max']}; prompt tokens p50 {wl['prompt_tokens']['p50']:.0f} / "
        f"max {wl['prompt_tokens']['max']}; output tokens p50 {wl['output_tokens']['p50']:.0f} / "
        f"max {wl['output_tokens']['max']}; max_tokens cap {pre['workload']['max_tokens_cap']}. "
        f"Arrivals: {results['arrival']}.",
        "",
    ]
    ce = results.get("ceilings")
    if ce:
        parts += [
            f"Ceilings measured in this run: copy bandwidth {ce['copy_bandwidth_gbs']:.1f} "
            "GB/s, "
            + ", ".join(f"{k} matmul {v * 1e3:.0f} GFLOP/s" for k, v in ce["matmul_tflops"].items())
            + ".",
            "",
        ]
    return parts


def kv_dtype_table(results: dict) -> str:
    """The full engine per KV cache dtype at one byte budget."""
    rows = [
        "| configuration | KV dtype | bytes/token | pages | tokens of context | peak conc. "
        "| mean conc. | output tok/s | claims/h | preempt. | TTFT p50 | × paged: tok/s | "
        "× paged: peak conc. |",
        "|---|" + "---|" * 12,
    ]
    for name, e in results["configs"].items():
        pool, s = e.get("pool"), e.get("summary")
        if pool is None or s is None or not (name == "paged" or name.startswith("paged-kv-")):
            continue
        r = results["ratios"].get(name, {})
        rows.append(
            f"| {name} | {pool['kv_cache_dtype']} | {pool['bytes_per_token']} "
            f"| {pool['num_pages']} | {pool['tokens']} | {s['concurrency']['peak']} "
            f"| {s['concurrency']['mean']:.2f} | {_f(s['throughput']['output_tokens_per_s'])} "
            f"| {_f(s['throughput']['claims_per_hour'])} | {_f(s['memory']['preemptions'])} "
            f"| {_f(s['latency_s']['ttft']['p50'], 's')} "
            f"| {_f(r.get('output_tokens_per_s'), 'x') if name != 'paged' else '1.00×'} "
            f"| {_f(r.get('peak_concurrency'), 'x') if name != 'paged' else '1.00×'} |"
        )
    return "\n".join(rows)


def markdown(results: dict) -> str:
    parts = header(results)
    parts += [
        "## Configurations",
        "",
        config_table(results["configs"]),
        "",
        "Latencies are p50 / p90 / p99. TPOT = (e2e − TTFT) / (n − 1), the mean gap between a "
        "turn's output tokens after the first; ITL = every gap between consecutive output "
        "tokens. Pool utilization counts pages with a reference; waste = allocated but "
        "unwritten slots / allocated slots of running requests.",
        "",
    ]
    if results.get("mode") != "remote":
        parts += [
            "## Ratios to the full engine (`paged`)",
            "",
            ratio_table(results["ratios"]),
            "",
            "A ratio is configuration / paged: above 1 is more throughput or "
            "concurrency, or longer latency, than the full engine.",
            "",
        ]
    if any(name.startswith("paged-kv-") for name in results["configs"]):
        parts += ["## KV cache dtype at one memory budget", "", kv_dtype_table(results), ""]
    if results.get("meshes"):
        parts += [
            "## Meshes at one per-device KV budget",
            "",
            meshes.mesh_table(results["meshes"]),
            "",
            "Capacity = `Engine.kv_capacity_tokens`, over every data shard; pages = the pool's, "
            "every shard's null page included. The `model` axis "
            "splits each page over the kv heads (up to their number; beyond it kv heads are "
            "replicated); the `data` axis gives each shard pages of its own. Fake CPU devices "
            "share the cores: there, tokens/s is no performance figure.",
            "",
        ]
    if results.get("probes"):
        parts += ["## Probes", "", probes_section(results["probes"]), ""]
    if results.get("goals"):
        parts += ["## Goals, measured", "", goals_table(results["goals"]), ""]
    if results.get("sweep"):
        parts += [
            "## Rate sweep (`paged`, Poisson arrivals)",
            "",
            sweep_table(results["sweep"]),
            "",
        ]
    if results.get("plots"):
        parts += ["## Plots", ""] + [f"![{p}]({p})" for p in results["plots"]] + [""]
    elif results.get("plots_skipped"):
        parts += ["## Plots", "", f"Skipped: {results['plots_skipped']}.", ""]
    return "\n".join(parts)
