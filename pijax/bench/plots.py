"""PNG plots of one bench run (matplotlib, headless): latency CDFs per configuration, pool
utilization and running/waiting over time, and the rate sweep."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pijax.bench.runner import RunResult

MISSING = "needs matplotlib (pip install -e '.[bench]')"


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_cdfs(runs: dict[str, RunResult], path: Path) -> Path:
    plt = _plt()
    panels = [
        ("TTFT", lambda r: [t.ttft for t in r.turns]),
        ("inter-token latency", lambda r: [g for t in r.turns for g in t.itls]),
        ("end-to-end latency", lambda r: [t.e2e for t in r.turns]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.2))
    for ax, (title, values) in zip(axes, panels, strict=True):
        for name, run in runs.items():
            xs = np.sort(np.asarray(values(run)))
            if xs.size == 0:
                continue
            ax.plot(xs, np.arange(1, xs.size + 1) / xs.size, label=name)
        ax.set_xscale("log")
        ax.set_xlabel("seconds (log)")
        ax.set_ylabel("fraction of samples")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def timelines(runs: dict[str, RunResult], path: Path) -> Path:
    plt = _plt()
    engine_runs = {k: r for k, r in runs.items() if r.usable_pages is not None and r.steps}
    n = max(1, len(engine_runs))
    fig, axes = plt.subplots(n, 1, figsize=(11, 2.6 * n), squeeze=False)
    for ax, (name, run) in zip(axes[:, 0], engine_runs.items(), strict=False):
        t = np.asarray([s.t - run.start for s in run.steps])
        ax.fill_between(
            t,
            [s.pool_usage for s in run.steps],
            step="post",
            alpha=0.25,
            color="tab:blue",
            label="pool utilization",
        )
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("pool used")
        ax.set_title(name, fontsize=10)
        ax2 = ax.twinx()
        ax2.step(
            t, [s.running for s in run.steps], where="post", color="tab:green", label="running"
        )
        ax2.step(t, [s.waiting for s in run.steps], where="post", color="tab:red", label="waiting")
        ax2.set_ylabel("requests")
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("seconds since start")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep(points: list[dict], path: Path) -> Path:
    plt = _plt()
    rate = [p["rate_conversations_per_s"] for p in points]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(rate, [p["output_tokens_per_s"] for p in points], "o-")
    a.set_xlabel("arrival rate (conversations/s)")
    a.set_ylabel("output tokens/s")
    a.set_title("throughput")
    b.plot(rate, [p["ttft_p99_s"] for p in points], "o-", color="tab:red", label="p99")
    b.plot(rate, [p["ttft_p50_s"] for p in points], "o--", color="tab:orange", label="p50")
    b.set_xlabel("arrival rate (conversations/s)")
    b.set_ylabel("TTFT (s)")
    b.set_yscale("log")
    b.set_title("time to first token")
    b.legend()
    for ax in (a, b):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(results: dict, runs: dict[str, RunResult], out_dir: Path) -> list[str]:
    files = [latency_cdfs(runs, out_dir / "latency_cdf.png")]
    if any(r.usable_pages is not None and r.steps for r in runs.values()):
        files.append(timelines(runs, out_dir / "pool_timeline.png"))
    if results.get("sweep"):
        files.append(sweep(results["sweep"]["points"], out_dir / "sweep.png"))
    return [p.name for p in files]
