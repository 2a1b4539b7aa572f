"""`make bench` on tiny sizes, so the benchmark code cannot rot: every benchmark runs, BENCHMARKS.md
and the plots are written, and the numbers are sane. Nothing here asserts a timing or a target."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pytest

from formcall.publisher import flow_control
from formcall_dev.tools.bench import plots, report
from formcall_dev.tools.bench.__main__ import BENCHMARKS, main, run
from formcall_dev.tools.bench.common import REPO_ROOT, SMOKE, machine, percentile


def test_percentile_is_nearest_rank():
    values = list(range(1, 1001))
    assert percentile(values, 99) == 990
    assert percentile(values, 50) == 500
    assert percentile([7.0], 99) == 7.0


def test_flow_control_never_starts_more_calls_than_lines_within_a_call():
    # The burst benchmark's finding: QStash may start a whole period's rate at once.
    for lines in (1, 3, 10, 25, 1000):
        for per_minute in (1, 7, 10, 60, 120, 1000, 1200, 6000, 100_000):
            flow = flow_control(lines, per_minute)
            call_seconds = lines * 60 / per_minute
            assert flow["parallelism"] == lines and flow["period"] >= 1
            assert flow["rate"] * math.ceil(call_seconds / flow["period"]) <= lines
            assert flow["rate"] * 60 <= per_minute * flow["period"]
    assert flow_control(10, 10) | {"key": None} == {
        "key": None,
        "parallelism": 10,
        "rate": 1,
        "period": 6,
    }


def test_unknown_benchmark_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--only", "nonsense"])
    assert "unknown benchmark" in capsys.readouterr().err


# The lines benchmark has a test of its own (below), so either can run alone.
OTHERS = tuple(name for name in BENCHMARKS if name != "lines")


def test_every_benchmark_runs_and_writes_the_report(tmp_path):
    # Each benchmark starts its own local stack; three at a time keeps this test short.
    def run_one(name: str) -> dict:
        return run((name,), SMOKE, tmp_path / name, log=lambda *args, **kwargs: None)

    with ThreadPoolExecutor(max_workers=3) as pool:
        parts = list(pool.map(run_one, OTHERS))
    results = {name: part[name] for part in parts for name in part}
    assert {name: results[name].get("error") for name in OTHERS} == dict.fromkeys(OTHERS)

    burst = results["burst"]["median"]
    assert burst["doubles"] == 0 and burst["missed"] == 0
    assert burst["max_concurrent"] <= SMOKE.burst_lines
    assert burst["drain_s"] > 0 and burst["ratio"] > 0
    assert results["burst"]["runs"][0]["placed"] == SMOKE.burst_forms

    seed = results["seed_design"]
    assert seed["inline_placed"] == seed["fanout_placed"] == SMOKE.backlog_forms
    assert seed["inline_per_form_s"] >= SMOKE.vapi_latency
    assert seed["inline_max_backlog"] > 0 and seed["fanout_max_backlog"] > 0

    sweep = results["sweep"]["shares"]
    assert [s["overdue"] for s in sweep] == [
        round(f * SMOKE.table_rows) for f in sorted(SMOKE.overdue_fractions, reverse=True)
    ]
    for share in sweep:
        assert share["uses_index"], share["plan"]
        assert share["sweep_found"] == share["sweep_enqueued"] == share["overdue"]
        assert share["qstash_requests"] == -(-share["overdue"] // 100)

    cold = results["coldstart"]["functions"]["call_form"]
    assert cold["statuses"] == [200]
    assert 0 < cold["function"]["first_answer_ms"] and 0 < cold["baseline"]["first_answer_ms"]
    assert 10 < cold["function"]["peak_rss_mb"] < 1000

    warm = results["warm"]
    assert warm["requests"] == SMOKE.warm_requests == warm["called"]
    assert 0 < warm["cpu_median_ms"] <= warm["cpu_p99_ms"]

    quota = results["quota"]
    for design in ("formcall", "seed"):
        day = quota[design]
        assert day["called"] == day["placed"] == SMOKE.day_forms - quota["fates"]["submitted"]
    # The seed's design publishes from the benchmark itself: once per form and per move.
    assert quota["seed"]["publish"] == SMOKE.day_forms + quota["fates"]["moved"]
    assert quota["seed"]["cancel"] == 0
    # formcall's come from webhooks: a day of one second can see a form submitted before its
    # insert's webhook ran (nothing to publish then), so count against what it recorded.
    formcall = quota["formcall"]
    assert 0 < formcall["publish"] == formcall["recorded_publishes"]
    assert formcall["publish"] <= SMOKE.day_forms + quota["fates"]["moved"]
    assert formcall["cancel"] == formcall["recorded_cancels"]

    pictures = plots.draw(results, tmp_path / "docs")
    assert sorted(pictures) == sorted(OTHERS)
    for path in pictures.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = {"mode": "smoke", "machine": machine(), "date": "today", "minutes": 0.5}
    text = report.write(results, meta=meta, path=tmp_path / "BENCHMARKS.md").read_text()
    for heading in (
        "## Targets at a glance",
        "## 1. Burst drain",
        "## 3. Sweep at scale",
        "## 6. QStash requests per form",
        "## 7. Lines",
        "make bench QUICK=1",
    ):
        assert heading in text
    assert "Failed in this run" not in text
    for path in pictures.values():
        assert f"docs/{path.name}" in text


def test_the_lines_benchmark_runs_and_keeps_the_other_sections(tmp_path):
    results = run(("lines",), SMOKE, tmp_path / "work", log=lambda *args, **kwargs: None)
    lines = results["lines"]
    assert "error" not in lines, lines
    for mode in lines["modes"].values():
        assert mode["missed"] == 0 and mode["called"] == SMOKE.lines_forms, mode
        assert mode["calls"] >= SMOKE.lines_forms and mode["series"][-1][1] == 0
        assert 0 < mode["limit_s"] and mode["drain_s"] > 0 and mode["ratio"] >= 1
    ledger = lines["modes"]["ledger"]
    assert ledger["max_in_use"] <= SMOKE.lines_lines and ledger["doubles"] == 0
    for drill in lines["drills"].values():
        assert drill["second_calls"] == 0 and drill["unresolved"] == 0, drill
        assert drill["resolved"] == SMOKE.lines_drill_forms
        assert 0 < drill["resolution_p50_s"] <= drill["resolution_p99_s"]
    assert lines["drills"]["blocked_queued"]["queued"] > 0
    assert lines["drills"]["created_502"]["create_requests"] >= SMOKE.lines_drill_forms

    [picture] = plots.draw(results, tmp_path / "docs").values()
    assert picture.name == "bench-lines-burst.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Written over the repository's BENCHMARKS.md: the sections not run stay as they were.
    path = tmp_path / "BENCHMARKS.md"
    old = (REPO_ROOT / "BENCHMARKS.md").read_text()
    path.write_text(old)
    meta = {"mode": "smoke", "machine": machine(), "date": "today", "minutes": 0.5}
    text = report.write(results, meta=meta, path=path).read_text()
    assert "## 7. Lines" in text and "docs/bench-lines-burst.png" in text
    assert "Failed in this run" not in text and "Not run" not in text
    burst = old[old.index("## 1. Burst drain") : old.index("## 2. ")]
    assert burst in text and "Sections 1, 2, 3, 4, 5, 6 were not run this time" in text
    targets = old[old.index("## Targets at a glance") : old.index("## 1. ")]
    kept = [line for line in targets.splitlines() if line.startswith(("| 1 |", "| 6 |"))]
    assert kept
    for row in kept:
        assert row in text and text.index(row) < text.index("| 7 | Lines")
    if "\n## Chaos\n" in old:
        assert old[old.index("\n## Chaos\n") :] in text
