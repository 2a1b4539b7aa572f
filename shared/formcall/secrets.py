"""The formcall secrets: in AWS the secret settings are in Secrets Manager secrets (JSON objects).

The secrets are split by what they guard (SECRET_GROUPS), so each function's IAM policy reads
only the ones it uses: `FORMCALL_SECRET_ARNS` lists a function's (comma-separated);
`FORMCALL_SECRET_ARN` names a single one (the doctor, an all-in-one secret). Their keys are the
environment variable names (`QSTASH_TOKEN`, ...). Each is read through Powertools Parameters,
which keeps it for `FORMCALL_SECRET_MAX_AGE` seconds (default 300), so a rotated key is picked
up without a redeploy. Without either variable (locally, in tests) there is no secret and
nothing is imported: Powertools Parameters and boto3 cost ~220 ms of cold start.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from types import MappingProxyType

from formcall.errors import ConfigurationError

SECRET_ARN = "FORMCALL_SECRET_ARN"
SECRET_ARNS = "FORMCALL_SECRET_ARNS"
MAX_AGE = "FORMCALL_SECRET_MAX_AGE"
DEFAULT_MAX_AGE = 300

# The secrets (template.yaml's resource names) and the settings each holds; the rest are plain
# parameters. DATABASE_URL is optional. A function's policy names the secrets it reads.
SECRET_GROUPS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "QStashTokenSecret": ("QSTASH_TOKEN",),
    "SigningKeysSecret": ("QSTASH_CURRENT_SIGNING_KEY", "QSTASH_NEXT_SIGNING_KEY"),
    "CronSecret": ("CRON_SECRET",),
    "VapiKeySecret": ("VAPI_PRIVATE_KEY",),
    "VapiWebhookSecret": ("VAPI_WEBHOOK_SECRET",),
    "DatabaseSecret": ("SUPABASE_SERVICE_ROLE_KEY", "DATABASE_URL"),
    "WebhookSecret": ("WEBHOOK_SECRET",),
})
SECRET_SETTINGS = tuple(name for names in SECRET_GROUPS.values() for name in names)

NO_SECRET: Mapping[str, str] = MappingProxyType({})

# The last values Powertools returned and what they became: the same object while cached.
_last: tuple[tuple[object, ...], Mapping[str, str]] = ((), NO_SECRET)


def _arns() -> list[tuple[str, str]]:
    """(variable, ARN) for each secret this function reads, in order."""
    found = [(SECRET_ARN, os.environ.get(SECRET_ARN, "").strip())]
    found += [(SECRET_ARNS, arn.strip()) for arn in os.environ.get(SECRET_ARNS, "").split(",")]
    return [(variable, arn) for variable, arn in found if arn]


def secret_values() -> Mapping[str, str]:
    """The secrets' settings merged (none without an ARN); one object until one of them changes."""
    global _last
    arns = _arns()
    if not arns:
        return NO_SECRET
    max_age = _max_age()
    raws = tuple(_fetch(arn, max_age, variable) for variable, arn in arns)
    if len(raws) == len(_last[0]) and all(a is b for a, b in zip(raws, _last[0])):
        return _last[1]
    merged: dict[str, str] = {}
    for (variable, _), raw in zip(arns, raws):
        merged.update(parse_secret(raw, variable))
    values = MappingProxyType(merged)
    _last = (raws, values)
    return values


def forget() -> None:
    """Drop the cached secret (tests; a container otherwise keeps it for max age)."""
    global _last
    _last = ((), NO_SECRET)
    parameters = sys.modules.get("aws_lambda_powertools.utilities.parameters")
    if parameters is not None:  # never imported means nothing cached
        parameters.clear_caches()


def _max_age() -> int:
    text = os.environ.get(MAX_AGE, "").strip()
    if not text:
        return DEFAULT_MAX_AGE
    try:
        seconds = int(text)
    except ValueError:
        seconds = -1
    if not 0 <= seconds <= 86_400:
        raise ConfigurationError([MAX_AGE], f"{MAX_AGE} must be whole seconds from 0 to 86400")
    return seconds


def _fetch(arn: str, max_age: int, variable: str = SECRET_ARN) -> object:
    from aws_lambda_powertools.utilities import parameters

    try:
        return parameters.get_secret(arn, transform="json", max_age=max_age)
    except parameters.exceptions.TransformParameterError:
        # The message would quote the parser's position, never the value; say only what is wrong.
        raise ConfigurationError([variable],
                                 f"a secret named by {variable} is not JSON") from None
    except Exception as exc:  # not found, access denied, no region, throttled: all unreadable
        error = ConfigurationError([variable], f"a secret named by {variable} cannot be read")
        error.detail["cause"] = _error_code(exc)  # logged by web.py, never answered
        raise error from None


def parse_secret(raw: object, variable: str = SECRET_ARN) -> Mapping[str, str]:
    """The settings in a secret's JSON value; ConfigurationError unless an object of strings."""
    if not isinstance(raw, dict):
        raise ConfigurationError(
            [variable], f"a secret named by {variable} is not a JSON object of settings")
    values: dict[str, str] = {}
    for name, value in raw.items():
        if value is None:  # JSON null: not set, like a missing key
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigurationError([str(name)], f"{name} in the formcall secret must be a string")
        values[str(name)] = str(value)
    return MappingProxyType(values)


def _error_code(exc: BaseException) -> str:
    """The AWS error code behind a failed read (Powertools wraps the ClientError), else the type."""
    for inner in (exc.__cause__, exc.__context__, exc):
        code = getattr(inner, "response", {}).get("Error", {}).get("Code")
        if code:
            return str(code)
    return type(exc).__name__


# Settings a function cannot be given in its environment because CloudFormation would have to
# name the function inside itself (call-form's own URL): SSM parameters named by NAME_PARAMETER.
PARAMETER_SETTINGS = ("CALL_FORM_URL",)


def parameter_values() -> Mapping[str, str]:
    """The PARAMETER_SETTINGS read from SSM (an environment value of their own wins)."""
    names = {name: os.environ[f"{name}_PARAMETER"].strip() for name in PARAMETER_SETTINGS
             if not os.environ.get(name) and os.environ.get(f"{name}_PARAMETER", "").strip()}
    if not names:
        return NO_SECRET
    from aws_lambda_powertools.utilities import parameters

    values = {}
    for name, parameter in names.items():
        try:
            values[name] = str(parameters.get_parameter(parameter, max_age=_max_age()))
        except Exception as exc:  # not found, access denied, throttled: all unreadable
            error = ConfigurationError([f"{name}_PARAMETER"],
                                       f"the SSM parameter named by {name}_PARAMETER cannot be read")
            error.detail["cause"] = _error_code(exc)
            raise error from None
    return MappingProxyType(values)
