"""`python -m formcall_dev.tools.bench [--quick] [--only NAMES]`: BENCHMARKS.md and docs/bench-*.png.

Benchmarks report; they never fail on a missed target. The exit status is 1 only when a
benchmark itself could not run (its error is in BENCHMARKS.md too).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

from formcall_dev.tools.bench import plots, report
from formcall_dev.tools.bench.burst import bench_burst
from formcall_dev.tools.bench.coldstart import bench_coldstart
from formcall_dev.tools.bench.common import FULL, QUICK, REPO_ROOT, SMOKE, Sizes, machine
from formcall_dev.tools.bench.lines import bench_lines
from formcall_dev.tools.bench.quota import bench_quota
from formcall_dev.tools.bench.seed_design import bench_seed_design
from formcall_dev.tools.bench.sweep import bench_sweep
from formcall_dev.tools.bench.warm import bench_warm

# Order matters: the seed's design uses the sweep's cost per form when the sweep ran first.
BENCHMARKS = ("coldstart", "warm", "sweep", "seed_design", "burst", "quota", "lines")


def _largest_sweep(results: dict) -> tuple[float, int] | None:
    sweep = results.get("sweep")
    if not sweep or "error" in sweep:
        return None
    top = max(sweep["shares"], key=lambda r: r["overdue"])
    return (top["sweep_s"], top["overdue"]) if top["overdue"] >= 1000 else None


def run(names: tuple[str, ...], sizes: Sizes, work: Path, log=print) -> dict:
    results: dict = {}
    for name in names:
        started = time.perf_counter()
        log(f"bench: {name} ...", flush=True)
        try:
            if name == "seed_design":
                results[name] = bench_seed_design(work, sizes, sweep=_largest_sweep(results))
            else:
                results[name] = {
                    "coldstart": bench_coldstart,
                    "warm": bench_warm,
                    "sweep": bench_sweep,
                    "burst": bench_burst,
                    "quota": bench_quota,
                    "lines": bench_lines,
                }[name](work, sizes)
        except Exception as exc:
            traceback.print_exc()
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        log(f"bench: {name} done in {time.perf_counter() - started:.0f} s", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m formcall_dev.tools.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tests only
    parser.add_argument(
        "--only", default=",".join(BENCHMARKS), help=f"comma-separated, of: {', '.join(BENCHMARKS)}"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT,
        help="where BENCHMARKS.md and docs/ go (default: the repository)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the scratch folder (stacks' logs, results.json)"
    )
    args = parser.parse_args(argv)
    names = tuple(n.strip() for n in args.only.split(",") if n.strip())
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    sizes = SMOKE if args.smoke else QUICK if args.quick else FULL
    names = tuple(n for n in BENCHMARKS if n in names)

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="formcall-bench-"))
    try:
        results = run(names, sizes, work)
        (work / "results.json").write_text(json.dumps(results, indent=1, default=str))
        docs = args.out / "docs"
        pictures = plots.draw(results, docs)
        meta = {
            "mode": sizes.name,
            "machine": machine(),
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "minutes": (time.perf_counter() - started) / 60,
        }
        path = report.write(results, meta=meta, path=args.out / "BENCHMARKS.md")
        print(
            f"bench: wrote {path} and {len(pictures)} plots in {docs} ({meta['minutes']:.1f} min)"
        )
    finally:
        if args.keep:
            print(f"bench: scratch folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    failed = [n for n in names if "error" in results.get(n, {})]
    if failed:
        print(f"bench: could not run: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
