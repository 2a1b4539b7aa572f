"""4. Cold start and memory: each function, fresh interpreter to first answer, and its peak RSS.

Each run is a new Python process that imports the function's module, validates its settings and
answers one real request through its Lambda handler (Mangum + Powertools), against the local
stack's warm database, fake Vapi and local QStash. The baseline is the same process with every
package the functions need imported eagerly at the top first, as a straight port would. The
shared layer is built with `sam build` and measured unzipped and zipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

from formcall_cli.events import http_event, sign_event, webhook_headers
from formcall_dev.seed import create_form, create_patient
from formcall_dev.tools.bench.common import REPO_ROOT, BenchStack, median

DOMAIN = "coldstart.lambda-url.us-east-1.on.aws"

# What a straight port imports at the top of every handler module.
EAGER_IMPORTS = """
import boto3
import httpx
import jwt
import psycopg
import pydantic
import starlette.applications
from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.utilities import parameters
from mangum import Mangum
from qstash import QStash, Receiver
from supabase import create_client
"""

CHILD = """
import json, os, sys, time
{eager}
sys.path.insert(0, {root!r})
import importlib

class Context:
    function_name = "formcall-coldstart"
    memory_limit_in_mb = 256
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:formcall-coldstart"
    aws_request_id = "00000000-0000-0000-0000-000000000000"
    def get_remaining_time_in_millis(self):
        return 30000

imported = time.time()
module = importlib.import_module("functions.{name}.app")
loaded = time.time()
event = json.loads(open(sys.argv[1]).read())
answer = module.handler(event, Context())
done = time.time()
spawned = float(os.environ["BENCH_SPAWNED_AT"])
# VmHWM is this process's own peak; getrusage's ru_maxrss keeps the parent's from before exec.
hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status")
              if line.startswith("VmHWM:"))
print(json.dumps({{"status": answer["statusCode"], "first_answer_ms": (done - spawned) * 1000,
                  "import_ms": (loaded - spawned) * 1000, "request_ms": (done - loaded) * 1000,
                  "peak_rss_mb": hwm_kb / 1024}}))
"""


def _events(info, conn) -> dict[str, dict]:
    """One realistic first request per function, signed or authenticated as in production."""
    creds = info.credentials
    patient = create_patient(conn)
    due = create_form(conn, patient_id=patient, deadline=datetime.now(UTC), silent=True)
    ahead = create_form(
        conn,
        patient_id=patient,
        silent=True,
        deadline=datetime.now(UTC) + timedelta(days=1),
    )

    def signed(path: str, body: dict) -> dict:
        event = http_event(
            method="POST",
            path=path,
            body=json.dumps(body),
            domain=DOMAIN,
            headers={
                "content-type": "application/json",
                "upstash-message-id": "msg_" + uuid.uuid4().hex,
                "upstash-retried": "0",
            },
        )
        return sign_event(event, key=creds["QSTASH_CURRENT_SIGNING_KEY"])

    def webhook(body: str) -> dict:
        return http_event(
            method="POST",
            path="/api/webhooks/forms",
            domain=DOMAIN,
            body=body,
            headers=webhook_headers(body, secret=creds["WEBHOOK_SECRET"]),
        )

    failure = {
        "status": 489,
        "retried": 5,
        "sourceMessageId": "msg_" + uuid.uuid4().hex,
        "sourceBody": _b64(json.dumps({"formId": due})),
        "body": _b64('{"error":"x"}'),
    }
    row = {"id": ahead, "deadline": None, "submitted_at": None}
    return {
        "call_form": lambda: signed("/api/jobs/call-form", {"formId": due}),
        "check_forms": lambda: signed("/api/cron/check-forms", {}),
        "setup": lambda: http_event(
            method="GET",
            path="/api/setup-qstash",
            domain=DOMAIN,
            query={"secret": creds["CRON_SECRET"]},
        ),
        "schedule_form": lambda: webhook(
            json.dumps(
                {
                    "type": "INSERT",
                    "table": "forms",
                    "schema": "public",
                    "record": row,
                    "old_record": None,
                }
            )
        ),
        "failure_callback": lambda: signed("/api/jobs/failed", failure),
        "reset": lambda: conn.execute(
            "update forms set call_status = 'pending', call_attempts = 0, vapi_call_id = null,"
            " called_at = null, claimed_at = null, qstash_message_id = null,"
            " scheduled_deadline = null where id in (%s, %s)",
            (due, ahead),
        ),
    }


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


def run_once(name: str, event: dict, env: dict[str, str], *, baseline: bool) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(event, handle)
    code = CHILD.format(eager=EAGER_IMPORTS if baseline else "", root=str(REPO_ROOT), name=name)
    try:
        env = {**env, "BENCH_SPAWNED_AT": repr(time.time())}
        done = subprocess.run(
            [sys.executable, "-c", code, handle.name],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        os.unlink(handle.name)
    if done.returncode != 0:
        raise RuntimeError(f"{name} cold start failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def layer_size(build_dir: Path) -> dict | None:
    """The built layer's size unzipped and as Lambda stores it (a deflated zip)."""
    layer = build_dir / "SharedLayer"
    if not layer.is_dir():
        return None
    files = [p for p in layer.rglob("*") if p.is_file()]
    unzipped = sum(p.stat().st_size for p in files)
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "layer.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
            for path in files:
                zipped.write(path, path.relative_to(layer))
        size = archive.stat().st_size
    return {"unzipped_mb": unzipped / 1e6, "zipped_mb": size / 1e6, "files": len(files)}


def sam_build(work: Path) -> tuple[Path | None, float | None, str]:
    sam = os.environ.get("SAM_CLI") or shutil.which("sam")
    if not sam:
        return None, None, "no SAM CLI (set SAM_CLI)"
    build = work / "sam-build"
    started = time.perf_counter()
    done = subprocess.run(
        [sam, "build", "--build-dir", str(build), "--cache-dir", str(work / "sam-cache")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "SAM_CLI_TELEMETRY": "0"},
        timeout=600,
    )
    if done.returncode != 0:
        return None, None, f"sam build failed: {done.stderr[-500:]}"
    return build, time.perf_counter() - started, "sam build (this run)"


def bench_coldstart(work: Path, sizes) -> dict:
    results: dict[str, dict] = {}
    with BenchStack(work / "coldstart") as info, psycopg.connect(info.dsn, autocommit=True) as conn:
        # The URLs stay the stack's (loopback): the signed subjects are the events' own URLs.
        env = {
            **os.environ,
            **info.env(),
            "POWERTOOLS_SERVICE_NAME": "formcall",
            "POWERTOOLS_METRICS_NAMESPACE": "formcall",
        }
        env.pop("FORMCALL_SECRET_ARN", None)
        events = _events(info, conn)
        for name in sizes.cold_functions:
            runs = {"function": [], "baseline": []}
            for _ in range(sizes.cold_runs):
                # Alternate, so drift on a shared machine hits both alike.
                for kind in ("function", "baseline"):
                    events["reset"]()
                    runs[kind].append(
                        run_once(name, events[name](), env, baseline=kind == "baseline")
                    )
            statuses = {r["status"] for rs in runs.values() for r in rs}
            summary = {
                kind: {
                    key: median(r[key] for r in rs)
                    for key in ("first_answer_ms", "import_ms", "request_ms", "peak_rss_mb")
                }
                for kind, rs in runs.items()
            }
            summary["ratio"] = (
                summary["function"]["first_answer_ms"] / summary["baseline"]["first_answer_ms"]
            )
            summary["statuses"] = sorted(statuses)
            results[name] = summary
    build, build_s, source = (
        sam_build(work)
        if sizes.sam_build
        else (REPO_ROOT / ".aws-sam" / "build", None, "the last `make build` (.aws-sam/build)")
    )
    layer = layer_size(build) if build else None
    return {
        "functions": results,
        "runs": sizes.cold_runs,
        "layer": layer,
        "layer_source": source if layer else f"not measured: {source}",
        "sam_build_s": build_s,
    }
