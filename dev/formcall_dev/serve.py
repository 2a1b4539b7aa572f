"""Run one component of the local stack (a server, or the webhook forwarder) in its own process.

`python -m formcall_dev.serve NAME PORT`.

Its settings come from the environment the dev stack (stack.py) gives it.
"""

from __future__ import annotations

import os
import sys

import uvicorn


def build(name: str):
    env = os.environ
    if name == "qstash":
        from formcall_dev.qstash.server import create_app

        return create_app(
            dsn=env["FORMCALL_DEV_DSN"],
            token=env["QSTASH_TOKEN"],
            current_signing_key=env["QSTASH_CURRENT_SIGNING_KEY"],
            next_signing_key=env["QSTASH_NEXT_SIGNING_KEY"],
            time_scale=float(env.get("FORMCALL_DEV_QSTASH_TIME_SCALE", "1")),
        )
    if name == "vapi":
        import json

        from formcall_dev.vapi.fake import FakeVapi

        mix = env.get("FORMCALL_DEV_VAPI_OUTCOME_MIX")
        return FakeVapi(
            api_key=env["VAPI_PRIVATE_KEY"],
            concurrency_limit=int(env.get("FORMCALL_DEV_VAPI_CONCURRENCY", "10")),
            call_duration=float(env.get("FORMCALL_DEV_VAPI_CALL_SECONDS", "2")),
            ring_seconds=float(env.get("FORMCALL_DEV_VAPI_RING_SECONDS", "0")),
            time_scale=float(env.get("FORMCALL_DEV_VAPI_TIME_SCALE", "1")),
            # {credential id: HMAC secret}, as made in Vapi's dashboard.
            credentials=json.loads(env.get("FORMCALL_DEV_VAPI_CREDENTIALS") or "{}"),
            outcome_mix=json.loads(mix) if mix else None,
        ).app
    if name == "webhooks":
        from formcall_dev.supabase.webhooks import forward

        forward(env["FORMCALL_DEV_DSN"])
        raise SystemExit(0)
    if name == "console":
        from formcall_dev.console import ConsoleConfig, create_app

        return create_app(ConsoleConfig.from_env(env))
    if name == "functions":
        from formcall_dev.functions_server import create_app

        return create_app()
    raise SystemExit(f"unknown component {name!r}: qstash, vapi, functions or console")


def main() -> None:
    name, port = sys.argv[1], int(sys.argv[2])
    app = build(name)
    # Keep idle connections longer than the local QStash's pool keeps them (5 s), so a pooled
    # connection is never closed by the server just as a delivery goes out on it.
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=3,
        timeout_keep_alive=75,
    )


if __name__ == "__main__":
    main()
