"""The PNG plots BENCHMARKS.md links (docs/bench-*.png), drawn with matplotlib's Agg backend."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "figure.dpi": 110,
            "font.size": 9,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
        }
    )
    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_burst(result: dict, path: Path) -> Path:
    from formcall_dev.tools.bench.burst import in_progress

    plt = _pyplot()
    run = result["plotted"]
    fig, ax = plt.subplots(figsize=(8, 3.4))
    steps = in_progress(run["starts"], run["call_seconds"])
    if steps:
        times, levels = zip(*steps, strict=True)
        ax.step(
            [0, *times],
            [0, *levels],
            where="post",
            lw=0.8,
            color="#1f77b4",
            label="calls in progress (fake Vapi)",
        )
    ax.axhline(
        run["lines"], color="#d62728", ls="--", lw=1, label=f"Vapi's limit: {run['lines']} lines"
    )
    ax.axvline(
        run["limit_s"],
        color="#2ca02c",
        ls=":",
        lw=1.2,
        label=f"physical limit N/C x d = {run['limit_s']:.0f} s",
    )
    ax.axvline(
        run["drain_s"],
        color="#7f7f7f",
        ls="-.",
        lw=1,
        label=f"last call placed: {run['drain_s']:.1f} s",
    )
    ax.set_xlabel("seconds after the deadline")
    ax.set_ylabel("calls in progress")
    ax.set_ylim(0, run["lines"] * 1.35)
    ax.set_title(
        f"Burst: {run['forms']} forms due at once, {run['lines']} lines, "
        f"{run['call_seconds']:g} s calls"
    )
    ax.legend(loc="upper right", fontsize=7, ncol=2)
    return _save(fig, path)


def plot_seed_design(result: dict, path: Path) -> Path:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2))
    names = ["seed: inline", "formcall: fan-out"]
    drains = [result["inline_drain_s"], result["fanout_drain_s"]]
    bars = left.bar(names, drains, color=["#ff7f0e", "#1f77b4"])
    left.bar_label(bars, fmt="%.1f s")
    left.set_ylabel("seconds to drain")
    left.set_title(f"{result['forms']} overdue forms, Vapi answering in {result['latency_s']:g} s")
    latencies = [0.25, 0.5, 1, 2, 4]
    overhead = max(result["inline_overhead_per_form_s"], 0.0)
    right.plot(
        latencies,
        [900 / (lat + overhead) for lat in latencies],
        "o-",
        color="#ff7f0e",
        label="seed: inline calls",
    )
    right.plot(
        latencies,
        [result["fanout_max_backlog"]] * len(latencies),
        "s-",
        color="#1f77b4",
        label="formcall: check-forms enqueues",
    )
    right.axvline(result["latency_s"], color="#7f7f7f", ls=":", lw=1)
    right.set_xscale("log")
    right.set_yscale("log")
    right.minorticks_off()
    right.set_xticks(latencies, [f"{lat:g}" for lat in latencies])
    right.set_xlabel("Vapi create-call latency (s)")
    right.set_ylabel("forms per 15-minute Lambda run")
    right.set_title("Largest backlog inside Lambda's 15 minutes")
    right.legend(fontsize=7)
    return _save(fig, path)


def plot_sweep(result: dict, path: Path) -> Path:
    plt = _pyplot()
    shares = sorted(result["shares"], key=lambda s: s["overdue"])
    overdue = [s["overdue"] for s in shares]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2))
    left.plot(
        overdue,
        [s["query_all_s"] * 1000 for s in shares],
        "o-",
        label="all overdue rows, 100 a page (index)",
    )
    left.plot(overdue, [s["query_first_page_ms"] for s in shares], "s-", label="first page (index)")
    left.plot(
        overdue, [s["page_seqscan_ms"] for s in shares], "^--", label="first page, index scans off"
    )
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel(f"overdue forms (table of {result['rows']:,} rows)")
    left.set_ylabel("ms")
    left.set_title("Overdue query")
    left.legend(fontsize=7)
    bars = right.bar([f"{n:,}" for n in overdue], [s["sweep_s"] for s in shares], color="#1f77b4")
    right.bar_label(
        bars,
        labels=[f"{s['sweep_s']:.2f} s\n{s['qstash_requests']} req" for s in shares],
        fontsize=7,
    )
    right.set_ylim(0, max(s["sweep_s"] for s in shares) * 1.3)
    right.set_xlabel("overdue forms")
    right.set_ylabel("seconds")
    right.set_title("Whole sweep (check-forms), QStash requests")
    return _save(fig, path)


def plot_coldstart(result: dict, path: Path) -> Path:
    plt = _pyplot()
    names = list(result["functions"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2))
    x = range(len(names))
    for offset, kind, color in ((-0.2, "function", "#1f77b4"), (0.2, "baseline", "#ff7f0e")):
        left.bar(
            [i + offset for i in x],
            [result["functions"][n][kind]["first_answer_ms"] for n in names],
            width=0.4,
            color=color,
            label="formcall" if kind == "function" else "eager imports",
        )
        right.bar(
            [i + offset for i in x],
            [result["functions"][n][kind]["peak_rss_mb"] for n in names],
            width=0.4,
            color=color,
        )
    for ax in (left, right):
        ax.set_xticks(list(x), [n.replace("_", "-") for n in names], rotation=20, fontsize=7)
    left.set_ylabel("ms, fresh interpreter to first answer")
    left.set_title("Cold start")
    left.legend(fontsize=7)
    right.axhline(128, color="#d62728", ls="--", lw=1)
    right.set_ylabel("peak RSS (MB)")
    right.set_title("Memory (target < 128 MB)")
    return _save(fig, path)


def plot_warm(result: dict, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3))
    cpu = result["cpu_ms"]
    ax.hist(cpu, bins=60, color="#1f77b4")
    ax.axvline(
        result["cpu_median_ms"],
        color="#2ca02c",
        ls="-",
        label=f"median {result['cpu_median_ms']:.2f} ms",
    )
    ax.axvline(
        result["cpu_p99_ms"], color="#ff7f0e", ls="--", label=f"p99 {result['cpu_p99_ms']:.2f} ms"
    )
    ax.axvline(5, color="#d62728", ls=":", label="target: median < 5 ms")
    ax.set_xlabel("call-form CPU per request (ms), network waits excluded")
    ax.set_ylabel("requests")
    ax.set_title(f"Warm cost over {result['requests']:,} requests")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_quota(result: dict, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3))
    rows = [
        ("billed messages\n(publishes, triggers)", "day_messages_per_form"),
        ("deliveries\n(Lambda invocations)", "deliveries_per_form"),
        ("API requests\n(incl. free cancels)", "requests_per_form"),
    ]
    x = range(len(rows))
    for offset, design, color, label in (
        (-0.2, "formcall", "#1f77b4", "formcall"),
        (0.2, "seed", "#ff7f0e", "seed's design"),
    ):
        bars = ax.bar(
            [i + offset for i in x],
            [result[design][key] for _, key in rows],
            width=0.4,
            color=color,
            label=label,
        )
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(list(x), [name for name, _ in rows], fontsize=8)
    ax.set_ylabel("per form per day")
    ax.set_title(f"QStash per form, a day of {result['forms']} forms")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_lines(result: dict, path: Path) -> Path:
    plt = _pyplot()
    modes = result["modes"]
    fig, axes = plt.subplots(2, 1, figsize=(8, 4.8), sharex=True)
    names = {"rate": "(a) rate-based flow control, no ledger", "ledger": "(b) line ledger"}
    for ax, (mode, color) in zip(axes, (("rate", "#ff7f0e"), ("ledger", "#1f77b4")), strict=True):
        run = modes[mode]
        if run["series"]:
            times, levels = zip(*run["series"], strict=True)
            ax.step(
                [0, *times],
                [0, *levels],
                where="post",
                lw=0.7,
                color=color,
                label="lines in use (fake Vapi)",
            )
        ax.axhline(run["lines"], color="#d62728", ls="--", lw=1, label=f"{run['lines']} lines")
        ax.axvline(
            run["limit_s"],
            color="#2ca02c",
            ls=":",
            lw=1.2,
            label=f"physical limit {run['limit_s']:,.0f} s",
        )
        ax.axvline(
            run["drain_s"],
            color="#7f7f7f",
            ls="-.",
            lw=1,
            label=f"drained {run['drain_s']:,.0f} s = {run['ratio']:.2f}x",
        )
        ax.set_ylim(0, run["lines"] * 1.45)
        ax.set_ylabel("lines in use")
        ax.set_title(
            f"{names[mode]}: {run['refused']} refusals, {run['doubles']} doubles", fontsize=9
        )
        ax.legend(loc="upper right", fontsize=7, ncol=4)
    axes[-1].set_xlabel(
        f"call seconds after the deadline (run compressed x{result['params']['compression']:g})"
    )
    fig.suptitle(f"{result['params']['forms']:,} forms due at once, real call lengths", fontsize=10)
    return _save(fig, path)


PLOTS = {
    "burst": plot_burst,
    "seed_design": plot_seed_design,
    "sweep": plot_sweep,
    "coldstart": plot_coldstart,
    "warm": plot_warm,
    "quota": plot_quota,
    "lines": plot_lines,
}
# The file a plot goes to, where it is not bench-{name}.png.
FILES = {"lines": "bench-lines-burst.png"}


def draw(results: dict, docs: Path) -> dict[str, Path]:
    """Every plot whose benchmark ran: name -> file."""
    return {
        name: plot(results[name], docs / FILES.get(name, f"bench-{name.replace('_', '-')}.png"))
        for name, plot in PLOTS.items()
        if isinstance(results.get(name), dict) and "error" not in results[name]
    }
