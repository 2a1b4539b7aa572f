"""A stand-in for Supabase's REST RPC endpoint (PostgREST `POST /rest/v1/rpc/<function>`).

It runs the named SQL function on a real PostgreSQL with the JSON body as named arguments,
so the `supabase` client path runs the very same SQL as the direct path. Only the RPC
surface formcall uses is served; there is no table REST API, no JWT role switching.
"""

from __future__ import annotations

import hmac
import json
import re

import psycopg
from psycopg import sql
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


def create_app(*, dsn: str, service_role_key: str) -> Starlette:
    async def rpc(request: Request) -> JSONResponse:
        key = request.headers.get("apikey", "")
        if not hmac.compare_digest(key.encode(), service_role_key.encode()):
            return JSONResponse({"message": "Invalid API key", "hint": None}, 401)
        function = request.path_params["function"]
        if not _NAME.match(function):
            return JSONResponse({"code": "PGRST202", "message": "function not found"}, 404)
        args = await request.json() if await request.body() else {}
        if not isinstance(args, dict):
            return JSONResponse({"code": "PGRST102", "message": "body must be an object"}, 400)
        try:
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                types = await _parameter_types(conn, function)
                unknown = sorted(set(args) - set(types))
                if types is None or unknown:
                    return JSONResponse(
                        {
                            "code": "PGRST202",
                            "details": None,
                            "hint": None,
                            "message": f"Could not find the function "
                            f"public.{function} with these arguments",
                        },
                        404,
                    )
                # As PostgREST does: the JSON body becomes a record of the parameters' own
                # types (json_to_record), so arrays, numbers and times arrive typed.
                names = list(args)
                query = sql.SQL("select {}({}) from json_to_record(%s::json) as x({})").format(
                    sql.Identifier("public", function),
                    sql.SQL(", ").join(
                        sql.SQL("{0} => x.{0}").format(sql.Identifier(n)) for n in names
                    ),
                    sql.SQL(", ").join(
                        sql.SQL("{} {}").format(sql.Identifier(n), sql.SQL(types[n])) for n in names
                    )
                    if names
                    else sql.SQL("_ int"),
                )
                row = await (await conn.execute(query, (json.dumps(args),))).fetchone()
        except psycopg.errors.UndefinedFunction as exc:
            return JSONResponse(
                {
                    "code": "PGRST202",
                    "message": str(exc).splitlines()[0],
                    "details": None,
                    "hint": None,
                },
                404,
            )
        except psycopg.Error as exc:
            return JSONResponse(
                {
                    "code": getattr(exc, "sqlstate", None) or "PGRST000",
                    "message": str(exc).splitlines()[0],
                    "details": None,
                    "hint": None,
                },
                400,
            )
        return JSONResponse(row[0] if row else None)

    return Starlette(routes=[Route("/rest/v1/rpc/{function}", rpc, methods=["POST"])])


async def _parameter_types(conn, function: str) -> dict[str, str] | None:
    """The named parameters of public.<function> and their SQL types (None: no such function)."""
    row = await (
        await conn.execute(
            "select p.proargnames, array(select format_type(t, null) from unnest(p.proargtypes) t)"
            "  from pg_proc p join pg_namespace n on n.oid = p.pronamespace"
            " where n.nspname = 'public' and p.proname = %s",
            (function,),
        )
    ).fetchone()
    if row is None:
        return None
    return dict(zip(row[0] or [], row[1], strict=False))
