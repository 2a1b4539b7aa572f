"""`formcall dev`: start the local stack and play the demo, or keep it running (`--serve`).

The `formcall` command (formcall_cli.main) adds it when the dev extra is installed.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from formcall_cli.local_stack import StackInfo
from formcall_cli.output import DataDir, console, fail


def dev(
    serve: Annotated[
        bool, typer.Option("--serve", help="Keep the stack running for manual use.")
    ] = False,
    real_vapi: Annotated[
        bool,
        typer.Option(
            "--real-vapi",
            help="Use the real Vapi API (dials real phones; needs VAPI_PRIVATE_KEY, VAPI_ASSISTANT_ID, VAPI_PHONE_NUMBER_ID; --serve only).",
        ),
    ] = False,
    call_window: Annotated[
        str | None,
        typer.Option(
            "--call-window",
            help="CALL_WINDOW for the stack (default: any hour, so the demo runs now).",
        ),
    ] = None,
    follow_up_delay: Annotated[
        int | None,
        typer.Option(
            "--follow-up-delay", help="FOLLOW_UP_DELAY_SECONDS (dev: 3; production default 86400)."
        ),
    ] = None,
    outcome_timeout: Annotated[
        int | None,
        typer.Option(
            "--outcome-timeout",
            help="CALL_OUTCOME_TIMEOUT_SECONDS: a call without a report is looked up by the sweep after this long (dev: 5; production default 1800).",
        ),
    ] = None,
    max_calls_per_day: Annotated[
        int | None,
        typer.Option(
            "--max-calls-per-day", help="PATIENT_MAX_CALLS_PER_DAY (dev: 10; production default 1)."
        ),
    ] = None,
    max_calls_per_week: Annotated[
        int | None,
        typer.Option(
            "--max-calls-per-week",
            help="PATIENT_MAX_CALLS_PER_WEEK (dev: 30; production default 3).",
        ),
    ] = None,
    ring_seconds: Annotated[
        float, typer.Option("--ring-seconds", help="How long the fake Vapi's calls ring.")
    ] = 1.0,
    call_seconds: Annotated[
        float, typer.Option("--call-seconds", help="How long the fake Vapi's answered calls talk.")
    ] = 1.5,
    data_dir: DataDir = Path(".dev"),
) -> None:
    """Start the whole system locally and play the demo (or keep it running with --serve).

    Time is compressed: the fake Vapi's calls ring about a second and talk a second or two, \
a follow-up is due seconds after a call ended, a call whose report was lost is looked up \
after seconds, and the per-patient caps are relaxed (10 a day, 30 a week) so follow-ups \
happen now. The options below set each of them. With --real-vapi the production rules apply \
unless an option is given.
    """
    import time

    from formcall_dev import demo
    from formcall_dev.stack import DEV_CALL_RULES, Stack, StackBusy

    vapi = None
    if real_vapi:
        if not serve:
            fail("--real-vapi dials real phones: it is only allowed with --serve (no demo seeds)")
        missing = [
            n
            for n in ("VAPI_PRIVATE_KEY", "VAPI_ASSISTANT_ID", "VAPI_PHONE_NUMBER_ID")
            if not os.environ.get(n)
        ]
        if missing:
            fail(f"--real-vapi needs {', '.join(missing)}")
        vapi = {
            n: os.environ[n]
            for n in ("VAPI_PRIVATE_KEY", "VAPI_ASSISTANT_ID", "VAPI_PHONE_NUMBER_ID")
        }
        vapi["VAPI_BASE_URL"] = os.environ.get("VAPI_BASE_URL", "https://api.vapi.ai")
    # Ctrl-C and a terminating parent both end here, with every process stopped.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    started = time.monotonic()
    if call_window:
        from formcall.window import parse_window

        try:
            parse_window(call_window)
        except ValueError as exc:
            fail(str(exc))
    given = {
        "FOLLOW_UP_DELAY_SECONDS": follow_up_delay,
        "CALL_OUTCOME_TIMEOUT_SECONDS": outcome_timeout,
        "PATIENT_MAX_CALLS_PER_DAY": max_calls_per_day,
        "PATIENT_MAX_CALLS_PER_WEEK": max_calls_per_week,
    }
    # Real phones get the real rules (a follow-up a day, one call a day) unless told otherwise.
    rules = {
        **({} if real_vapi else DEV_CALL_RULES),
        **{k: str(v) for k, v in given.items() if v is not None},
    }
    from formcall import settings
    from formcall.errors import ConfigurationError

    try:
        for concern in (
            settings.CallCapsSettings,
            settings.FollowUpSettings,
            settings.ClaimLeaseSettings,
            settings.OutcomeTimeoutSettings,
        ):
            concern.model_validate(rules)
    except ConfigurationError as exc:
        fail(str(exc))
    except ValueError as exc:  # pydantic's ValidationError
        fail("; ".join(f"{e['loc'][0]}: {e['msg']}" for e in exc.errors()))
    stack = Stack(
        data_dir,
        real_vapi=vapi,
        call_window=call_window,
        call_rules=rules,
        vapi_ring_seconds=ring_seconds,
        vapi_call_seconds=call_seconds,
    )
    try:
        stack.lock()  # before anything is started or touched
    except StackBusy as exc:
        fail(str(exc))
    ok = True
    try:
        with console.status("starting PostgreSQL, local QStash, fake Vapi and the functions…"):
            info = stack.start()
        console.print(f"[bold green]stack up[/] in {time.monotonic() - started:.1f} s")
        if not real_vapi:
            console.print(compressed_time_note(rules, ring_seconds, call_seconds))
        if serve:
            print_serve_help(info, data_dir)
            while True:
                time.sleep(3600)
        else:
            ok = demo.run(info, console)
    except KeyboardInterrupt:
        console.print("stopping…")
    finally:
        stack.stop()
        console.print("every process stopped")
    raise typer.Exit(0 if ok else 1)


def compressed_time_note(rules: dict[str, str], ring_seconds: float, call_seconds: float) -> str:
    return (
        f"time compressed: calls ring {ring_seconds:g} s and talk {call_seconds:g} s, "
        f"follow-ups {rules['FOLLOW_UP_DELAY_SECONDS']} s after a call "
        f"(production: a day), lost reports looked up after "
        f"{rules['CALL_OUTCOME_TIMEOUT_SECONDS']} s, caps "
        f"{rules['PATIENT_MAX_CALLS_PER_DAY']} calls a day and "
        f"{rules['PATIENT_MAX_CALLS_PER_WEEK']} a week per patient (production: 1 and 3); "
        "see formcall dev --help"
    )


def print_serve_help(info: StackInfo, data_dir: Path) -> None:
    """The stack's URLs, settings and commands to try, each whole and runnable as printed."""
    rows = [
        ("console", info.console_url),
        ("call-form", info.call_form_url),
        ("check-forms", info.check_forms_url),
        ("setup", info.setup_url),
        ("call-events", info.call_events_url),
        ("QStash", info.qstash_url),
        ("Vapi", info.vapi_url),
        ("database", info.dsn),
        *info.credentials.items(),
    ]
    width = max(len(name) for name, _ in rows)
    lines = ["formcall local stack (Ctrl-C stops everything)"]
    lines += [f"  {name.ljust(width)}  {value}" for name, value in rows]
    secret = info.credentials["CRON_SECRET"]
    lines += [
        "Try:",
        f"  curl '{info.setup_url}?secret={secret}'",
        f"  curl -H 'Authorization: Bearer {secret}' {info.check_forms_url}",
        f"  {formcall_command('status', data_dir)}",
        f"  export $({formcall_command('env', data_dir)})  # this stack's settings for "
        f"other formcall commands",
    ]
    for line in lines:
        console.print(line, markup=False, highlight=False)


def formcall_command(subcommand: str, data_dir: Path) -> str:
    """How to run `formcall SUBCOMMAND` from the current folder: .venv/bin is not on PATH."""
    import shlex

    script = Path(sys.executable).with_name("formcall")
    if script.is_file():
        try:
            command = shlex.quote(str(script.relative_to(Path.cwd())))
        except ValueError:
            command = shlex.quote(str(script))
    else:
        command = f"{shlex.quote(sys.executable)} -m formcall_cli"
    command += f" {subcommand}"
    if data_dir != Path(".dev"):
        command += f" --data-dir {shlex.quote(str(data_dir))}"
    return command
