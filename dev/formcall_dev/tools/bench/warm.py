"""5. Warm cost: call-form's own CPU time per request, network waits excluded.

One process plays a warm Lambda container: the call-form handler (Mangum + Powertools) answers
signed QStash deliveries, each for its own due form, placing a real call on the fake Vapi and
recording it in the database, both in other processes. `time.process_time()` around each
invocation counts this process's CPU in every thread and nothing it spent waiting on a socket.
Signing the events is done before the clock starts; log lines are written (to /dev/null), as
Lambda writes them (to CloudWatch).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

from formcall_cli.events import http_event, sign_event
from formcall_dev.seed import create_forms_one_patient_each
from formcall_dev.stack import fake_vapi
from formcall_dev.tools.bench.common import REPO_ROOT, BenchStack, median, percentile

WARMUP = 20

CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
from functions.call_form import app

class Context:
    function_name = "formcall-warm"
    memory_limit_in_mb = 256
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:formcall-warm"
    aws_request_id = "00000000-0000-0000-0000-000000000000"
    def get_remaining_time_in_millis(self):
        return 30000

events = json.loads(open(sys.argv[1]).read())
cpu, wall, statuses = [], [], []
for event in events:
    c0, w0 = time.process_time(), time.perf_counter()
    answer = app.handler(event, Context())
    cpu.append((time.process_time() - c0) * 1000)
    wall.append((time.perf_counter() - w0) * 1000)
    statuses.append(answer["statusCode"])
open(sys.argv[2], "w").write(json.dumps({{"cpu_ms": cpu[{warmup}:], "wall_ms": wall[{warmup}:],
                      "statuses": statuses[{warmup}:]}}))
"""


def bench_warm(work: Path, sizes) -> dict:
    total = sizes.warm_requests + WARMUP
    with (
        BenchStack(work / "warm", vapi_concurrency=1000, vapi_call_seconds=0) as info,
        psycopg.connect(info.dsn, autocommit=True) as conn,
    ):
        with conn.transaction():
            conn.execute("set local session_replication_role = replica")
            forms = create_forms_one_patient_each(
                conn,
                count=total,
                title="Warm form",
                deadline=datetime.now(UTC) - timedelta(minutes=1),
            )
        domain = "warm.lambda-url.us-east-1.on.aws"
        events = [
            sign_event(
                http_event(
                    method="POST",
                    path="/api/jobs/call-form",
                    body=json.dumps({"formId": form}),
                    domain=domain,
                    headers={
                        "content-type": "application/json",
                        "upstash-message-id": "msg_" + uuid.uuid4().hex,
                        "upstash-retried": "0",
                    },
                ),
                key=info.credentials["QSTASH_CURRENT_SIGNING_KEY"],
            )
            for form in forms
        ]
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
            json.dump(events, handle)
        output = Path(handle.name).with_suffix(".out.json")
        env = {
            **os.environ,
            **info.env(),
            # The fake Vapi's lines (the stack's): the line ledger counts each call until its
            # end is reported, and these requests come faster than a report.
            "VAPI_MAX_CONCURRENCY": "1000",
            "POWERTOOLS_SERVICE_NAME": "formcall",
            "POWERTOOLS_METRICS_NAMESPACE": "formcall",
        }
        env.pop("FORMCALL_SECRET_ARN", None)
        try:
            done = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    CHILD.format(root=str(REPO_ROOT), warmup=WARMUP),
                    handle.name,
                    str(output),
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                timeout=900,
            )
            if done.returncode != 0:
                raise RuntimeError(f"warm run failed: {done.stderr[-2000:]}")
            result = json.loads(output.read_text())
        finally:
            os.unlink(handle.name)
            output.unlink(missing_ok=True)
        placed = fake_vapi(info, "GET", "/stats")["placed"]
    cpu, wall = result["cpu_ms"], result["wall_ms"]
    return {
        "requests": len(cpu),
        "cpu_median_ms": median(cpu),
        "cpu_p99_ms": percentile(cpu, 99),
        "wall_median_ms": median(wall),
        "wall_p99_ms": percentile(wall, 99),
        "called": sum(1 for s in result["statuses"] if s == 200),
        "placed": placed,
        "cpu_ms": cpu,
    }
