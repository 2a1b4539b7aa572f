"""The `formcall` command: run the local stack, inspect state, trigger the sweep, re-sign events."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    help="formcall: deadline-driven patient calls.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# soft_wrap: a long id, token or URL is printed whole on one line (a terminal folds it for the
# eye, and a pipe or log gets it unbroken), never cut or wrapped mid-way.
console = Console(soft_wrap=True)
DataDir = Annotated[Path, typer.Option("--data-dir", help="Where the local stack keeps its state.")]


def fail(message: str) -> None:
    console.print(f"[red]error:[/] {message}")
    raise typer.Exit(2)


def setting(name: str, data_dir: Path = Path(".dev")) -> str:
    """A setting from the environment, else from a running local stack."""
    from formcall_dev.stack import load_info

    if os.environ.get(name):
        return os.environ[name]
    info = load_info(data_dir)
    if info and name in info.env():
        return info.env()[name]
    fail(f"{name} is not set (export it, or start the local stack with `formcall dev --serve`)")
    return ""


@app.command()
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
    from formcall.errors import ConfigurationError
    from formcall.settings import CallRulesSettings

    try:
        CallRulesSettings.model_validate(rules)
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


def print_serve_help(info, data_dir: Path) -> None:
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


@app.command("env")
def env_command(data_dir: DataDir = Path(".dev")) -> None:
    """Print the running local stack's settings as NAME=value lines."""
    from formcall_dev.stack import load_info

    info = load_info(data_dir)
    if info is None:
        fail("no local stack is running (start one with `formcall dev --serve`)")
    for name, value in info.env().items():
        print(f"{name}={value}")


@app.command()
def trigger(data_dir: DataDir = Path(".dev")) -> None:
    """Run the sweep now (GET check-forms with the bearer secret)."""
    import httpx

    url = setting("CHECK_FORMS_URL", data_dir)
    secret = setting("CRON_SECRET", data_dir)
    try:
        answer = httpx.get(url, headers={"Authorization": f"Bearer {secret}"}, timeout=300)
    except httpx.HTTPError as exc:
        fail(f"could not reach {url}: {type(exc).__name__}")
    console.print(f"{answer.status_code} {answer.text}")
    raise typer.Exit(0 if answer.is_success else 1)


@app.command("sign-event")
def sign_event(
    files: Annotated[list[Path], typer.Argument(help="Event files to re-sign in place.")],
    key: Annotated[
        str | None, typer.Option(help="Signing key (default: QSTASH_CURRENT_SIGNING_KEY).")
    ] = None,
    url: Annotated[
        str | None,
        typer.Option(help="Subject URL (default: https://{domainName}{rawPath} of each event)."),
    ] = None,
) -> None:
    """Re-sign the QStash-signed files in events/ (signatures expire after 5 minutes)."""
    from formcall_cli.events import sign_event_files

    key = key or os.environ.get("QSTASH_CURRENT_SIGNING_KEY")
    if not key:
        fail("give --key or set QSTASH_CURRENT_SIGNING_KEY")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        fail(f"no such file: {', '.join(missing)}")
    try:
        changed = sign_event_files(files, key=key, url=url)
    except (ValueError, KeyError) as exc:
        fail(f"not a Lambda HTTP event: {exc}")
    for path in changed:
        console.print(f"signed {path}")
    console.print(
        f"{len(changed)} of {len(files)} files carry a QStash signature; valid for 5 minutes"
    )


@app.command()
def status(
    form_id: Annotated[str | None, typer.Argument(help="Show one form's call history.")] = None,
    data_dir: DataDir = Path(".dev"),
    limit: int = 20,
) -> None:
    """The schedule, queued messages, DLQ entries and each form's call state."""
    from formcall_cli import status as report

    dsn = setting("DATABASE_URL", data_dir)
    qstash_url = setting("QSTASH_URL", data_dir)
    token = setting("QSTASH_TOKEN", data_dir)
    try:
        report.show(
            console, dsn=dsn, qstash_url=qstash_url, token=token, form_id=form_id, limit=limit
        )
    except report.StatusError as exc:
        fail(str(exc))


@app.command()
def doctor(
    stack_json: Annotated[
        str | None,
        typer.Option(
            "--stack-json",
            help="A deployed stack: the output of `aws cloudformation describe-stacks --stack-name NAME`, as a file or - for standard input.",
        ),
    ] = None,
    smoke: Annotated[
        bool,
        typer.Option(
            "--smoke",
            help="Only check that every function URL refuses an unauthenticated request (the deploy pipeline's smoke check).",
        ),
    ] = False,
    data_dir: DataDir = Path(".dev"),
) -> None:
    """Check a deployed or local stack: settings, schedule, URLs, signing keys, migrations."""
    from formcall_cli import doctor as checks

    try:
        target = checks.find_target(
            stack_json=checks.read_stack_json(stack_json, sys.stdin.read),
            data_dir=data_dir,
            read_secret=not smoke,
        )
    except checks.DoctorError as exc:
        fail(str(exc))
    findings = checks.run(target, smoke=smoke)
    checks.show(console, target, findings)
    raise typer.Exit(1 if checks.problems(findings) else 0)


@app.command()
def schedule(
    form_id: Annotated[str, typer.Argument(help="The form whose call message to sync.")],
    data_dir: DataDir = Path(".dev"),
) -> None:
    """Publish, move or cancel a form's one-time call message to match the form (as schedule-form does)."""
    import uuid

    from formcall import clients
    from formcall.errors import FormcallError
    from formcall.observability import logger
    from formcall.schedule import sync_form_schedule

    logger.setLevel("WARNING")  # the function's JSON logs are for CloudWatch, not this terminal

    try:
        uuid.UUID(form_id)
    except ValueError:
        fail(f"{form_id!r} is not a form id (a UUID)")
    for name in ("DATABASE_URL", "QSTASH_URL", "QSTASH_TOKEN", "CALL_FORM_URL"):
        if not os.environ.get("SUPABASE_URL") or name != "DATABASE_URL":
            os.environ[name] = setting(name, data_dir)
    for name in ("FAILURE_CALLBACK_URL", "CALL_WINDOW"):
        if not os.environ.get(name):
            from formcall_dev.stack import load_info

            info = load_info(data_dir)
            if info:
                os.environ[name] = info.env()[name]
    clients.reset()
    try:
        result = sync_form_schedule(
            form_id,
            store=clients.store(),
            publisher=clients.publisher(),
            call_form_url=os.environ["CALL_FORM_URL"],
            window=clients.window(),
        )
    except FormcallError as exc:
        fail(exc.public_message)
    if result.action == "gone":
        fail(f"no form {form_id}")
    when = f" for {result.not_before.isoformat()}" if result.not_before else ""
    console.print(f"{result.action}{when} (message {result.message_id or '-'})")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
