"""`formcall doctor`: check a deployed or local stack and print each problem with its fix.

What is checked, in order: every setting present and valid (the functions' own pydantic
models), the hourly QStash schedule (once, right cron, right destination), the function URLs
(each refuses an unauthenticated request; Vapi reports to call-events' own URL), the
signing keys (a QStash-style token verifies,
the keys are QStash's, call-form accepts a signed request) and the database (every migration
applied, or the RPC functions reachable on Supabase). `--smoke` runs only the URL checks:
the deploy pipeline's smoke check after each deploy.

Where the settings come from: a deployed stack's `describe-stacks` JSON (parameters and
outputs, and the formcall secret it names), else a running local stack (`formcall dev
--serve`), overridden by the environment; with FORMCALL_SECRET_ARN the secret's values win,
as they do in the functions. Read-only: nothing is created, sent to Vapi or written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.text import Text

from formcall import settings
from formcall.errors import ConfigurationError
from formcall.secrets import MAX_AGE, SECRET_ARN, SECRET_ARNS, SECRET_SETTINGS, parse_secret

# The checkout's supabase/migrations (cli/formcall_cli/doctor.py is three levels below it);
# an installed formcall_cli looks in the current folder instead.
MIGRATIONS_DIRS = (
    Path(__file__).resolve().parents[2] / "supabase" / "migrations",
    Path("supabase") / "migrations",
)
SCHEDULE_ID = "formcall-check-forms"
SCHEDULE_CRON = "0 * * * *"
TIMEOUT = 15.0

# Every concern on its own (each one's validators report whatever else is missing), then each
# function's own model (what a function requires beyond its concerns: setup's CHECK_FORMS_URL).
MODELS: tuple[type[BaseModel], ...] = (
    settings.ReceiverSettings,
    settings.PublisherSettings,
    settings.CronSettings,
    settings.DatabaseSettings,
    settings.VapiSettings,
    settings.CallFormUrlSettings,
    settings.WebhookSettings,
    settings.CallWindowSettings,
    settings.LineLedgerSettings,
    settings.CallCapsSettings,
    settings.FollowUpSettings,
    settings.ClaimLeaseSettings,
    settings.OutcomeTimeoutSettings,
    settings.FailureCallbackUrlSettings,
    *settings.FUNCTION_SETTINGS.values(),
)
# Every name doctor takes from the environment (beside the models' fields).
EXTRA_NAMES = (SECRET_ARN, SECRET_ARNS, MAX_AGE, "NEXT_PUBLIC_SUPABASE_URL", "SETUP_URL")

# template.yaml parameters and outputs -> the settings they become in the functions.
PARAMETERS = {
    "QStashUrl": "QSTASH_URL",
    "SupabaseUrl": "SUPABASE_URL",
    "VapiAssistantId": "VAPI_ASSISTANT_ID",
    "VapiPhoneNumberId": "VAPI_PHONE_NUMBER_ID",
    "VapiBaseUrl": "VAPI_BASE_URL",
    "CallWindow": "CALL_WINDOW",
    "VapiMaxConcurrency": "VAPI_MAX_CONCURRENCY",
    "VapiCallsPerMinute": "VAPI_CALLS_PER_MINUTE",
    "SecretMaxAgeSeconds": MAX_AGE,
}
OUTPUTS = {
    "CallFormUrl": "CALL_FORM_URL",
    "CheckFormsUrl": "CHECK_FORMS_URL",
    "FailureCallbackUrl": "FAILURE_CALLBACK_URL",
    "SetupUrl": "SETUP_URL",
    "CallEventsUrl": "CALL_EVENTS_URL",
    "SecretArn": SECRET_ARN,
    "SecretArns": SECRET_ARNS,
}

# Each function's URL, how to knock without credentials, and the outputs that hold it.
ENDPOINTS = {
    # name: (method, Function URL output, HTTP API route output)
    "setup": ("GET", "SetupUrl", "SetupApiUrl"),
    "call-form": ("POST", "CallFormUrl", "CallFormApiUrl"),
    "check-forms": ("GET", "CheckFormsUrl", "CheckFormsApiUrl"),
    "schedule-form": ("POST", "ScheduleFormUrl", "ScheduleFormApiUrl"),
    "failure-callback": ("POST", "FailureCallbackUrl", "FailureCallbackApiUrl"),
    "call-events": ("POST", "CallEventsUrl", "CallEventsApiUrl"),
}
WHY_401 = {
    "setup": "without ?secret= or the bearer CRON_SECRET",
    "call-form": "without an Upstash-Signature",
    "check-forms": "without the bearer CRON_SECRET",
    "schedule-form": "without a signed X-Formcall-Signature",
    "failure-callback": "without an Upstash-Signature",
    "call-events": "without Vapi's signature or X-Vapi-Secret",
}

# Where each setting is found, for the fixes.
WHERE = {
    "QSTASH_TOKEN": "Upstash console, QStash: the token",
    "QSTASH_CURRENT_SIGNING_KEY": "Upstash console, QStash, Signing keys: the current key",
    "QSTASH_NEXT_SIGNING_KEY": "Upstash console, QStash, Signing keys: the next key",
    "CRON_SECRET": "any random string of 16+ characters (the template generates one)",
    "WEBHOOK_SECRET": (
        "16+ random characters (the template generates one); the same value in "
        "Supabase Vault as formcall_webhook_secret"
    ),
    "VAPI_PRIVATE_KEY": "Vapi dashboard, API Keys: the private key",
    "VAPI_ASSISTANT_ID": "Vapi dashboard, Assistants: the id (stack parameter VapiAssistantId)",
    "VAPI_PHONE_NUMBER_ID": "Vapi dashboard, Phone Numbers: the id (parameter VapiPhoneNumberId)",
    "SUPABASE_URL": "Supabase, Project Settings, API: the URL (stack parameter SupabaseUrl)",
    "SUPABASE_SERVICE_ROLE_KEY": "Supabase, Project Settings, API Keys: the service_role key",
    "DATABASE_URL": "Supabase, Connect: a postgresql:// URL (optional)",
    "CALL_FORM_URL": "the stack output CallFormUrl",
    "CHECK_FORMS_URL": "the stack output CheckFormsUrl",
    "FAILURE_CALLBACK_URL": "the stack output FailureCallbackUrl",
    "CALL_WINDOW": "e.g. 09:00-20:00 or Mon-Fri 09:00-18:00 (stack parameter CallWindow)",
    "CALL_EVENTS_URL": "the stack output CallEventsUrl (where Vapi sends each call's reports)",
    "VAPI_WEBHOOK_SECRET": "any random string of 16+ characters; with VAPI_SERVER_CREDENTIAL_ID "
    "it is that HMAC credential's secret in Vapi's dashboard",
    "VAPI_SERVER_CREDENTIAL_ID": "Vapi dashboard, Credentials: the id of a Custom Credential of "
    "type HMAC whose secret is VAPI_WEBHOOK_SECRET (optional)",
    "FOLLOW_UP_ON": "comma-separated among no_answer, busy, voicemail, not_connected "
    "(default all four; empty: no follow-ups)",
    "MAX_CALLS_PER_FORM": "calls placed for one form, the first included (default 3)",
    "FOLLOW_UP_DELAY_SECONDS": "seconds after a call ended before its follow-up (default 86400)",
    "PATIENT_MAX_CALLS_PER_DAY": "calls to one patient per local calendar day (default 1, the "
    "FCC's healthcare exemption)",
    "PATIENT_MAX_CALLS_PER_WEEK": "calls to one patient in any 7 days (default 3; at least "
    "PATIENT_MAX_CALLS_PER_DAY)",
    "CALL_OUTCOME_TIMEOUT_SECONDS": "seconds before the sweep looks a call without a report up "
    "in Vapi (default 1800)",
    "MAX_CALL_ATTEMPTS": "attempts at one call before the form is marked failed (default 5)",
}


class DoctorError(Exception):
    """Doctor cannot start (no stack to check, unreadable stack JSON)."""


@dataclass(frozen=True)
class Finding:
    check: str
    ok: bool
    detail: str
    fix: str = ""


@dataclass
class Target:
    """The stack under examination: settings as the functions see them, and URLs to knock on."""

    source: str
    values: dict[str, str]
    urls: dict[str, str] = field(default_factory=dict)  # name (or "name (HTTP API)") -> URL
    secret_arn: str | None = None
    secret_error: Finding | None = None
    from_secret: set[str] = field(default_factory=set)


# --- Where the settings come from ----------------------------------------------------------


def find_target(*, stack_json: str | None, data_dir: Path, read_secret: bool = True) -> Target:
    """The stack to check: describe-stacks JSON, else the local stack, else the environment.

    The smoke check needs only URLs, so it reads no secret (the deploy role may not).
    """
    from formcall_cli.local_stack import load_info

    if stack_json is not None:
        target = target_from_stack(_parse_stack(stack_json))
    elif (info := load_info(data_dir)) is not None:
        target = Target(
            source=f"local stack in {data_dir}",
            values=info.env(),
            urls={
                "setup": info.setup_url,
                "call-form": info.call_form_url,
                "check-forms": info.check_forms_url,
                "schedule-form": info.schedule_form_url,
                "failure-callback": info.failure_callback_url,
                "call-events": info.call_events_url,
            },
        )
    else:
        target = Target(source="the environment", values={})
    names = {name for model in MODELS for name in model.model_fields} | set(EXTRA_NAMES)
    target.values.update({n: v for n, v in os.environ.items() if n in names})
    if not target.urls:
        target.urls = {
            name: target.values[setting]
            for name, setting in [
                ("setup", "SETUP_URL"),
                ("call-form", "CALL_FORM_URL"),
                ("check-forms", "CHECK_FORMS_URL"),
                ("call-events", "CALL_EVENTS_URL"),
            ]
            if target.values.get(setting)
        }
        if not target.urls:
            raise DoctorError(
                "nothing to check: give --stack-json (a deployed stack), start the "
                "local stack (`formcall dev --serve`) or export its settings"
            )
    if read_secret and (target.values.get(SECRET_ARN) or target.values.get(SECRET_ARNS)):
        _merge_secret(target)
    return target


def _parse_stack(text: str) -> dict:
    try:
        data = json.loads(text)
    except ValueError:
        raise DoctorError(
            "--stack-json is not JSON (use `aws cloudformation describe-stacks --stack-name NAME`)"
        ) from None
    if isinstance(data, dict) and isinstance(data.get("Stacks"), list) and data["Stacks"]:
        data = data["Stacks"][0]
    if isinstance(data, list):  # just the outputs (`--query Stacks[0].Outputs`)
        data = {"Outputs": data}
    if not isinstance(data, dict) or not isinstance(data.get("Outputs"), list):
        raise DoctorError("--stack-json has no stack outputs (is the stack deployed?)")
    return data


def target_from_stack(stack: dict) -> Target:
    """Settings and URLs from a stack's parameters and outputs (describe-stacks)."""
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}
    parameters = {
        p["ParameterKey"]: p.get("ParameterValue", "") for p in stack.get("Parameters", [])
    }
    values = {
        setting: parameters[name] for name, setting in PARAMETERS.items() if name in parameters
    }
    values.update({setting: outputs[name] for name, setting in OUTPUTS.items() if name in outputs})
    urls = {}
    for name, (_, function_url, api_url) in ENDPOINTS.items():
        if function_url in outputs:
            urls[name] = outputs[function_url]
        if api_url in outputs:
            urls[f"{name} (HTTP API)"] = outputs[api_url]
    return Target(
        source=f"stack {stack.get('StackName', '(from outputs)')}", values=values, urls=urls
    )


def _merge_secret(target: Target) -> None:
    """Read the formcall secrets (as the functions do); their values win over everything else."""
    import boto3

    arns = [
        a.strip()
        for a in [target.values.get(SECRET_ARN, ""), *target.values.get(SECRET_ARNS, "").split(",")]
        if a.strip()
    ]
    target.secret_arn = ",".join(arns)
    fix = ""
    merged: dict[str, str] = {}
    try:
        for arn in arns:
            region = arn.split(":")[3] if arn.startswith("arn:") else None
            client = boto3.client("secretsmanager", region_name=region or None)
            text = client.get_secret_value(SecretId=arn).get("SecretString")
            merged.update(parse_secret(json.loads(text or "")))
    except ConfigurationError as exc:
        problem = exc.public_message.removeprefix("configuration error: ")
        fix = _secret_fix(arn, "a JSON object of strings, one key per setting")
    except ValueError:
        problem = "the formcall secret is not JSON"
        fix = _secret_fix(arn, "a JSON object of strings, one key per setting")
    except Exception as exc:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code") or type(exc).__name__
        problem = f"the formcall secret cannot be read ({code})"
        fix = (
            "check the ARN (stack output SecretArns) and that your AWS credentials may call "
            "secretsmanager:GetSecretValue on it, in its region"
        )
    else:
        target.values.update(merged)
        target.from_secret = set(merged)
        return
    target.secret_error = Finding(SECRET_ARN, False, problem, fix)


def _secret_fix(arn: str, what: str) -> str:
    return (
        f"put {what} into the secret: aws secretsmanager put-secret-value --secret-id {arn} "
        "--secret-string file://formcall-secret.json"
    )


# --- The checks ----------------------------------------------------------------------------


def run(target: Target, *, smoke: bool = False) -> list[Finding]:
    if smoke:
        return check_urls(target)
    findings = check_settings(target)
    findings += check_schedule(target)
    findings += check_urls(target)
    findings += check_call_events_url(target)
    findings += check_signing_keys(target)
    findings += check_database(target)
    return findings


def problems(findings: Iterable[Finding]) -> list[Finding]:
    return [f for f in findings if not f.ok]


def _fix_for(target: Target, name: str) -> str:
    where = WHERE.get(name, "see README, Configuration")
    if name in SECRET_SETTINGS and target.secret_arn:
        return (
            f"set {name} in the formcall secret ({where}): aws secretsmanager "
            f"put-secret-value --secret-id {target.secret_arn} --secret-string file://..."
        )
    if target.source.startswith("stack ") and name not in SECRET_SETTINGS:
        return f"{where}; deploy again with --parameter-overrides"
    return f"export {name}=… ({where})"


def _validated(target: Target, model: type[BaseModel]) -> tuple[BaseModel | None, list[Finding]]:
    try:
        return model.model_validate(target.values), []
    except ValidationError as exc:
        names = sorted({str(e["loc"][0]) for e in exc.errors() if e["loc"]})
        return None, [Finding(n, False, "missing or malformed", _fix_for(target, n)) for n in names]
    except ConfigurationError as exc:
        return None, [
            Finding(
                n,
                False,
                exc.public_message.removeprefix("configuration error: "),
                _fix_for(target, n),
            )
            for n in exc.names or ["settings"]
        ]


def check_settings(target: Target) -> list[Finding]:
    if target.secret_error is not None:
        return [target.secret_error]
    found: dict[str, Finding] = {}
    for model in MODELS:
        _, bad = _validated(target, model)
        for finding in bad:
            found.setdefault(finding.check, finding)
    window = target.values.get("CALL_WINDOW")
    if window and "CALL_WINDOW" not in found:
        try:
            from formcall.window import parse_window

            parse_window(window)
        except ValueError as exc:
            found["CALL_WINDOW"] = Finding(
                "CALL_WINDOW", False, f"malformed: {exc}", _fix_for(target, "CALL_WINDOW")
            )
    if found:
        return list(found.values())
    where = " (secrets from the formcall secret)" if target.from_secret else ""
    return [Finding("settings", True, f"every setting present and valid{where}")]


def _config(target: Target, model: type[BaseModel]):
    config, _ = _validated(target, model)
    return config


def _qstash(target: Target):
    from qstash import QStash

    config = _config(target, settings.PublisherSettings)
    if config is None:
        return None
    return QStash(config.QSTASH_TOKEN.get_secret_value(), base_url=config.QSTASH_URL, retry=False)


def _setup_fix(target: Target) -> str:
    url = target.urls.get("setup", "<SetupUrl>")
    return (
        f'run setup once (it creates or overwrites the schedule): curl "{url}?secret=$CRON_SECRET"'
    )


def _same_url(a: str | None, b: str | None) -> bool:
    return (a or "").rstrip("/") == (b or "").rstrip("/")


def check_schedule(target: Target) -> list[Finding]:
    client = _qstash(target)
    destination = target.values.get("CHECK_FORMS_URL")
    if client is None or not destination:
        return [
            Finding(
                "schedule",
                False,
                "not checked: QSTASH_URL, QSTASH_TOKEN and CHECK_FORMS_URL are needed",
                "fix the settings above",
            )
        ]
    try:
        schedules = client.schedule.list()
    except Exception as exc:
        return [_qstash_unreachable(target, exc)]
    ours = [
        s
        for s in schedules
        if s.schedule_id == SCHEDULE_ID or _same_url(s.destination, destination)
    ]
    named = [s for s in ours if s.schedule_id == SCHEDULE_ID]
    findings = []
    if not named:
        findings.append(
            Finding(
                "schedule",
                False,
                f"no QStash schedule {SCHEDULE_ID}: nothing runs the hourly sweep",
                _setup_fix(target),
            )
        )
    extra = [s.schedule_id for s in ours if s.schedule_id != SCHEDULE_ID]
    if extra:
        findings.append(
            Finding(
                "schedule",
                False,
                f"{len(ours)} schedules call check-forms ({', '.join(extra)} "
                f"beside {SCHEDULE_ID}): the sweep runs more than once an hour",
                f'delete the extra ones: curl -X DELETE -H "Authorization: Bearer $QSTASH_TOKEN" '
                f"{target.values.get('QSTASH_URL', '')}/v2/schedules/<id>",
            )
        )
    for s in named:
        if s.cron != SCHEDULE_CRON:
            findings.append(
                Finding(
                    "schedule",
                    False,
                    f"{SCHEDULE_ID} runs on cron {s.cron!r}, not {SCHEDULE_CRON!r}",
                    _setup_fix(target),
                )
            )
        if not _same_url(s.destination, destination):
            findings.append(
                Finding(
                    "schedule",
                    False,
                    f"{SCHEDULE_ID} calls {s.destination}, not check-forms ({destination})",
                    _setup_fix(target),
                )
            )
        if getattr(s, "paused", False):
            findings.append(
                Finding(
                    "schedule",
                    False,
                    f"{SCHEDULE_ID} is paused",
                    f'resume it: curl -X PATCH -H "Authorization: Bearer '
                    f'$QSTASH_TOKEN" {target.values.get("QSTASH_URL", "")}'
                    f"/v2/schedules/{SCHEDULE_ID}/resume, or {_setup_fix(target)}",
                )
            )
    return findings or [
        Finding("schedule", True, f"{SCHEDULE_ID} exists once, {SCHEDULE_CRON} -> {destination}")
    ]


def _qstash_unreachable(target: Target, exc: Exception) -> Finding:
    if "401" in str(exc) or "403" in str(exc):
        return Finding(
            "QSTASH_TOKEN", False, "QStash refused the token", _fix_for(target, "QSTASH_TOKEN")
        )
    return Finding(
        "qstash",
        False,
        f"QStash at {target.values.get('QSTASH_URL')} not reachable ({type(exc).__name__})",
        "check QSTASH_URL and the network",
    )


def _knock(method: str, url: str, **kwargs) -> httpx.Response | str:
    try:
        return httpx.request(method, url, timeout=TIMEOUT, **kwargs)
    except httpx.HTTPError as exc:
        return type(exc).__name__


def _describe(answer: httpx.Response) -> str:
    try:
        body = answer.json()
    except ValueError:
        return f"HTTP {answer.status_code}"
    if isinstance(body, dict) and body.get("settings"):
        return f"HTTP {answer.status_code}: {body.get('error')} ({', '.join(body['settings'])})"
    if isinstance(body, dict) and body.get("error"):
        return f"HTTP {answer.status_code}: {body['error']}"
    return f"HTTP {answer.status_code}"


def check_urls(target: Target) -> list[Finding]:
    if not target.urls:
        return [
            Finding(
                "urls",
                False,
                "no function URL to check",
                "give --stack-json, or run the local stack",
            )
        ]
    findings = []
    for name, url in target.urls.items():
        method = ENDPOINTS[name.removesuffix(" (HTTP API)")][0]
        body = (
            {
                "content": b'{"formId": "00000000-0000-0000-0000-000000000000"}',
                "headers": {"content-type": "application/json"},
            }
            if method == "POST"
            else {}
        )
        answer = _knock(method, url, **body)
        why = WHY_401[name.removesuffix(" (HTTP API)")]
        if isinstance(answer, str):
            findings.append(
                Finding(
                    name,
                    False,
                    f"{url} not reachable ({answer})",
                    "is the stack deployed (or the local stack running)? "
                    "Check the URL in the stack outputs",
                )
            )
        elif answer.status_code == 401:
            findings.append(Finding(name, True, f"{method} {why} answers 401"))
        elif answer.status_code == 500:
            findings.append(
                Finding(
                    name,
                    False,
                    f"{method} {why} answers {_describe(answer)}",
                    "fix the settings it names (see the settings check); its "
                    "logs (CloudWatch, or .dev/logs) say more",
                )
            )
        else:
            findings.append(
                Finding(
                    name,
                    False,
                    f"{method} {why} answers {_describe(answer)}, not 401",
                    f"is {url} really {name}? Compare it with the "
                    "stack outputs; a 404/403 from AWS means a missing route or "
                    "URL permission: deploy again",
                )
            )
    return findings


def check_call_events_url(target: Target) -> list[Finding]:
    """Vapi reports each call to CALL_EVENTS_URL: it must be call-events' own URL."""
    setting, own = target.values.get("CALL_EVENTS_URL"), target.urls.get("call-events")
    if not setting or not own or target.source == "the environment":
        # Missing: the settings check says so. From the environment alone, the URL knocked on
        # is the setting itself: nothing to compare.
        return []
    if _same_url(setting, own):
        return [Finding("call-events URL", True, f"Vapi reports calls to {setting}")]
    return [
        Finding(
            "call-events URL",
            False,
            f"CALL_EVENTS_URL is {setting}, but call-events is at {own}: Vapi's reports "
            "would go elsewhere, and outcomes be learned only by the sweep's lookup",
            _fix_for(target, "CALL_EVENTS_URL"),
        )
    ]


def check_signing_keys(target: Target) -> list[Finding]:
    from formcall.signatures import InvalidSignature, sign, verify_signature

    config = _config(target, settings.ReceiverSettings)
    url = target.urls.get("call-form") or target.values.get("CALL_FORM_URL")
    if config is None or not url:
        return [
            Finding(
                "signing keys",
                False,
                "not checked: the signing keys and call-form's URL are needed",
                "fix the settings above",
            )
        ]
    keys = {
        "QSTASH_CURRENT_SIGNING_KEY": config.QSTASH_CURRENT_SIGNING_KEY.get_secret_value(),
        "QSTASH_NEXT_SIGNING_KEY": config.QSTASH_NEXT_SIGNING_KEY.get_secret_value(),
    }
    findings = []
    body = b'{"formId": "formcall-doctor"}'
    for name, key in keys.items():
        token = sign(key=key, url=url, body=body)
        try:
            verify_signature(
                token,
                body=body,
                urls=[url],
                keys=list(keys.values()),
                leeway=config.QSTASH_CLOCK_TOLERANCE,
            )
        except InvalidSignature as exc:
            findings.append(
                Finding(
                    name,
                    False,
                    f"a token signed with it does not verify ({exc})",
                    _fix_for(target, name),
                )
            )
    findings += _compare_with_qstash(target, keys)
    findings += _probe_call_form(target, url, keys["QSTASH_CURRENT_SIGNING_KEY"], body)
    return findings


def _compare_with_qstash(target: Target, keys: dict[str, str]) -> list[Finding]:
    client = _qstash(target)
    if client is None:
        return [
            Finding(
                "signing keys",
                False,
                "not compared with QStash: QSTASH_TOKEN needed",
                _fix_for(target, "QSTASH_TOKEN"),
            )
        ]
    try:
        actual = client.signing_key.get()
    except Exception as exc:
        return [_qstash_unreachable(target, exc)]
    findings = []
    for name, theirs in [
        ("QSTASH_CURRENT_SIGNING_KEY", actual.current),
        ("QSTASH_NEXT_SIGNING_KEY", actual.next),
    ]:
        if keys[name] != theirs:
            rotated = (
                " (QStash rotated its keys)"
                if keys.get("QSTASH_NEXT_SIGNING_KEY") == actual.current
                else ""
            )
            findings.append(
                Finding(
                    name,
                    False,
                    f"is not QStash's {name.split('_')[1].lower()} "
                    f"signing key{rotated}: the functions would refuse QStash's "
                    "deliveries once it signs with the key they lack",
                    _fix_for(target, name),
                )
            )
    return findings or [
        Finding(
            "signing keys",
            True,
            "both keys are QStash's (GET /v2/keys) and verify a QStash-style token",
        )
    ]


def _probe_call_form(target: Target, url: str, key: str, body: bytes) -> list[Finding]:
    """A signed request call-form must accept, with a body it refuses (400): nothing is called."""
    from formcall.signatures import sign

    answer = _knock(
        "POST",
        url,
        content=body,
        headers={
            "content-type": "application/json",
            "upstash-signature": sign(key=key, url=url, body=body),
        },
    )
    if isinstance(answer, str):
        return []  # reported by the URL checks
    if answer.status_code == 400:
        return [
            Finding(
                "call-form signature",
                True,
                "accepts a token signed with QSTASH_CURRENT_SIGNING_KEY",
            )
        ]
    if answer.status_code == 401:
        return [
            Finding(
                "call-form signature",
                False,
                "refuses a token signed with "
                "QSTASH_CURRENT_SIGNING_KEY: the function reads other keys than these",
                "make the keys in the formcall secret (or the function's environment) "
                "these ones; a deployed function re-reads the secret after "
                "FORMCALL_SECRET_MAX_AGE seconds",
            )
        ]
    return [
        Finding(
            "call-form signature",
            False,
            f"a signed request answers {_describe(answer)}, not 400",
            "see the function's logs",
        )
    ]


def check_database(target: Target) -> list[Finding]:
    config = _config(target, settings.DatabaseSettings)
    if config is None:
        return [
            Finding(
                "database",
                False,
                "not checked: DATABASE_URL or SUPABASE_URL and "
                "SUPABASE_SERVICE_ROLE_KEY are needed",
                "fix the settings above",
            )
        ]
    if config.DATABASE_URL is not None:
        return _check_migrations(target, config.DATABASE_URL.get_secret_value())
    return _check_supabase_rpc(
        config.SUPABASE_URL, config.SUPABASE_SERVICE_ROLE_KEY.get_secret_value()
    )


def migration_files() -> list[str]:
    """The repository's migrations (doctor runs from a checkout: the deploy job, an operator)."""
    for folder in MIGRATIONS_DIRS:
        if folder.is_dir():
            return sorted(p.name for p in folder.glob("*.sql"))
    return []


def _check_migrations(target: Target, dsn: str) -> list[Finding]:
    import psycopg

    fix = (
        "apply them: `supabase db push` (Supabase), or "
        "`python -c 'from formcall_dev.supabase.postgres import apply_migrations as a; "
        'a("$DATABASE_URL")\'` (plain Postgres)'
    )
    try:
        with psycopg.connect(dsn, connect_timeout=10) as conn:
            applied = _applied_migrations(conn)
    except psycopg.Error as exc:
        return [
            Finding(
                "database",
                False,
                f"cannot query the database "
                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
                "check DATABASE_URL and that the database accepts connections from here",
            )
        ]
    wanted = migration_files()
    if not wanted:
        return [
            Finding(
                "migrations",
                False,
                "not checked: no supabase/migrations folder here to compare with",
                "run `formcall doctor` from the repository's folder",
            )
        ]
    if applied is None:
        return [
            Finding(
                "migrations",
                False,
                "no migration record (public.formcall_migrations or "
                "supabase_migrations.schema_migrations)",
                fix,
            )
        ]
    missing = [
        name for name in wanted if name not in applied and name.split("_", 1)[0] not in applied
    ]
    if missing:
        return [Finding("migrations", False, f"not applied: {', '.join(missing)}", fix)]
    return [Finding("migrations", True, f"all {len(wanted)} applied")]


def _applied_migrations(conn) -> set[str] | None:
    for table, column in [
        ("public.formcall_migrations", "name"),
        ("supabase_migrations.schema_migrations", "version"),
    ]:
        if conn.execute("select to_regclass(%s)", (table,)).fetchone()[0] is not None:
            schema, name = table.split(".")
            rows = conn.execute(f'select "{column}" from "{schema}"."{name}"').fetchall()
            return {str(row[0]) for row in rows}
    return None


def _check_supabase_rpc(url: str, key: str) -> list[Finding]:
    from formcall.errors import DatabaseUnavailable
    from formcall.store import SupabaseRpc

    try:
        SupabaseRpc(url, key)("find_overdue_forms", {"p_limit": 0})
    except DatabaseUnavailable as exc:
        cause = str(exc.detail.get("cause", ""))
        if cause == "PGRST202":
            return [
                Finding(
                    "migrations",
                    False,
                    "find_overdue_forms is missing on Supabase",
                    "apply supabase/migrations: `supabase db push`",
                )
            ]
        return [
            Finding(
                "database",
                False,
                f"Supabase RPC failed ({cause})",
                "check SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY",
            )
        ]
    return [
        Finding("migrations", True, "Supabase answers find_overdue_forms (RPC functions in place)")
    ]


# --- Output --------------------------------------------------------------------------------


def show(console: Console, target: Target, findings: list[Finding]) -> None:
    console.print(Text(f"formcall doctor: {target.source}", style="bold"))
    for finding in findings:
        mark = Text("✓ ", style="green") if finding.ok else Text("✗ ", style="red")
        console.print(mark + Text(f"{finding.check}: {finding.detail}"), soft_wrap=True)
        if finding.fix:
            console.print(Text(f"    fix: {finding.fix}", style="yellow"), soft_wrap=True)
    bad = problems(findings)
    console.print(
        Text(
            f"{len(bad)} problem(s)" if bad else "all good",
            style="bold red" if bad else "bold green",
        )
    )


def read_stack_json(option: str | None, read_stdin: Callable[[], str]) -> str | None:
    """--stack-json FILE, or - for standard input."""
    if option is None:
        return None
    if option == "-":
        return read_stdin()
    path = Path(option)
    if not path.is_file():
        raise DoctorError(f"no such file: {option}")
    return path.read_text()
