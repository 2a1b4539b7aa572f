"""The local stack: embedded PostgreSQL, local QStash, fake Vapi and the function server, on loopback.

Every component but PostgreSQL runs in its own process (`formcall_dev.serve`), with the very
apps that Mangum wraps on Lambda. Credentials are generated once and kept in the data folder.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import httpx

from formcall_cli.local_stack import DEFAULT_DIR, STATE_FILE, StackInfo
from formcall_dev.servers import free_port
from formcall_dev.supabase import webhooks
from formcall_dev.supabase.postgres import apply_migrations, start_embedded_postgres

LOCK_FILE = "stack.lock"


def fake_vapi(info: StackInfo, method: str, path: str, **kwargs):
    """The fake Vapi's admin API (`/_fake/...`) on a running stack: configure, rules, stats."""
    answer = httpx.request(
        method,
        f"{info.vapi_url}/_fake{path}",
        timeout=60,
        **kwargs,
        headers={"Authorization": f"Bearer {info.credentials['VAPI_PRIVATE_KEY']}"},
    )
    answer.raise_for_status()
    return answer.json()


class StackBusy(Exception):
    """Another local stack holds the data folder (`make serve` while `make dev`, or twice)."""


# Time compressed so the demo shows follow-ups within a minute: a follow-up seconds after a
# call ended, a lost report looked up and an unknown outcome reconciled seconds later, and caps
# relaxed (production: one call a
# day, three a week) so those follow-ups are allowed today. `formcall dev --help` names them.
DEV_CALL_RULES = {
    "FOLLOW_UP_DELAY_SECONDS": "3",
    "CALL_OUTCOME_TIMEOUT_SECONDS": "5",
    "PATIENT_MAX_CALLS_PER_DAY": "10",
    "PATIENT_MAX_CALLS_PER_WEEK": "30",
    # An unknown Vapi answer (a 5xx) is reconciled against Vapi's call list seconds later.
    "CLAIM_LEASE_SECONDS": "3",
}
# The fake Vapi's HMAC credential (as made in Vapi's dashboard); its secret is VAPI_WEBHOOK_SECRET.
DEV_CREDENTIAL_ID = "dev-hmac-credential"


def _credentials(data_dir: Path) -> dict[str, str]:
    """Dev credentials: generated on first run, kept so a restart keeps verifying old messages."""
    from formcall_dev.qstash.server import generate_dev_credentials

    path = data_dir / "credentials.json"
    kept = json.loads(path.read_text()) if path.exists() else {}
    creds = {
        **generate_dev_credentials(),
        "CRON_SECRET": secrets.token_urlsafe(24),
        "WEBHOOK_SECRET": secrets.token_urlsafe(24),
        "VAPI_PRIVATE_KEY": "dev-" + secrets.token_urlsafe(18),
        "VAPI_ASSISTANT_ID": "dev-assistant",
        "VAPI_PHONE_NUMBER_ID": "dev-phone-number",
        "VAPI_WEBHOOK_SECRET": secrets.token_urlsafe(24),
        "VAPI_SERVER_CREDENTIAL_ID": DEV_CREDENTIAL_ID,
        **kept,
    }
    path.write_text(json.dumps(creds, indent=2))
    path.chmod(0o600)
    return creds


class Stack:
    def __init__(
        self,
        data_dir: Path = DEFAULT_DIR,
        *,
        real_vapi: dict[str, str] | None = None,
        qstash_time_scale: float = 0.1,
        vapi_call_seconds: float = 2.0,
        call_window: str | None = None,
        vapi_concurrency: int = 10,
        vapi_ring_seconds: float = 1.0,
        call_rules: dict[str, str] | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.real_vapi = real_vapi
        self.qstash_time_scale = qstash_time_scale
        self.vapi_call_seconds = vapi_call_seconds
        self.call_window = call_window
        self.vapi_concurrency = vapi_concurrency
        self.vapi_ring_seconds = vapi_ring_seconds
        # The call rules' settings (the functions' defaults for those not given).
        self.call_rules = dict(DEV_CALL_RULES if call_rules is None else call_rules)
        self.extra_env = extra_env or {}
        self.processes: dict[str, subprocess.Popen] = {}
        self.postgres = None
        self.info: StackInfo | None = None
        self._folder_lock: int | None = None

    def lock(self) -> None:
        """Hold the data folder for this stack's life; StackBusy if another stack holds it.

        Taken before anything in the folder is touched: two stacks on one folder would share
        its database, and the second one's clean-up would delete the first one's state. The
        kernel drops the lock when the process ends, however it ends.
        """
        if self._folder_lock is not None:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StackBusy(
                f"a local stack is already running on {self.data_dir} (pid "
                f"{holder}): stop it (Ctrl-C where `make serve` runs) or give "
                f"another --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._folder_lock = fd

    def start(self) -> StackInfo:
        self.lock()
        (self.data_dir / "logs").mkdir(exist_ok=True)
        creds = _credentials(self.data_dir)
        self.postgres, dsn = start_embedded_postgres(self.data_dir / "pgdata")
        apply_migrations(dsn)
        ports = {name: free_port() for name in ("qstash", "vapi", "functions", "console")}
        urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        if self.real_vapi:
            # The real Vapi knows no dev credential: it sends X-Vapi-Secret unless one is given.
            creds = {**creds, "VAPI_SERVER_CREDENTIAL_ID": "", **self.real_vapi}
            urls["vapi"] = self.real_vapi.get("VAPI_BASE_URL", "https://api.vapi.ai")
        info = StackInfo(
            dsn=dsn,
            qstash_url=urls["qstash"],
            functions_url=urls["functions"],
            vapi_url=urls["vapi"],
            credentials=creds,
            real_vapi=bool(self.real_vapi),
            call_rules=dict(self.call_rules),
            console_url=urls["console"],
        )
        if self.call_window:
            info.call_window = self.call_window
        self.info = info
        webhooks.install(dsn, url=info.schedule_form_url, secret=creds["WEBHOOK_SECRET"])
        env = self._env()
        components = ["qstash", "functions", "console"] + ([] if self.real_vapi else ["vapi"])
        try:
            for name in components:
                self._spawn(name, ports[name], env)
            for name in components:
                self._wait_ready(name, urls[name])
            self._spawn("webhooks", 0, env)
            self._wait_listening(dsn)
        except BaseException:
            self.stop()
            raise
        info.pids = {name: proc.pid for name, proc in self.processes.items()}
        (self.data_dir / STATE_FILE).write_text(json.dumps(asdict(info), indent=2))
        (self.data_dir / STATE_FILE).chmod(0o600)
        return info

    def _env(self) -> dict[str, str]:
        assert self.info is not None
        return {
            **os.environ,
            **self.info.env(),
            "FORMCALL_DEV_DSN": self.info.dsn,
            "FORMCALL_DEV_QSTASH_TIME_SCALE": str(self.qstash_time_scale),
            "FORMCALL_DEV_VAPI_CALL_SECONDS": str(self.vapi_call_seconds),
            "FORMCALL_DEV_VAPI_CONCURRENCY": str(self.vapi_concurrency),
            "FORMCALL_DEV_VAPI_RING_SECONDS": str(self.vapi_ring_seconds),
            # The fake signs server messages with this credential, as Vapi does.
            "FORMCALL_DEV_VAPI_CREDENTIALS": json.dumps(
                {
                    self.info.credentials["VAPI_SERVER_CREDENTIAL_ID"]
                    or DEV_CREDENTIAL_ID: self.info.credentials["VAPI_WEBHOOK_SECRET"]
                }
            ),
            "FORMCALL_DEV_REAL_VAPI": "1" if self.real_vapi else "",
            "VAPI_MAX_CONCURRENCY": str(self.vapi_concurrency),
            # The fake's lines free up after a ring and a talk: the rate that keeps them busy.
            "VAPI_CALLS_PER_MINUTE": str(
                int(
                    self.vapi_concurrency
                    * 60
                    / max(self.vapi_ring_seconds + self.vapi_call_seconds, 0.1)
                )
            ),
            "POWERTOOLS_SERVICE_NAME": "formcall-dev",
            "POWERTOOLS_METRICS_NAMESPACE": "formcall",
            **self.extra_env,
        }

    def _wait_listening(self, dsn: str, timeout: float = 15.0) -> None:
        """The webhook forwarder is ready once its LISTEN is in place."""
        import psycopg

        deadline = time.monotonic() + timeout
        with psycopg.connect(dsn, autocommit=True) as conn:
            while time.monotonic() < deadline:
                if self.processes["webhooks"].poll() is not None:
                    raise RuntimeError(f"webhooks exited at start; see {self.data_dir}/logs")
                if conn.execute(
                    "select 1 from pg_stat_activity where query ilike 'listen %'"
                ).fetchone():
                    return
                time.sleep(0.05)
        raise TimeoutError("the webhook forwarder did not start listening")

    def _spawn(self, name: str, port: int, env: dict[str, str]) -> None:
        log = open(self.data_dir / "logs" / f"{name}.log", "ab")
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "formcall_dev.serve", name, str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def _wait_ready(self, name: str, url: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.processes[name].poll() is not None:
                raise RuntimeError(f"{name} exited at start; see {self.data_dir}/logs/{name}.log")
            try:
                httpx.get(url + "/", timeout=1.0)
                return
            except httpx.TransportError:
                time.sleep(0.05)
        raise TimeoutError(f"{name} did not start in {timeout:.0f} s")

    def restart(self, name: str) -> None:
        """Stop one component and start it again on the same port (tests: restart QStash)."""
        assert self.info is not None
        url = {
            "qstash": self.info.qstash_url,
            "vapi": self.info.vapi_url,
            "functions": self.info.functions_url,
        }[name]
        self._terminate(name)
        self._spawn(name, int(url.rsplit(":", 1)[1]), self._env())
        self._wait_ready(name, url)

    def _terminate(self, name: str) -> None:
        proc = self.processes.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=8)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def stop(self) -> None:
        """Stop what this stack started; without the folder's lock there is nothing of ours."""
        if self._folder_lock is None:
            return
        for name in list(self.processes):
            self._terminate(name)
        if self.postgres is not None:
            self.postgres.cleanup()
            self.postgres = None
        state = self.data_dir / STATE_FILE
        if state.exists():
            state.unlink()
        os.close(self._folder_lock)  # releases the lock
        self._folder_lock = None

    def __enter__(self) -> StackInfo:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
