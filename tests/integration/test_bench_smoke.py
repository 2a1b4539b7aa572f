"""`make bench` on tiny sizes, so the benchmark code cannot rot: every benchmark runs, BENCHMARKS.md
and the plots are written, and the numbers are sane. Nothing here asserts a timing or a target."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pytest

from formcall.publisher import flow_control
from formcall_dev.bench import plots, report
from formcall_dev.bench.__main__ import BENCHMARKS, main, run
from formcall_dev.bench.common import SMOKE, machine, percentile


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
    assert flow_control(10, 10) | {"key": None} == {"key": None, "parallelism": 10, "rate": 1,
                                                    "period": 6}


def test_unknown_benchmark_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--only", "nonsense"])
    assert "unknown benchmark" in capsys.readouterr().err


def test_every_benchmark_runs_and_writes_the_report(tmp_path):
    # Each benchmark starts its own local stack; three at a time keeps this test short.
    def run_one(name: str) -> dict:
        return run((name,), SMOKE, tmp_path / name, log=lambda *args, **kwargs: None)

    with ThreadPoolExecutor(max_workers=3) as pool:
        parts = list(pool.map(run_one, BENCHMARKS))
    results = {name: part[name] for part in parts for name in part}
    assert {name: results[name].get("error") for name in BENCHMARKS} == dict.fromkeys(BENCHMARKS)

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
    assert [s["overdue"] for s in sweep] == [round(f * SMOKE.table_rows)
                                             for f in sorted(SMOKE.overdue_fractions, reverse=True)]
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
        assert day["publish"] == SMOKE.day_forms + quota["fates"]["moved"]
    assert quota["formcall"]["cancel"] == quota["fates"]["submitted"] + quota["fates"]["moved"]
    assert quota["seed"]["cancel"] == 0

    pictures = plots.draw(results, tmp_path / "docs")
    assert sorted(pictures) == sorted(BENCHMARKS)
    for path in pictures.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = {"mode": "smoke", "machine": machine(), "date": "today", "minutes": 0.5}
    text = report.write(results, meta=meta, path=tmp_path / "BENCHMARKS.md").read_text()
    for heading in ("## Targets at a glance", "## 1. Burst drain", "## 3. Sweep at scale",
                    "## 6. QStash requests per form", "make bench QUICK=1"):
        assert heading in text
    assert "Failed in this run" not in text
    for path in pictures.values():
        assert f"docs/{path.name}" in text
