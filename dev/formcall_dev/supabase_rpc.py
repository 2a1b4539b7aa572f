"""A stand-in for Supabase's REST RPC endpoint (PostgREST `POST /rest/v1/rpc/<function>`).

It runs the named SQL function on a real PostgreSQL with the JSON body as named arguments,
so the `supabase` client path runs the very same SQL as the direct path. Only the RPC
surface formcall uses is served; there is no table REST API, no JWT role switching.
"""

from __future__ import annotations

import hmac
import re

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb
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
        # PostgREST passes JSON objects and arrays to json/jsonb parameters.
        args = {k: Jsonb(v) if isinstance(v, dict | list) else v for k, v in args.items()}
        query = sql.SQL("select {}({})").format(
            sql.Identifier("public", function),
            sql.SQL(", ").join(sql.SQL("{} => {}").format(sql.Identifier(k), sql.Placeholder(k))
                               for k in args))
        try:
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                row = await (await conn.execute(query, args)).fetchone()
        except psycopg.errors.UndefinedFunction as exc:
            return JSONResponse({"code": "PGRST202", "message": str(exc).splitlines()[0],
                                 "details": None, "hint": None}, 404)
        except psycopg.Error as exc:
            return JSONResponse({"code": getattr(exc, "sqlstate", None) or "PGRST000",
                                 "message": str(exc).splitlines()[0], "details": None,
                                 "hint": None}, 400)
        return JSONResponse(row[0] if row else None)

    return Starlette(routes=[Route("/rest/v1/rpc/{function}", rpc, methods=["POST"])])
