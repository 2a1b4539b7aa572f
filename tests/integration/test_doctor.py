"""`formcall doctor` against the local stack (separate processes, real HTTP), as a user runs it."""

from __future__ import annotations

import json

import boto3
import botocore.handlers
import httpx
import psycopg
import pytest
from moto import mock_aws
from qstash import QStash
from typer.testing import CliRunner

from formcall.secrets import SECRET_SETTINGS
from formcall_cli import doctor
from formcall_cli.main import app as cli
from formcall_dev.stack import Stack

MISSING_SECRET = "arn:aws:secretsmanager:us-east-1:123456789012:secret:formcall-gone-AbCdEf"
SETTING_NAMES = {name for model in doctor.MODELS for name in model.model_fields} | set(
    doctor.EXTRA_NAMES
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("doctor-stack")
    stack = Stack(data_dir)
    info = stack.start()
    yield data_dir, info
    stack.stop()


@pytest.fixture
def clean_env(monkeypatch):
    """No formcall setting from the test session's environment leaks into doctor."""
    for name in SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def healthy(stack, clean_env):
    """The stack with its schedule in place (setup run), as after a deploy."""
    data_dir, info = stack
    answer = httpx.get(info.setup_url, params={"secret": info.credentials["CRON_SECRET"]})
    assert answer.status_code == 200, answer.text
    return data_dir, info


def run_doctor(*args: str, input: str | None = None):
    result = CliRunner().invoke(cli, ["doctor", *args], input=input, env={"COLUMNS": "400"})
    return result.exit_code, result.output


def outputs_of(info, **changes: str) -> str:
    """describe-stacks JSON pointing at the local stack, as the pipeline reads it from AWS."""
    urls = {
        "SetupUrl": info.setup_url,
        "CallFormUrl": info.call_form_url,
        "CheckFormsUrl": info.check_forms_url,
        "ScheduleFormUrl": info.schedule_form_url,
        "FailureCallbackUrl": info.failure_callback_url,
        **changes,
    }
    return json.dumps(
        {
            "Stacks": [
                {
                    "StackName": "formcall-local",
                    "Outputs": [{"OutputKey": k, "OutputValue": v} for k, v in urls.items()],
                }
            ]
        }
    )


def test_a_healthy_stack_is_all_green(healthy):
    data_dir, _ = healthy

    code, output = run_doctor("--data-dir", str(data_dir))

    assert code == 0, output
    assert "✗" not in output and "all good" in output
    for check in (
        "settings",
        "schedule",
        "setup",
        "call-form",
        "check-forms",
        "schedule-form",
        "failure-callback",
        "call-events",
        "call-events URL",
        "signing keys",
        "call-form signature",
        "migrations",
    ):
        assert f"✓ {check}:" in output, check
    assert "✓ call-events: POST without Vapi's signature or X-Vapi-Secret answers 401" in output


def test_the_new_call_settings_are_checked_with_their_fixes(healthy, tmp_path, clean_env):
    _, info = healthy
    for name, value in info.env().items():
        if name not in ("CALL_EVENTS_URL", "VAPI_WEBHOOK_SECRET"):
            clean_env.setenv(name, value)
    clean_env.setenv("SETUP_URL", info.setup_url)
    clean_env.setenv("PATIENT_MAX_CALLS_PER_DAY", "4")
    clean_env.setenv("PATIENT_MAX_CALLS_PER_WEEK", "2")
    clean_env.setenv("FOLLOW_UP_ON", "no_answer,reached")

    code, output = run_doctor("--data-dir", str(tmp_path))

    assert code == 1
    assert "✗ CALL_EVENTS_URL: missing or malformed" in output
    assert "fix: export CALL_EVENTS_URL=… (the stack output CallEventsUrl" in output
    assert "✗ VAPI_WEBHOOK_SECRET: missing or malformed" in output
    assert "✗ FOLLOW_UP_ON: FOLLOW_UP_ON: reached cannot be followed up" in output
    for secret in info.credentials.values():
        assert secret not in output


def test_a_call_events_url_vapi_cannot_report_to_is_reported(healthy, clean_env):
    data_dir, info = healthy
    clean_env.setenv("CALL_EVENTS_URL", info.functions_url + "/api/webhooks/elsewhere")

    code, output = run_doctor("--data-dir", str(data_dir))

    assert code == 1
    assert (
        f"✗ call-events URL: CALL_EVENTS_URL is {info.functions_url}/api/webhooks/elsewhere,"
        f" but call-events is at {info.call_events_url}"
    ) in output
    assert "✓ call-events: POST" in output  # the function itself is fine


def test_a_deleted_schedule_is_reported_with_the_fix(healthy):
    data_dir, info = healthy
    QStash(info.credentials["QSTASH_TOKEN"], base_url=info.qstash_url).schedule.delete(
        doctor.SCHEDULE_ID
    )

    code, output = run_doctor("--data-dir", str(data_dir))

    assert code == 1
    assert "✗ schedule: no QStash schedule formcall-check-forms" in output
    assert (
        f'fix: run setup once (it creates or overwrites the schedule): curl "{info.setup_url}'
        in output
    )
    assert "1 problem(s)" in output


def test_a_second_schedule_to_check_forms_is_reported(healthy):
    data_dir, info = healthy
    client = QStash(info.credentials["QSTASH_TOKEN"], base_url=info.qstash_url)
    client.schedule.create(
        destination=info.check_forms_url, cron="*/5 * * * *", schedule_id="by-hand"
    )
    try:
        code, output = run_doctor("--data-dir", str(data_dir))
    finally:
        client.schedule.delete("by-hand")

    assert code == 1
    assert "2 schedules call check-forms (by-hand beside formcall-check-forms)" in output
    assert "/v2/schedules/<id>" in output


def test_a_wrong_signing_key_is_reported_with_the_fix(healthy):
    data_dir, _ = healthy
    wrong = "sig_" + "w" * 40

    result = CliRunner().invoke(
        cli,
        ["doctor", "--data-dir", str(data_dir)],
        env={"COLUMNS": "400", "QSTASH_CURRENT_SIGNING_KEY": wrong},
    )

    assert result.exit_code == 1
    output = result.output
    assert "✗ QSTASH_CURRENT_SIGNING_KEY: is not QStash's current signing key" in output
    assert (
        "fix: export QSTASH_CURRENT_SIGNING_KEY=… (Upstash console, QStash, Signing keys" in output
    )
    assert "✗ call-form signature: refuses a token signed with QSTASH_CURRENT_SIGNING_KEY" in output
    assert wrong not in output


def test_a_missing_setting_is_reported_with_the_fix(healthy, tmp_path, clean_env):
    _, info = healthy
    # Settings from the environment only (no local stack to read them from), one missing.
    for name, value in info.env().items():
        if name != "VAPI_ASSISTANT_ID":
            clean_env.setenv(name, value)
    clean_env.setenv("SETUP_URL", info.setup_url)

    code, output = run_doctor("--data-dir", str(tmp_path))

    assert code == 1
    assert "formcall doctor: the environment" in output
    assert "✗ VAPI_ASSISTANT_ID: missing or malformed" in output
    assert "fix: export VAPI_ASSISTANT_ID=… (Vapi dashboard, Assistants" in output
    assert "✓ schedule:" in output and "✓ call-form:" in output  # the rest is still checked
    for secret in info.credentials.values():
        assert secret not in output


def test_a_missing_migration_is_reported_with_the_fix(healthy):
    data_dir, info = healthy
    newest = doctor.migration_files()[-1]
    with psycopg.connect(info.dsn, autocommit=True) as conn:
        conn.execute("delete from public.formcall_migrations where name = %s", (newest,))
        try:
            code, output = run_doctor("--data-dir", str(data_dir))
        finally:
            conn.execute("insert into public.formcall_migrations (name) values (%s)", (newest,))

    assert code == 1
    assert f"✗ migrations: not applied: {newest}" in output
    assert "supabase db push" in output


def test_settings_from_the_formcall_secret(healthy, tmp_path, clean_env):
    """A deployed stack: plain settings from the stack, secrets from Secrets Manager (moto)."""
    _, info = healthy
    env = info.env()
    with mock_aws():
        arn = boto3.client("secretsmanager", region_name="us-east-1").create_secret(
            Name="formcall-local/secret",
            # VAPI_WEBHOOK_SECRET is a secret too (formcall.secrets.SECRET_SETTINGS lacks it).
            SecretString=json.dumps(
                {n: env[n] for n in (*SECRET_SETTINGS, "VAPI_WEBHOOK_SECRET") if n in env}
            ),
        )["ARN"]
        stack = json.loads(outputs_of(info, SecretArn=arn, CallEventsUrl=info.call_events_url))
        stack["Stacks"][0]["Parameters"] = [
            {"ParameterKey": "QStashUrl", "ParameterValue": info.qstash_url},
            {"ParameterKey": "VapiAssistantId", "ParameterValue": env["VAPI_ASSISTANT_ID"]},
            {"ParameterKey": "VapiPhoneNumberId", "ParameterValue": env["VAPI_PHONE_NUMBER_ID"]},
            {"ParameterKey": "VapiBaseUrl", "ParameterValue": info.vapi_url},
            {"ParameterKey": "CallWindow", "ParameterValue": env["CALL_WINDOW"]},
        ]
        code, output = run_doctor(
            "--data-dir", str(tmp_path), "--stack-json", "-", input=json.dumps(stack)
        )

    assert code == 0, output
    assert "formcall doctor: stack formcall-local" in output
    assert (
        "✓ settings: every setting present and valid (secrets from the formcall secret)" in output
    )


def test_an_unreadable_secret_is_reported_with_the_fix(healthy, tmp_path, clean_env):
    _, info = healthy
    with mock_aws():
        code, output = run_doctor(
            "--data-dir",
            str(tmp_path),
            "--stack-json",
            "-",
            input=outputs_of(info, SecretArn=MISSING_SECRET),
        )

    assert code == 1
    assert (
        "✗ FORMCALL_SECRET_ARN: the formcall secret cannot be read (ResourceNotFoundException)"
        in output
    )
    assert "secretsmanager:GetSecretValue" in output


# --- The deploy pipeline's smoke check (--smoke), against the local function server ---------


def test_smoke_check_passes_on_the_local_functions(healthy, tmp_path):
    _, info = healthy
    reads: list[dict] = []
    hook = (
        "before-parameter-build.secrets-manager.GetSecretValue",
        lambda params, **_: reads.append(params),
    )
    botocore.handlers.BUILTIN_HANDLERS.append(hook)
    try:
        with mock_aws():  # the deploy role may not read the secret: the smoke check never does
            code, output = run_doctor(
                "--smoke",
                "--data-dir",
                str(tmp_path),
                "--stack-json",
                "-",
                input=outputs_of(info, SecretArn=MISSING_SECRET),
            )
    finally:
        botocore.handlers.BUILTIN_HANDLERS.remove(hook)

    assert code == 0, output
    assert reads == []
    assert "✓ setup: GET without ?secret= or the bearer CRON_SECRET answers 401" in output
    assert "✓ call-form: POST without an Upstash-Signature answers 401" in output
    checked = [line.split(":")[0] for line in output.splitlines() if line.startswith("✓ ")]
    assert checked == [
        "✓ setup",
        "✓ call-form",
        "✓ check-forms",
        "✓ schedule-form",
        "✓ failure-callback",
    ]  # the URLs only: no settings, schedule or database


def test_smoke_check_fails_when_a_url_does_not_refuse(healthy, tmp_path):
    _, info = healthy
    # A URL that is not setup at all (the local QStash's root answers, but not 401).
    code, output = run_doctor(
        "--smoke",
        "--data-dir",
        str(tmp_path),
        "--stack-json",
        "-",
        input=outputs_of(info, SetupUrl=f"{info.qstash_url}/"),
    )

    assert code == 1
    assert "✗ setup: GET without ?secret= or the bearer CRON_SECRET answers HTTP" in output
    assert "fix: is" in output


def test_stack_json_maps_parameters_and_outputs_to_settings():
    stack = {
        "StackName": "formcall-prod",
        "Parameters": [
            {"ParameterKey": "SupabaseUrl", "ParameterValue": "https://x.supabase.co"},
            {"ParameterKey": "VapiMaxConcurrency", "ParameterValue": "7"},
        ],
        "Outputs": [
            {"OutputKey": "CallFormUrl", "OutputValue": "https://a.lambda-url/"},
            {"OutputKey": "CallFormApiUrl", "OutputValue": "https://api/jobs"},
            {"OutputKey": "SecretArn", "OutputValue": "arn:secret"},
        ],
    }

    target = doctor.target_from_stack(stack)

    assert target.values == {
        "SUPABASE_URL": "https://x.supabase.co",
        "VAPI_MAX_CONCURRENCY": "7",
        "CALL_FORM_URL": "https://a.lambda-url/",
        "FORMCALL_SECRET_ARN": "arn:secret",
    }
    assert target.urls == {
        "call-form": "https://a.lambda-url/",
        "call-form (HTTP API)": "https://api/jobs",
    }


def test_nothing_to_check_is_a_usage_error(tmp_path, clean_env):
    code, output = run_doctor("--data-dir", str(tmp_path))

    assert code == 2 and "nothing to check" in output
