"""The SAM template and its build, checked with the real SAM CLI (validate --lint, build)."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from formcall import secrets as formcall_secrets
from tests.support.requirements import hashed_requirements

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "template.yaml"
LAYER_REQUIREMENTS = ROOT / "layers" / "shared" / "requirements.txt"
LOCK = ROOT / "uv.lock"
# How the layer's requirements are made from the lock (the Makefile's `make lock`).
EXPORT = [
    "uv",
    "export",
    "--frozen",
    "--no-dev",
    "--no-emit-project",
    "--format",
    "requirements-txt",
]
PACKAGE = ROOT / "shared" / "formcall"

FUNCTIONS = {
    # logical id: (code folder, HTTP API method, path, timeout)
    "CallFormFunction": ("call_form", "POST", "/api/jobs/call-form", 30),
    "CheckFormsFunction": ("check_forms", "ANY", "/api/cron/check-forms", 300),
    "SetupFunction": ("setup", "GET", "/api/setup-qstash", 30),
    "ScheduleFormFunction": ("schedule_form", "POST", "/api/webhooks/forms", 30),
    "FailureCallbackFunction": ("failure_callback", "POST", "/api/jobs/failed", 30),
    "CallEventsFunction": ("call_events", "POST", "/api/webhooks/vapi", 30),
}

# The secret settings: in the formcall secrets (Secrets Manager), never in function configuration.
SECRET_SETTINGS = set(formcall_secrets.SECRET_SETTINGS)
SECRET_GROUPS = dict(formcall_secrets.SECRET_GROUPS)
# Which secrets each function may read: exactly what it uses (issue 14, finding 7).
FUNCTION_SECRETS = {
    "SetupFunction": ["QStashTokenSecret", "CronSecret"],
    "CheckFormsFunction": [
        "DatabaseSecret",
        "QStashTokenSecret",
        "SigningKeysSecret",
        "CronSecret",
        "VapiKeySecret",
        "VapiWebhookSecret",
    ],
    "CallFormFunction": [
        "DatabaseSecret",
        "SigningKeysSecret",
        "QStashTokenSecret",
        "VapiKeySecret",
        "VapiWebhookSecret",
    ],
    "CallEventsFunction": ["DatabaseSecret", "VapiWebhookSecret", "QStashTokenSecret"],
    "ScheduleFormFunction": ["DatabaseSecret", "WebhookSecret", "QStashTokenSecret"],
    "FailureCallbackFunction": ["DatabaseSecret", "SigningKeysSecret"],
}
DATABASE = {"SUPABASE_URL"}
VAPI = {"VAPI_ASSISTANT_ID", "VAPI_PHONE_NUMBER_ID", "VAPI_BASE_URL"}
POLICY = {"CALL_WINDOW", "VAPI_MAX_CONCURRENCY", "VAPI_CALLS_PER_MINUTE", "FAILURE_CALLBACK_URL"}
# Who builds the Vapi client (places or looks up calls) names call-events in each call.
CALLER = {"VAPI_SERVER_CREDENTIAL_ID", "CALL_EVENTS_URL"}
CAPS = {"PATIENT_MAX_CALLS_PER_DAY", "PATIENT_MAX_CALLS_PER_WEEK"}
FOLLOW_UPS = {"FOLLOW_UP_ON", "MAX_CALLS_PER_FORM", "FOLLOW_UP_DELAY_SECONDS"}
LEDGER = {"VAPI_LINE_LEDGER", "VAPI_RESERVED_LINES", "VAPI_MAX_CALL_SECONDS"}
# Each function gets only the plain settings it reads, and the ARNs of its secrets.
ENVIRONMENT = {
    "CallFormFunction": DATABASE
    | VAPI
    | CALLER
    | {"QSTASH_URL", "CALL_FORM_URL", "CALL_FORM_URL_PARAMETER"}
    | POLICY
    | CAPS
    | LEDGER
    | {"CLAIM_LEASE_SECONDS"},
    "CheckFormsFunction": {"QSTASH_URL", "CHECK_FORMS_URL"}
    | DATABASE
    | VAPI
    | CALLER
    | {"CALL_FORM_URL"}
    | POLICY
    | FOLLOW_UPS
    | {"CALL_OUTCOME_TIMEOUT_SECONDS"}
    | LEDGER
    | {"CLAIM_LEASE_SECONDS"},
    "SetupFunction": {"QSTASH_URL", "CHECK_FORMS_URL"},
    "ScheduleFormFunction": {"QSTASH_URL"}
    | DATABASE
    | {"CALL_FORM_URL"}
    | POLICY
    | {"VAPI_LINE_LEDGER"},
    "FailureCallbackFunction": DATABASE | {"FAILURE_CALLBACK_URL"},
    "CallEventsFunction": DATABASE
    | {"QSTASH_URL", "VAPI_SERVER_CREDENTIAL_ID", "CALL_FORM_URL_PARAMETER"}
    | POLICY
    | FOLLOW_UPS
    | LEDGER,
}
ENVIRONMENT = {name: names | {"FORMCALL_SECRET_ARNS"} for name, names in ENVIRONMENT.items()}
GLOBAL_ENVIRONMENT = {
    "POWERTOOLS_SERVICE_NAME": "formcall",
    "POWERTOOLS_METRICS_NAMESPACE": "formcall",
    "POWERTOOLS_LOG_LEVEL": "INFO",
    "FORMCALL_SECRET_MAX_AGE": {"Ref": "SecretMaxAgeSeconds"},
}
# Where each function's own URL is the edge's (UseEdge) or else absent/its Function URL.
EDGE_PATHS = {
    "CALL_FORM_URL": "/api/jobs/call-form",
    "CHECK_FORMS_URL": "/api/cron/check-forms",
    "FAILURE_CALLBACK_URL": "/api/jobs/failed",
}
CONCURRENCY = {
    # function: (parameter, condition, default)
    "CallFormFunction": ("CallFormReservedConcurrency", "ReserveCallForm", 20),
    "FailureCallbackFunction": ("FailureCallbackReservedConcurrency", "ReserveFailureCallback", 5),
    "CheckFormsFunction": ("CheckFormsMaxConcurrency", "CapCheckForms", 2),
    "ScheduleFormFunction": ("ScheduleFormMaxConcurrency", "CapScheduleForm", 10),
    "SetupFunction": ("SetupMaxConcurrency", "CapSetup", 1),
    "CallEventsFunction": ("CallEventsReservedConcurrency", "ReserveCallEvents", 20),
}
# The metric names formcall emits (its use-case modules); alarms and the dashboard use only these.
METRICS = {
    "CallsPlaced",
    "CallsSkipped",
    "CallsFailed",
    "CallsRetried",
    "CallsOutcomeUnknown",
    "CallsDeferred",
    "FormsFound",
    "FormsEnqueued",
    "EnqueueFailed",
    "DeliveryFailed",
    "OverdueOverAnHour",
    "SweepSucceeded",
    "FormsScheduled",
    "FormsCancelled",
    "CallsCapped",
    "CallsEnded",
    "CallsReached",
    "CallsNotReached",
    "CallEventsIgnored",
    "PatientsOptedOut",
    "FollowUpsScheduled",
    "CallsWaitingForLine",
    "LineWakeups",
}
# call-form's own URL: one SSM parameter, read by call-form and call-events only.
CALL_FORM_URL_READ = {
    "Statement": [
        {
            "Effect": "Allow",
            "Action": "ssm:GetParameter",
            "Resource": {
                "Fn::Sub": "arn:${AWS::Partition}:ssm:${AWS::Region}:${AWS::AccountId}"
                ":parameter/${AWS::StackName}/call-form-url"
            },
        }
    ]
}
# Deliberately not in the layer: the python3.12 Lambda runtime ships boto3 and botocore.
FROM_RUNTIME = {"boto3"}

EM_AARCH64 = 183  # ELF e_machine


def sam_cli() -> str:
    sam = os.environ.get("SAM_CLI") or str(ROOT / ".venv-sam" / "bin" / "sam")
    if not (Path(sam).is_file() and os.access(sam, os.X_OK)):
        pytest.fail(
            f"SAM CLI not found at {sam}: `make test` installs it into .venv-sam "
            f"(layers/sam-requirements.txt), or point SAM_CLI at a sam executable"
        )
    return sam


def sam_env() -> dict[str, str]:
    """Telemetry off, and a python3.12 first on PATH (SAM's pip builder needs the runtime's)."""
    here = Path(sys.executable).parent
    python312 = here if (here / "python3.12").exists() else None
    if python312 is None and (found := shutil.which("python3.12")):
        python312 = Path(found).parent
    if python312 is None:
        pytest.fail("sam build needs a python3.12 on PATH (the layers' runtime); none found")
    return {
        **os.environ,
        "PATH": f"{python312}{os.pathsep}{os.environ.get('PATH', '')}",
        "SAM_CLI_TELEMETRY": "0",
    }


def run_sam(*args: str, cwd: Path = ROOT, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sam_cli(), *args],
        cwd=cwd,
        check=False,
        env=sam_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def parse_cfn_yaml(path: Path) -> dict:
    """Parse a template the way SAM does (short tags become `Fn::` maps), with SAM's own Python."""
    sam = Path(sam_cli())
    with sam.open("rb") as file:
        first = file.readline(200)
    if not first.startswith(b"#!"):
        pytest.fail(f"{sam} has no #! line naming its Python; cannot load SAM's YAML parser")
    python = first[2:].decode().strip().split()[0]
    code = (
        "import json, sys; from samcli.yamlhelper import yaml_parse; "
        "print(json.dumps(yaml_parse(open(sys.argv[1]).read())))"
    )
    done = subprocess.run(
        [python, "-c", code, str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def elf_machine(path: Path) -> int | None:
    with path.open("rb") as file:
        head = file.read(20)
    if head[:4] != b"\x7fELF":
        return None
    return int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")


@pytest.fixture(scope="module")
def template() -> dict:
    return parse_cfn_yaml(TEMPLATE)


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory) -> Path:
    """`sam build` as samconfig.toml sets it up, writing only under a temporary folder.

    Run from that folder: a cached build keeps its dependencies in ./.aws-sam/deps.
    """
    scratch = tmp_path_factory.mktemp("sam")
    started = time.monotonic()
    done = run_sam(
        "build",
        "--template",
        str(TEMPLATE),
        "--build-dir",
        str(scratch / "build"),
        "--cache-dir",
        str(scratch / "cache"),
        cwd=scratch,
    )
    seconds = time.monotonic() - started
    assert done.returncode == 0, f"sam build failed:\n{done.stdout}\n{done.stderr}"
    assert "Build Succeeded" in done.stdout
    print(f"sam build took {seconds:.1f} s")
    return scratch / "build"


# --- The layer's pins (no SAM needed) --------------------------------------------------------


def locked_packages() -> dict[str, dict]:
    """uv.lock's packages by name."""
    return {p["name"]: p for p in tomllib.loads(LOCK.read_text())["package"]}


def runtime_closure(packages: dict[str, dict], roots: list[dict]) -> set[str]:
    """The packages `roots` (lock entries: name, extras) pull in, under any marker."""
    found: set[str] = set()
    pending = [(need["name"], tuple(need.get("extra", ()))) for need in roots]
    while pending:
        name, extras = pending.pop()
        package = packages[name]
        needs = [*package.get("dependencies", [])]
        for extra in extras:
            needs += package.get("optional-dependencies", {})[extra]
        if name in found and not extras:
            continue
        found.add(name)
        pending += [(need["name"], tuple(need.get("extra", ()))) for need in needs]
    return found


def export_command() -> list[str]:
    """The command named in the layer file's header, which must be the lock's hashed export."""
    header = LAYER_REQUIREMENTS.read_text().splitlines()[:2]
    assert header[0] == "# This file was autogenerated by uv via the following command:"
    command = shlex.split(header[1].removeprefix("#"))
    assert command[: len(EXPORT)] == EXPORT, command
    return command


def test_layer_requirements_are_the_locks_hashed_export():
    command = export_command()
    if "--output-file" in command:
        at = command.index("--output-file")
        del command[at : at + 2]
    uv = Path(sys.executable).with_name("uv")
    done = subprocess.run(
        [str(uv if uv.exists() else "uv"), *command[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "UV_PYTHON_DOWNLOADS": "never"},
    )

    assert done.returncode == 0, done.stderr

    def body(text: str) -> list[str]:
        return [line for line in text.splitlines() if not line.startswith("#")]

    assert body(LAYER_REQUIREMENTS.read_text()) == body(done.stdout), (
        "layers/shared/requirements.txt is out of date with uv.lock: run `make lock`"
    )


def test_layer_pins_and_hashes_every_runtime_package_but_the_runtimes_own():
    packages = locked_packages()
    (project,) = [p for p in packages.values() if p.get("source") == {"editable": "."}]
    direct = project["dependencies"]
    shipped = runtime_closure(packages, [d for d in direct if d["name"] not in FROM_RUNTIME])
    left_out = runtime_closure(packages, direct) - shipped
    command = export_command()
    not_emitted = {command[i + 1] for i, arg in enumerate(command) if arg == "--no-emit-package"}
    layer = hashed_requirements(LAYER_REQUIREMENTS.read_text())

    # Left out: exactly boto3 and what nothing shipped needs, so no shipped package misses one.
    assert not_emitted == left_out and FROM_RUNTIME <= left_out and "botocore" in left_out
    assert set(layer) == shipped
    for name, (version, hashes) in layer.items():
        locked = packages[name]
        assert version == locked["version"], name
        files = [*locked.get("wheels", []), *([locked["sdist"]] if "sdist" in locked else [])]
        assert sorted(hashes) == sorted(f["hash"] for f in files), name
    # pyproject.toml's pins are the lock's (a lock left stale after editing a pin fails here).
    for requirement in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "dependencies"
    ]:
        name, version = re.sub(r"\[.*\]", "", requirement).split("==")
        assert packages[re.sub(r"[-_.]+", "-", name).lower()]["version"] == version, name


def test_layer_source_links_to_the_package():
    link = ROOT / "layers" / "shared" / "formcall"

    assert link.is_symlink()
    assert link.resolve() == PACKAGE.resolve()


# --- sam validate --lint ----------------------------------------------------------------------


@pytest.mark.sam
def test_template_lints_clean():
    done = run_sam("validate", "--lint", "--template", str(TEMPLATE), timeout=120)

    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "is a valid SAM Template" in done.stdout
    assert "[[" not in done.stdout  # cfn-lint findings print as [[rule: ...]]


# --- The template's contracts ---------------------------------------------------------------


@pytest.mark.sam
def test_functions_run_python312_on_arm64_with_the_layer(template):
    globals_ = template["Globals"]["Function"]

    assert globals_["Runtime"] == "python3.12"
    assert globals_["Architectures"] == ["arm64"]
    assert globals_["Handler"] == "app.handler"
    assert globals_["Layers"] == [{"Ref": "SharedLayer"}]
    assert globals_["Environment"]["Variables"] == GLOBAL_ENVIRONMENT
    for name in FUNCTIONS:
        props = template["Resources"][name]["Properties"]
        assert "Runtime" not in props and "Architectures" not in props and "Layers" not in props


@pytest.mark.sam
def test_layer_is_built_for_python312_arm64(template):
    layer = template["Resources"]["SharedLayer"]

    assert layer["Type"] == "AWS::Serverless::LayerVersion"
    assert layer["Properties"]["CompatibleRuntimes"] == ["python3.12"]
    assert layer["Properties"]["CompatibleArchitectures"] == ["arm64"]
    assert layer["Metadata"] == {"BuildMethod": "python3.12", "BuildArchitecture": "arm64"}
    assert (ROOT / layer["Properties"]["ContentUri"]) == LAYER_REQUIREMENTS.parent


@pytest.mark.sam
@pytest.mark.parametrize("name", FUNCTIONS)
def test_function_has_public_url_route_and_timeout(template, name):
    folder, method, path, timeout = FUNCTIONS[name]
    props = template["Resources"][name]["Properties"]

    assert props["CodeUri"].rstrip("/") == f"functions/{folder}"
    assert props["FunctionUrlConfig"] == {"AuthType": "NONE"}
    assert props.get("Timeout", template["Globals"]["Function"]["Timeout"]) == timeout
    (event,) = props["Events"].values()
    assert event["Type"] == "HttpApi"
    assert (event["Properties"]["Method"], event["Properties"]["Path"]) == (method, path)


@pytest.mark.sam
@pytest.mark.parametrize("name", FUNCTIONS)
def test_function_gets_only_the_plain_settings_it_reads(template, name):
    variables = template["Resources"][name]["Properties"]["Environment"]["Variables"]

    assert set(variables) == ENVIRONMENT[name]
    # A function reading its own URL would be a circular dependency.
    assert f"{name}Url" not in json.dumps(variables)


# Settings every deployment leaves at their defaults: no function is given them.
DEFAULT_ONLY = {"MAX_CALL_ATTEMPTS", "QSTASH_CLOCK_TOLERANCE", "VAPI_TIMEOUT_SECONDS"}


@pytest.mark.sam
@pytest.mark.parametrize("name", FUNCTIONS)
def test_a_functions_settings_model_is_what_the_template_gives_it(template, name):
    """Every variable and secret key a function is given is a field of its model, and back."""
    from formcall.settings import FUNCTION_SETTINGS

    model = FUNCTION_SETTINGS[FUNCTIONS[name][0]]
    variables = set(template["Resources"][name]["Properties"]["Environment"]["Variables"])
    given = {v.removesuffix("_PARAMETER") for v in variables - {"FORMCALL_SECRET_ARNS"}}
    given |= {key for secret in FUNCTION_SECRETS[name] for key in SECRET_GROUPS[secret]}
    fields = set(model.model_fields)
    required = {n for n, field in model.model_fields.items() if field.is_required()}

    assert given <= fields, f"{name} is given settings its model ignores"
    assert required <= given, f"{name} is not given settings its model requires"
    assert fields - given <= DEFAULT_ONLY, f"{name}'s model reads settings it is not given"


@pytest.mark.sam
def test_functions_learn_each_others_urls(template):
    resources = template["Resources"]

    def env(name: str) -> dict:
        return resources[name]["Properties"]["Environment"]["Variables"]

    def url(function: str, setting: str) -> dict:
        # The edge's URL when there is an edge, else the other function's own URL.
        edge = {"Fn::Sub": f"https://${{EdgeDomainName}}{EDGE_PATHS[setting]}"}
        return {"Fn::If": ["UseEdge", edge, {"Fn::GetAtt": [f"{function}Url", "FunctionUrl"]}]}

    assert env("SetupFunction")["CHECK_FORMS_URL"] == url("CheckFormsFunction", "CHECK_FORMS_URL")
    for name in ("CheckFormsFunction", "ScheduleFormFunction"):
        assert env(name)["CALL_FORM_URL"] == url("CallFormFunction", "CALL_FORM_URL")
    for name in ("CallFormFunction", "CheckFormsFunction"):
        assert env(name)["CALL_EVENTS_URL"] == {
            "Fn::GetAtt": ["CallEventsFunctionUrl", "FunctionUrl"]
        }
    # call-form's own URL, for itself and for call-events, through an SSM parameter.
    parameter = resources["CallFormUrlParameter"]["Properties"]
    assert parameter["Value"] == url("CallFormFunction", "CALL_FORM_URL")
    for name in ("CallFormFunction", "CallEventsFunction"):
        assert env(name)["CALL_FORM_URL_PARAMETER"] == parameter["Name"]
        assert CALL_FORM_URL_READ in resources[name]["Properties"]["Policies"]
    for name in ("CallFormFunction", "CheckFormsFunction", "ScheduleFormFunction"):
        assert env(name)["FAILURE_CALLBACK_URL"] == url(
            "FailureCallbackFunction", "FAILURE_CALLBACK_URL"
        )


@pytest.mark.sam
@pytest.mark.parametrize(
    "name, setting",
    [
        ("CallFormFunction", "CALL_FORM_URL"),
        ("CheckFormsFunction", "CHECK_FORMS_URL"),
        ("FailureCallbackFunction", "FAILURE_CALLBACK_URL"),
    ],
)
def test_behind_the_edge_a_function_verifies_the_edge_url_as_subject(template, name, setting):
    # QStash signs the URL it was given: behind CloudFront that is the edge's, so the function
    # accepts it as the subject (its settings' public_url); without an edge it needs none.
    variables = template["Resources"][name]["Properties"]["Environment"]["Variables"]
    assert variables[setting] == {
        "Fn::If": [
            "UseEdge",
            {"Fn::Sub": f"https://${{EdgeDomainName}}{EDGE_PATHS[setting]}"},
            {"Ref": "AWS::NoValue"},
        ]
    }


@pytest.mark.sam
def test_no_secret_is_a_parameter_or_in_any_function_configuration(template):
    parameters = template["Parameters"]
    configuration = json.dumps(
        {
            "Globals": template["Globals"],
            **{name: template["Resources"][name] for name in FUNCTIONS},
        }
    )

    assert not [name for name, p in parameters.items() if p.get("NoEcho")]
    assert not {"QStashToken", "CronSecret", "VapiPrivateKey", "DatabaseUrl"} & set(parameters)
    assert not [name for name in SECRET_SETTINGS if name in configuration]


@pytest.mark.sam
def test_plain_settings_come_from_parameters(template):
    parameters = template["Parameters"]
    used = {
        ref["Ref"]
        for variables in [
            template["Globals"]["Function"]["Environment"]["Variables"],
            *(
                template["Resources"][n]["Properties"]["Environment"]["Variables"]
                for n in FUNCTIONS
            ),
        ]
        for ref in variables.values()
        if isinstance(ref, dict) and "Ref" in ref
    }

    limits = {p for p, _, _ in CONCURRENCY.values()} | {"CallEventsReservedConcurrency"}
    edge = {"EdgeDomainName", "EdgeCertificateArn", "EdgeRateLimit"}
    assert used | {"AlarmTopicArn", "LogRetentionDays"} | limits | edge == set(parameters)
    assert parameters["QStashUrl"]["Default"] == "https://qstash.upstash.io"
    assert parameters["VapiBaseUrl"]["Default"] == "https://api.vapi.ai"
    from formcall.settings import CallWindowSettings, FlowControlSettings

    defaults = {
        name: field.default
        for model in (CallWindowSettings, FlowControlSettings)
        for name, field in model.model_fields.items()
    }
    assert parameters["CallWindow"]["Default"] == defaults["CALL_WINDOW"]
    assert (
        parameters["VapiMaxConcurrency"]["Default"],
        parameters["VapiCallsPerMinute"]["Default"],
    ) == (defaults["VAPI_MAX_CONCURRENCY"], defaults["VAPI_CALLS_PER_MINUTE"])
    assert parameters["SecretMaxAgeSeconds"]["Default"] == formcall_secrets.DEFAULT_MAX_AGE
    assert parameters["AlarmTopicArn"]["Default"] == ""


@pytest.mark.sam
def test_each_secret_holds_one_concern_and_every_setting_has_one(template):
    resources = template["Resources"]
    for name, keys in SECRET_GROUPS.items():
        secret = resources[name]
        assert secret["Type"] == "AWS::SecretsManager::Secret", name
        assert secret["DeletionPolicy"] == secret["UpdateReplacePolicy"] == "Retain"
        props = secret["Properties"]
        if "GenerateSecretString" in props:  # formcall's own shared secrets: generated
            generated = props["GenerateSecretString"]
            assert json.loads(generated["SecretStringTemplate"]) == {}
            assert [generated["GenerateStringKey"]] == list(keys)
            assert generated["PasswordLength"] >= 16 and generated["ExcludePunctuation"] is True
        else:  # the providers' keys: empty for the operator to fill
            assert json.loads(props["SecretString"]) == dict.fromkeys(keys, "")
    generated = {
        name for name in SECRET_GROUPS if "GenerateSecretString" in resources[name]["Properties"]
    }
    assert generated == {"CronSecret", "WebhookSecret", "VapiWebhookSecret"}
    assert sorted(k for keys in SECRET_GROUPS.values() for k in keys) == sorted(SECRET_SETTINGS)
    assert template["Outputs"]["SecretArns"]["Value"] == {
        "Fn::Join": [",", [{"Ref": name} for name in SECRET_GROUPS]]
    }


@pytest.mark.sam
@pytest.mark.parametrize("name", FUNCTIONS)
def test_each_function_is_given_the_arns_of_exactly_its_secrets(template, name):
    props = template["Resources"][name]["Properties"]
    assert props["Environment"]["Variables"]["FORMCALL_SECRET_ARNS"] == {
        "Fn::Join": [",", [{"Ref": secret} for secret in FUNCTION_SECRETS[name]]]
    }
    assert props["Policies"] == [
        {"AWSSecretsManagerGetSecretValuePolicy": {"SecretArn": {"Ref": secret}}}
        for secret in FUNCTION_SECRETS[name]
    ] + ([CALL_FORM_URL_READ] if name in ("CallFormFunction", "CallEventsFunction") else [])


@pytest.mark.sam
@pytest.mark.parametrize("name", FUNCTIONS)
def test_each_function_has_its_concurrency_bounded_and_its_logs_kept(template, name):
    parameter, condition, default = CONCURRENCY[name]
    props = template["Resources"][name]["Properties"]
    parameters = template["Parameters"]

    assert props["ReservedConcurrentExecutions"] == {
        "Fn::If": [condition, {"Ref": parameter}, {"Ref": "AWS::NoValue"}]
    }
    assert parameters[parameter]["Default"] == default and parameters[parameter]["MinValue"] == -1
    assert template["Conditions"][condition] == {
        "Fn::Not": [{"Fn::Equals": [{"Ref": parameter}, -1]}]
    }
    group = props["LoggingConfig"]["LogGroup"]["Ref"]
    assert template["Resources"][group] == {
        "Type": "AWS::Logs::LogGroup",
        "Properties": {"RetentionInDays": {"Ref": "LogRetentionDays"}},
    }
    assert parameters["LogRetentionDays"]["Default"] == 90
    assert parameters["CallEventsReservedConcurrency"]["Default"] == 20


@pytest.mark.sam
def test_edge_protection_is_opt_in_cloudfront_with_a_waf_rate_rule(template):
    resources, conditions = template["Resources"], template["Conditions"]
    acl, distribution = resources["EdgeWebAcl"], resources["EdgeDistribution"]

    assert template["Parameters"]["EdgeDomainName"]["Default"] == ""
    assert conditions["UseEdge"] == {
        "Fn::And": [
            {"Fn::Not": [{"Fn::Equals": [{"Ref": "EdgeDomainName"}, ""]}]},
            {"Fn::Not": [{"Fn::Equals": [{"Ref": "EdgeCertificateArn"}, ""]}]},
        ]
    }
    assert acl["Condition"] == distribution["Condition"] == "UseEdge"
    assert acl["Properties"]["Scope"] == "CLOUDFRONT"
    (rule,) = acl["Properties"]["Rules"]
    assert rule["Action"] == {"Block": {}}
    assert rule["Statement"]["RateBasedStatement"] == {
        "Limit": {"Ref": "EdgeRateLimit"},
        "EvaluationWindowSec": 300,
        "AggregateKeyType": "IP",
    }
    config = distribution["Properties"]["DistributionConfig"]
    assert config["WebACLId"] == {"Fn::GetAtt": ["EdgeWebAcl", "Arn"]}
    assert config["Aliases"] == [{"Ref": "EdgeDomainName"}]
    routes = {b["PathPattern"]: b["TargetOriginId"] for b in config["CacheBehaviors"]}
    assert routes == {
        path: name
        for name, path in [
            ("call-form", "/api/jobs/call-form"),
            ("check-forms", "/api/cron/check-forms"),
            ("setup", "/api/setup-qstash"),
            ("schedule-form", "/api/webhooks/forms"),
            ("failure-callback", "/api/jobs/failed"),
        ]
    }
    for behavior in [config["DefaultCacheBehavior"], *config["CacheBehaviors"]]:
        # Nothing cached, every header but Host forwarded (signatures reach the function).
        assert behavior["CachePolicyId"] == "4135ea2d-6df8-44a3-9df3-4b5a84be39ad"
        assert behavior["OriginRequestPolicyId"] == "b689b0a8-53d0-40ab-baf2-68738e2966ac"
        assert "POST" in behavior["AllowedMethods"]


def sam_translate(template_path: Path) -> dict:
    """The template as CloudFormation sees it after the SAM transform, translated offline.

    Code locations become S3 URIs as `sam package` makes them; the managed-policy map that SAM
    would fetch from IAM is given (only AWSLambdaBasicExecutionRole is used).
    """
    sam = Path(sam_cli())
    python = sam.read_bytes().split(b"\n", 1)[0][2:].decode().strip().split()[0]
    code = """
import json, sys
from samcli.yamlhelper import yaml_parse
from samtranslator.translator.transform import transform

class Policies:
    def load(self):
        return {"AWSLambdaBasicExecutionRole":
                "arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole"}

template = yaml_parse(open(sys.argv[1]).read())
for name, resource in template["Resources"].items():
    for key in ("CodeUri", "ContentUri"):
        if key in resource.get("Properties", {}):
            resource["Properties"][key] = f"s3://artifacts/{name}.zip"
print(json.dumps(transform(template, {}, Policies())))
"""
    done = subprocess.run(
        [python, "-c", code, str(template_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "AWS_DEFAULT_REGION": "us-east-1"},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.sam
def test_each_function_may_read_only_its_own_secrets_after_the_transform():
    translated = sam_translate(TEMPLATE)["Resources"]

    for name in FUNCTIONS:
        role = translated[f"{name}Role"]["Properties"]
        assert role["ManagedPolicyArns"] == [
            "arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole"
        ]  # its logs
        statements = [
            statement
            for policy in role["Policies"]
            for statement in policy["PolicyDocument"]["Statement"]
        ]
        assert statements == [
            {
                "Action": ["secretsmanager:GetSecretValue"],
                "Effect": "Allow",
                "Resource": {"Fn::Sub": ["${secretArn}", {"secretArn": {"Ref": secret}}]},
            }
            for secret in FUNCTION_SECRETS[name]
        ] + (
            CALL_FORM_URL_READ["Statement"]
            if name in ("CallFormFunction", "CallEventsFunction")
            else []
        ), name
        function = translated[name]["Properties"]
        assert function["ReservedConcurrentExecutions"]["Fn::If"][0] == CONCURRENCY[name][1]
        group = f"{name.removesuffix('Function')}LogGroup"
        assert function["LoggingConfig"] == {"LogGroup": {"Ref": group}}
    # Nobody reads what they do not use, e.g. setup never the database or Vapi's key.
    setup = json.dumps(translated["SetupFunctionRole"])
    assert "DatabaseSecret" not in setup and "VapiKeySecret" not in setup
    assert "*" not in json.dumps([r for r in translated.values() if r["Type"] == "AWS::IAM::Role"])


def alarms(template: dict) -> dict[str, dict]:
    return {
        name: r["Properties"]
        for name, r in template["Resources"].items()
        if r["Type"] == "AWS::CloudWatch::Alarm"
    }


@pytest.mark.sam
def test_alarms_watch_failures_errors_missed_jobs_and_the_sweep(template):
    found = alarms(template)
    topic = {"Fn::If": ["CreateAlarmTopic", {"Ref": "AlarmTopic"}, {"Ref": "AlarmTopicArn"}]}
    formcall = {
        (
            a["MetricName"],
            a["ComparisonOperator"],
            a["Threshold"],
            a["TreatMissingData"],
            a["Period"] * a["EvaluationPeriods"],
        )
        for a in found.values()
        if a["Namespace"] == "formcall"
    }
    errors = {
        a["Dimensions"][0]["Value"]["Ref"]
        for a in found.values()
        if (a["Namespace"], a["MetricName"]) == ("AWS/Lambda", "Errors")
    }

    assert formcall == {
        ("DeliveryFailed", "GreaterThanOrEqualToThreshold", 1, "notBreaching", 300),
        ("OverdueOverAnHour", "GreaterThanOrEqualToThreshold", 1, "notBreaching", 300),
        # No datapoint for two hours is breaching: a sweep that never runs is the failure.
        ("SweepSucceeded", "LessThanThreshold", 1, "breaching", 7200),
    }
    assert errors == set(FUNCTIONS)
    for name, alarm in found.items():
        assert alarm["AlarmActions"] == [topic], name
        assert alarm["Statistic"] == "Sum"
        if alarm["Namespace"] == "formcall":
            assert alarm["MetricName"] in METRICS
            assert alarm["Dimensions"] == [{"Name": "service", "Value": "formcall"}]
        else:
            assert alarm["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"
            assert alarm["Threshold"] == 1
    assert template["Resources"]["AlarmTopic"]["Condition"] == "CreateAlarmTopic"
    assert template["Outputs"]["AlarmTopicArn"]["Value"] == topic


@pytest.mark.sam
def test_alarm_dimensions_are_the_ones_powertools_emits(template, monkeypatch):
    """EMF metrics carry the dimension `service` = POWERTOOLS_SERVICE_NAME, in the namespace."""
    from aws_lambda_powertools.metrics.provider.cloudwatch_emf.cloudwatch import (
        AmazonCloudWatchEMFProvider,
    )

    variables = template["Globals"]["Function"]["Environment"]["Variables"]
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", variables["POWERTOOLS_SERVICE_NAME"])
    monkeypatch.setenv("POWERTOOLS_METRICS_NAMESPACE", variables["POWERTOOLS_METRICS_NAMESPACE"])
    provider = AmazonCloudWatchEMFProvider(metric_set={}, dimension_set={}, metadata_set={})
    provider.add_metric(name="DeliveryFailed", unit="Count", value=1)
    emitted = provider.serialize_metric_set()
    (directive,) = emitted["_aws"]["CloudWatchMetrics"]
    alarm = alarms(template)["DeliveryFailedAlarm"]

    assert directive["Namespace"] == alarm["Namespace"]
    assert directive["Dimensions"] == [[d["Name"] for d in alarm["Dimensions"]]]
    assert {d["Name"]: emitted[d["Name"]] for d in alarm["Dimensions"]} == {
        d["Name"]: d["Value"] for d in alarm["Dimensions"]
    }


@pytest.mark.sam
def test_dashboard_shows_calls_and_deliveries(template):
    body = template["Resources"]["Dashboard"]["Properties"]["DashboardBody"]["Fn::Sub"]
    widgets = json.loads(body.replace("${AWS::Region}", "us-east-1"))["widgets"]
    shown = [tuple(m) for w in widgets for m in w["properties"]["metrics"]]

    assert {m[1] for m in shown} == {
        "CallsPlaced",
        "CallsSkipped",
        "CallsDeferred",
        "CallsFailed",
        "DeliveryFailed",
        "FormsEnqueued",
        "CallsReached",
        "CallsNotReached",
        "FollowUpsScheduled",
        "CallsCapped",
        "PatientsOptedOut",
    }
    assert {m[1] for m in shown} <= METRICS
    assert all((m[0], m[2:]) == ("formcall", ("service", "formcall")) for m in shown)


@pytest.mark.sam
def test_outputs_give_every_url(template):
    outputs = template["Outputs"]

    for name in FUNCTIONS:
        output = name.removesuffix("Function")
        assert outputs[f"{output}Url"]["Value"] == {"Fn::GetAtt": [f"{name}Url", "FunctionUrl"]}
        assert outputs[f"{output}ApiUrl"]["Value"]["Fn::Sub"].endswith(FUNCTIONS[name][2])
    assert "HttpApiUrl" in outputs and "DashboardUrl" in outputs


def test_samconfig_has_three_environments_and_no_secrets():
    config = tomllib.loads((ROOT / "samconfig.toml").read_text())

    assert config["version"] == 0.1
    for env, stack in [
        ("default", "formcall"),
        ("staging", "formcall-staging"),
        ("prod", "formcall-prod"),
    ]:
        deploy = config[env]["deploy"]["parameters"]
        assert deploy["stack_name"] == config[env]["global"]["parameters"]["stack_name"] == stack
        assert deploy["capabilities"] == "CAPABILITY_IAM"
        assert config[env]["build"]["parameters"] == {"cached": True, "parallel": True}
        assert config[env]["validate"]["parameters"] == {"lint": True}
        assert "parameter_overrides" not in deploy


# --- sam build ------------------------------------------------------------------------------


@pytest.mark.sam
def test_built_layer_holds_the_package(build_dir):
    python = build_dir / "SharedLayer" / "python"

    assert (python / "formcall" / "__init__.py").is_file()
    for source in PACKAGE.rglob("*.py"):
        if "__pycache__" not in source.parts:
            built = python / "formcall" / source.relative_to(PACKAGE)
            assert built.read_bytes() == source.read_bytes(), f"{built} is stale or missing"
    assert not list(python.rglob("__pycache__"))


@pytest.mark.sam
def test_built_layer_holds_the_pins_for_aarch64(build_dir):
    python = build_dir / "SharedLayer" / "python"
    installed = {
        re.sub(r"[-_.]+", "-", d.name.removesuffix(".dist-info").rsplit("-", 1)[0]).lower(): (
            d.name.removesuffix(".dist-info").rsplit("-", 1)[1]
        )
        for d in python.glob("*.dist-info")
    }
    wanted = {
        name: version
        for name, (version, _) in hashed_requirements(LAYER_REQUIREMENTS.read_text()).items()
    }

    assert installed == wanted
    assert not FROM_RUNTIME & set(installed) and "botocore" not in installed

    (pydantic_core,) = (python / "pydantic_core").glob("_pydantic_core*.so")
    assert "aarch64" in pydantic_core.name and elf_machine(pydantic_core) == EM_AARCH64
    psycopg_binary = list((python / "psycopg_binary").glob("*.so"))
    assert psycopg_binary and all(elf_machine(so) == EM_AARCH64 for so in psycopg_binary)
    shared_objects = [p for p in python.rglob("*.so*") if p.is_file() and elf_machine(p)]
    wrong = [str(p.relative_to(python)) for p in shared_objects if elf_machine(p) != EM_AARCH64]
    assert shared_objects and not wrong, f"not aarch64: {wrong}"


@pytest.mark.sam
def test_built_layer_satisfies_every_import(build_dir):
    python = build_dir / "SharedLayer" / "python"
    sources = [*PACKAGE.rglob("*.py"), *(ROOT / "functions").glob("*/app.py")]
    imported = set()
    for source in sources:
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"__future__"}
    missing = {
        name
        for name in third_party - FROM_RUNTIME - {"botocore"}
        if not ((python / name).is_dir() or (python / f"{name}.py").is_file())
    }

    assert "formcall" in third_party
    assert not missing, f"imported but not in the layer: {sorted(missing)}"


@pytest.mark.sam
def test_built_functions_hold_only_their_app_and_use_the_layer(build_dir):
    built = parse_cfn_yaml(build_dir / "template.yaml")

    for name in FUNCTIONS:
        folder = build_dir / name
        assert (folder / "app.py").is_file(), f"{name}: app.py missing from the build"
        assert not list(folder.glob("*.dist-info")), f"{name}: dependencies belong in the layer"
        props = built["Resources"][name]["Properties"]
        assert props["CodeUri"] == name
        layers = props.get("Layers", built["Globals"]["Function"].get("Layers"))
        assert layers == [{"Ref": "SharedLayer"}]
    assert built["Resources"]["SharedLayer"]["Properties"]["ContentUri"] == "SharedLayer"
