"""A stand-in for Supabase's REST API (PostgREST): RPC calls and table reads, on a real PostgreSQL.

`POST /rest/v1/rpc/<function>` runs the named SQL function with the JSON body as named
arguments, so the `supabase` client path runs the very same SQL as the direct path.
`GET /rest/v1/<table>` reads rows as PostgREST does, for `formcall status`: `select=` columns,
filters `column=eq.|neq.|lt.|lte.|gt.|gte.|is.|in.(...)`, `order=column.asc|desc`, `limit`,
`offset`, and `Prefer: count=exact` (the total in `Content-Range`). Only that surface is served:
no embedding, no writes through tables, no JWT role switching (the service_role key alone).
"""

from __future__ import annotations

import hmac
import json
import re

import psycopg
from psycopg import sql
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


# PostgREST's filter operators formcall uses, as SQL.
_OPERATORS = {"eq": "=", "neq": "<>", "lt": "<", "lte": "<=", "gt": ">", "gte": ">="}
_RESERVED = {"select", "order", "limit", "offset"}


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"code": code, "details": None, "hint": None, "message": message}, status)


def create_app(*, dsn: str, service_role_key: str) -> Starlette:
    def refused(request: Request) -> JSONResponse | None:
        key = request.headers.get("apikey", "")
        if not hmac.compare_digest(key.encode(), service_role_key.encode()):
            return JSONResponse({"message": "Invalid API key", "hint": None}, 401)
        return None

    async def table(request: Request) -> Response:
        if (answer := refused(request)) is not None:
            return answer
        name = request.path_params["table"]
        try:
            query = _table_query(name, request.query_params.multi_items())
        except ValueError as exc:
            return _error(400, "PGRST100", str(exc))
        try:
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                if not await _is_table(conn, name):
                    return _error(
                        404,
                        "PGRST205",
                        f"Could not find the table 'public.{name}' in the schema cache",
                    )
                rows, params, count_sql = query
                (body,) = await (await conn.execute(rows, params)).fetchone()
                total = "*"
                if "count=exact" in request.headers.get("prefer", ""):
                    (n,) = await (await conn.execute(count_sql, params[:-2])).fetchone()
                    total = str(n)
        except psycopg.Error as exc:
            return _error(
                400, getattr(exc, "sqlstate", None) or "PGRST000", str(exc).splitlines()[0]
            )
        shown = len(json.loads(body))
        offset = params[-1]
        span = f"{offset}-{offset + shown - 1}" if shown else "*"
        return Response(
            body,
            media_type="application/json",
            headers={"Content-Range": f"{span}/{total}"},
        )

    async def rpc(request: Request) -> JSONResponse:
        if (answer := refused(request)) is not None:
            return answer
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

    return Starlette(
        routes=[
            Route("/rest/v1/rpc/{function}", rpc, methods=["POST"]),
            Route("/rest/v1/{table}", table, methods=["GET"]),
        ]
    )


def _table_query(
    table: str, items: list[tuple[str, str]]
) -> tuple[sql.Composed, list, sql.Composed]:
    """The rows query (one JSON array), its parameters (limit and offset last), the count query."""
    if not _NAME.match(table):
        raise ValueError(f"not a table name: {table!r}")
    given = dict(items)
    columns = [c.strip() for c in given.get("select", "*").split(",")]
    if columns != ["*"] and not all(_NAME.match(c) for c in columns):
        raise ValueError(f"select= takes column names only (no embedding): {given['select']!r}")
    where: list[sql.Composable] = []
    params: list = []
    for column, condition in items:
        if column in _RESERVED:
            continue
        if not _NAME.match(column):
            raise ValueError(f"not a column name: {column!r}")
        operator, _, value = condition.partition(".")
        if operator in _OPERATORS:
            where.append(
                sql.SQL("{} {} %s").format(sql.Identifier(column), sql.SQL(_OPERATORS[operator]))
            )
            params.append(value)
        elif operator == "is" and value in ("null", "true", "false"):
            where.append(sql.SQL("{} is {}").format(sql.Identifier(column), sql.SQL(value)))
        elif operator == "in" and value.startswith("(") and value.endswith(")"):
            values = [v.strip().strip('"') for v in value[1:-1].split(",") if v.strip()]
            if not values:
                where.append(sql.SQL("false"))
                continue
            where.append(
                sql.SQL("{} in ({})").format(
                    sql.Identifier(column), sql.SQL(", ").join(sql.Placeholder() * len(values))
                )
            )
            params.extend(values)
        else:
            raise ValueError(f"unknown filter {column}={condition!r}")
    order: list[sql.Composable] = []
    for term in filter(None, given.get("order", "").split(",")):
        column, _, direction = term.partition(".")
        if not _NAME.match(column) or direction not in ("", "asc", "desc"):
            raise ValueError(f"order= takes column.asc or column.desc: {term!r}")
        order.append(sql.SQL("{} {}").format(sql.Identifier(column), sql.SQL(direction or "asc")))
    try:
        limit = int(given["limit"]) if "limit" in given else None
        offset = int(given.get("offset", "0"))
    except ValueError:
        raise ValueError("limit= and offset= take integers") from None
    selected = (
        sql.SQL("*") if columns == ["*"] else sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    )
    source = sql.SQL("from {} {}").format(
        sql.Identifier("public", table),
        sql.SQL("where ") + sql.SQL(" and ").join(where) if where else sql.SQL(""),
    )
    rows = sql.SQL(
        "select coalesce(json_agg(t), '[]')::text from (select {} {} {} limit %s offset %s) t"
    ).format(
        selected,
        source,
        sql.SQL("order by ") + sql.SQL(", ").join(order) if order else sql.SQL(""),
    )
    count = sql.SQL("select count(*) {}").format(source)
    return rows, [*params, limit, offset], count


async def _is_table(conn, name: str) -> bool:
    row = await (
        await conn.execute(
            "select 1 from pg_class c join pg_namespace n on n.oid = c.relnamespace"
            " where n.nspname = 'public' and c.relname = %s and c.relkind in ('r', 'v', 'p')",
            (name,),
        )
    ).fetchone()
    return row is not None


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
