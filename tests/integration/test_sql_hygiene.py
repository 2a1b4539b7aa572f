"""SQL hygiene (issue 14, finding 8): a fixed search_path everywhere, nothing open to the clinic.

Covers every function in `public`, whichever migration made it, so a new one without a fixed
search_path (or with EXECUTE left to anon/authenticated) fails here.
"""

from __future__ import annotations

import pytest

FUNCTIONS = """
    select p.oid::regprocedure::text, p.proconfig
      from pg_proc p join pg_namespace n on n.oid = p.pronamespace
     where n.nspname = 'public' and p.prokind in ('f', 'p')
       and not exists (select 1 from pg_depend d where d.classid = 'pg_proc'::regclass
                        and d.objid = p.oid and d.deptype = 'e')
"""


def test_every_function_in_public_has_a_fixed_search_path(conn):
    functions = conn.execute(FUNCTIONS).fetchall()
    assert len(functions) >= 13  # the state machine, the token ledger, the guard
    unfixed = [name for name, config in functions
               if not any(c.startswith("search_path=") for c in config or [])]
    assert unfixed == []
    paths = {c for _, config in functions for c in config if c.startswith("search_path=")}
    assert paths == {"search_path=pg_catalog, public, pg_temp"}


def test_no_function_in_public_is_executable_by_anon_or_authenticated(conn):
    open_to = conn.execute(f"""
        select f.name, r.role from ({FUNCTIONS}) as f(name, config)
         cross join (values ('anon'), ('authenticated')) as r(role)
         where has_function_privilege(r.role, f.name, 'execute')
    """).fetchall()
    assert open_to == []


@pytest.mark.parametrize("language, body", [
    ("sql", "select 1"), ("plpgsql", "begin return 1; end"),
])
def test_a_function_created_after_the_migrations_is_not_executable_by_the_clinic(conn, language,
                                                                                body):
    # As a later migration would create it (the migration role), with no GRANT or REVOKE.
    conn.execute(f"create function public.hygiene_probe() returns int language {language}"
                 f" as $${body}$$")
    try:
        allowed = {role: conn.execute(
            "select has_function_privilege(%s, 'public.hygiene_probe()', 'execute')",
            (role,)).fetchone()[0] for role in ("anon", "authenticated", "service_role")}
        assert allowed == {"anon": False, "authenticated": False, "service_role": True}
    finally:
        conn.execute("drop function public.hygiene_probe()")
