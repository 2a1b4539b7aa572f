"""The local QStash's PostgreSQL state: a small async pool, the queries, rows as API JSON."""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

from psycopg import AsyncConnection
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from formcall_dev.qstash.headers import BadRequest, MessageSpec, next_cron_time

SCHEMA_SQL = Path(__file__).with_name("schema.sql")
SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
DEDUP_WINDOW_S = 600
LEASE_S = 30.0
# An upper bound on due rows looked at per claim, so a deep backlog costs the same as a short one.
CLAIM_SCAN = 2000


class NotFound(LookupError):
    """An id the store does not know (the API answers 404)."""


def new_message_id() -> str:
    return "msg_" + secrets.token_urlsafe(24)


def new_schedule_id() -> str:
    return "scd_" + secrets.token_urlsafe(18)


def to_ms(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp() * 1000)


def body_fields(body: bytes, name: str = "body") -> dict:
    """QStash reports a UTF-8 body as text and anything else as base64 under <name>Base64."""
    try:
        return {name: body.decode("utf-8")}
    except UnicodeDecodeError:
        return {name + "Base64": base64.b64encode(body).decode()}


def _flow_fields(
    key: str | None, parallelism: int | None, rate: int | None, period: int | None
) -> dict:
    if key is None:
        return {}
    fields: dict = {"flowControlKey": key, "period": period or 1}
    if parallelism is not None:
        fields["parallelism"] = parallelism
    if rate is not None:
        fields["rate"] = rate
    return fields


def _callback_fields(callback: dict | None, prefix: str) -> dict:
    if not callback:
        return {}
    fields = {prefix: callback["url"]}
    if callback["header"]:
        fields[prefix + "Header"] = callback["header"]
    return fields


def _without_none(data: dict) -> dict:
    return {key: value for key, value in data.items() if value is not None}


def message_json(row: dict) -> dict:
    """A messages row in the shape of GET /v2/messages/{id}."""
    return _without_none(
        {
            "messageId": row["message_id"],
            "url": row["url"],
            "method": row["method"],
            "header": row["header"] or None,
            **body_fields(row["body"]),
            "maxRetries": row["max_retries"],
            "notBefore": to_ms(row["not_before"]),
            "createdAt": to_ms(row["created_at"]),
            **_callback_fields(row["callback"], "callback"),
            **_callback_fields(row["failure_callback"], "failureCallback"),
            "scheduleId": row["schedule_id"],
            "callerIP": row["caller_ip"],
            **_flow_fields(
                row["flow_key"], row["flow_parallelism"], row["flow_rate"], row["flow_period_s"]
            ),
            "retryDelayExpression": row["retry_delay"],
            "label": row["label"],
        }
    )


def schedule_json(row: dict) -> dict:
    spec = row["spec"]
    return _without_none(
        {
            "scheduleId": row["schedule_id"],
            "destination": row["destination"],
            "cron": row["cron"],
            "createdAt": to_ms(row["created_at"]),
            **body_fields(row["body"]),
            "method": spec["method"],
            "header": spec["header"] or None,
            **_callback_fields(spec["callback"], "callback"),
            **_callback_fields(spec["failure_callback"], "failureCallback"),
            "retries": spec["max_retries"],
            "delay": int(spec["delay_s"]) if spec["delay_s"] else None,
            "timeout": int(spec["timeout_s"]) if spec["timeout_s"] else None,
            "callerIP": row["caller_ip"],
            "isPaused": row["paused"],
            **_flow_fields(
                spec["flow_key"], spec["flow_parallelism"], spec["flow_rate"], spec["flow_period_s"]
            ),
            "lastScheduleTime": to_ms(row["last_fire_at"]),
            "nextScheduleTime": to_ms(row["next_fire_at"]),
            "retryDelayExpression": spec["retry_delay"],
            "label": spec["label"],
        }
    )


def event_json(row: dict) -> dict:
    return _without_none(
        {
            "time": to_ms(row["time"]),
            "messageId": row["message_id"],
            "state": row["state"],
            "url": row["url"],
            "scheduleId": row["schedule_id"],
            "label": row["label"],
            **row["detail"],
        }
    )


class ConnectionPool:
    """At most `size` autocommit connections, opened on demand; a broken one is dropped."""

    def __init__(self, dsn: str, size: int) -> None:
        self._dsn = dsn
        self._slots = asyncio.Semaphore(size)
        self._idle: list[AsyncConnection] = []

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection]:
        async with self._slots:
            conn = (
                self._idle.pop()
                if self._idle
                else await AsyncConnection.connect(self._dsn, autocommit=True, row_factory=dict_row)
            )
            try:
                yield conn
            finally:
                if (
                    conn.closed
                    or conn.broken
                    or conn.info.transaction_status != TransactionStatus.IDLE
                ):
                    await conn.close()
                else:
                    self._idle.append(conn)

    async def close(self) -> None:
        while self._idle:
            await self._idle.pop().close()


# --- SQL. {s} is the schema name, checked against SCHEMA_NAME before it is pasted in.

_INSERT_MESSAGE = """
with m as (
  insert into {s}.messages (message_id, url, method, body, content_type, header, max_retries,
    retry_delay, timeout_s, callback, failure_callback, flow_key, flow_parallelism, flow_rate,
    flow_period_s, label, schedule_id, caller_ip, created_at, not_before, state, due_at)
  values (%(message_id)s, %(url)s, %(method)s, %(body)s, %(content_type)s, %(header)s,
    %(max_retries)s, %(retry_delay)s, %(timeout_s)s, %(callback)s, %(failure_callback)s,
    %(flow_key)s, %(flow_parallelism)s, %(flow_rate)s, %(flow_period_s)s, %(label)s,
    %(schedule_id)s, %(caller_ip)s, to_timestamp(%(created_at)s), to_timestamp(%(not_before)s),
    'CREATED', to_timestamp(%(not_before)s))
  returning message_id, url, schedule_id, label
)
insert into {s}.events (message_id, state, url, schedule_id, label, detail)
select message_id, 'CREATED', url, schedule_id, label, %(detail)s from m
"""

_CLAIM_DUE = """
with due as (
  select message_id, flow_key, due_at,
         coalesce(least(flow_parallelism, flow_rate), 2147483647) as own_limit
  from {s}.messages
  where due_at <= now() and (flow_key is null or flow_key <> all(%(blocked)s::text[]))
  order by due_at
  limit %(scan)s
), ranked as (
  select message_id, flow_key, due_at, own_limit,
         row_number() over (partition by flow_key order by due_at) as rn
  from due
), picked as (
  select m.message_id
  from {s}.messages m join ranked r on r.message_id = m.message_id
  where m.due_at <= now()
    and (r.flow_key is null
         or r.rn <= coalesce((%(allowances)s::jsonb ->> r.flow_key)::int, r.own_limit))
  order by r.due_at
  limit %(limit)s
  for update of m skip locked
), claimed as (
  update {s}.messages m
  set state = 'ACTIVE', owner = %(owner)s, due_at = now() + make_interval(secs => %(lease_s)s)
  from picked where m.message_id = picked.message_id
  returning m.*
), logged as (
  insert into {s}.events (message_id, state, url, schedule_id, label, detail)
  select message_id, 'ACTIVE', url, schedule_id, label, jsonb_build_object('retried', retried)
  from claimed
)
select * from claimed
"""

_FINISH_DELIVERED = """
with gone as (
  delete from {s}.messages where message_id = %(message_id)s and owner = %(owner)s
  returning message_id, url, schedule_id, label
)
insert into {s}.events (message_id, state, url, schedule_id, label, detail)
select message_id, 'DELIVERED', url, schedule_id, label, %(detail)s from gone
returning message_id
"""

_FINISH_RETRY = """
with moved as (
  update {s}.messages
  set retried = retried + 1, state = 'RETRY', owner = null,
      due_at = now() + make_interval(secs => %(wait_s)s)
  where message_id = %(message_id)s and owner = %(owner)s
  returning message_id, url, schedule_id, label, due_at
)
insert into {s}.events (message_id, state, url, schedule_id, label, detail)
select message_id, 'ERROR', url, schedule_id, label, %(detail)s from moved
union all
select message_id, 'RETRY', url, schedule_id, label,
       jsonb_build_object('nextDeliveryTime', (extract(epoch from due_at) * 1000)::bigint)
from moved
returning message_id
"""

_LOG_EVENT = """
insert into {s}.events (message_id, state, url, schedule_id, label, detail)
values (%(message_id)s, %(state)s, %(url)s, %(schedule_id)s, %(label)s, %(detail)s)
"""


class Store:
    """Every read and write of the local QStash; one instance per app."""

    def __init__(self, dsn: str, schema: str, *, pool_size: int = 10) -> None:
        if not SCHEMA_NAME.fullmatch(schema):
            raise ValueError(f"schema must be a lower-case SQL identifier, got {schema!r}")
        self.dsn = dsn
        self.schema = schema
        self.pool = ConnectionPool(dsn, pool_size)

    def _sql(self, text: str) -> str:
        return text.replace("{s}", self.schema)

    async def create_schema(self) -> None:
        # The advisory lock makes two servers starting at once take turns: concurrent
        # "create ... if not exists" statements can still collide in the catalogs.
        ddl = SCHEMA_SQL.read_text().replace("{schema}", self.schema)
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute(
                "select pg_advisory_xact_lock(hashtext(%s))",
                ("formcall_dev.local_qstash." + self.schema,),
            )
            await conn.execute(ddl)

    async def close(self) -> None:
        await self.pool.close()

    # --- publishing

    async def _claim_dedup(self, conn: AsyncConnection, key: str, message_id: str) -> str | None:
        """None if `key` is new in the window (now pointing at message_id), else the first id."""
        row = await (
            await conn.execute(
                self._sql(
                    "insert into {s}.dedup (dedup_key, message_id, created_at) values (%s, %s, now())"
                    " on conflict (dedup_key) do update"
                    " set message_id = excluded.message_id, created_at = excluded.created_at"
                    " where {s}.dedup.created_at < now() - make_interval(secs => %s)"
                    " returning message_id"
                ),
                (key, message_id, float(DEDUP_WINDOW_S)),
            )
        ).fetchone()
        if row:
            return None
        row = await (
            await conn.execute(
                self._sql("select message_id from {s}.dedup where dedup_key = %s"), (key,)
            )
        ).fetchone()
        return row["message_id"]

    @staticmethod
    def _message_params(
        spec: MessageSpec, message_id: str, *, caller_ip: str | None, schedule_id: str | None
    ) -> dict:
        now = time.time()
        not_before = spec.not_before if spec.not_before is not None else now + spec.delay_s
        return {
            "message_id": message_id,
            "url": spec.url,
            "method": spec.method,
            "body": spec.body,
            "content_type": spec.content_type,
            "header": Jsonb(spec.header),
            "max_retries": spec.max_retries,
            "retry_delay": spec.retry_delay,
            "timeout_s": spec.timeout_s,
            "callback": Jsonb(spec.callback) if spec.callback else None,
            "failure_callback": Jsonb(spec.failure_callback) if spec.failure_callback else None,
            "flow_key": spec.flow_key,
            "flow_parallelism": spec.flow_parallelism,
            "flow_rate": spec.flow_rate,
            "flow_period_s": spec.flow_period_s,
            "label": spec.label,
            "schedule_id": schedule_id,
            "caller_ip": caller_ip,
            "created_at": now,
            "not_before": float(not_before),
            "detail": Jsonb({"method": spec.method, "maxRetries": spec.max_retries}),
        }

    async def insert_messages(
        self,
        conn: AsyncConnection,
        specs: list[MessageSpec],
        *,
        caller_ip: str | None,
        schedule_id: str | None = None,
        dedup_keys: list[str | None] | None = None,
    ) -> list[tuple[str, bool]]:
        """Insert in the caller's transaction; (message id, deduplicated) per spec, in order."""
        results: list[tuple[str, bool]] = []
        params: list[dict] = []
        for index, spec in enumerate(specs):
            message_id = new_message_id()
            key = dedup_keys[index] if dedup_keys else None
            original = await self._claim_dedup(conn, key, message_id) if key else None
            if original:
                results.append((original, True))
                continue
            results.append((message_id, False))
            params.append(
                self._message_params(spec, message_id, caller_ip=caller_ip, schedule_id=schedule_id)
            )
        if params:
            async with conn.cursor() as cur:
                await cur.executemany(self._sql(_INSERT_MESSAGE), params)
        return results

    async def publish(
        self, specs: list[MessageSpec], dedup_keys: list[str | None], *, caller_ip: str | None
    ) -> list[tuple[str, bool]]:
        async with self.pool.connection() as conn, conn.transaction():
            return await self.insert_messages(
                conn, specs, caller_ip=caller_ip, dedup_keys=dedup_keys
            )

    # --- reading and cancelling messages

    async def get_message(self, message_id: str) -> dict:
        async with self.pool.connection() as conn:
            row = await (
                await conn.execute(
                    self._sql("select * from {s}.messages where message_id = %s"), (message_id,)
                )
            ).fetchone()
        if row is None:
            raise NotFound(f"message {message_id} not found")
        return row

    async def list_queued(self, limit: int = 10000) -> list[dict]:
        async with self.pool.connection() as conn:
            return await (
                await conn.execute(
                    self._sql(
                        "select message_id, url, method, state, retried, max_retries, due_at, not_before,"
                        " created_at, owner, schedule_id, flow_key, label"
                        " from {s}.messages order by due_at limit %s"
                    ),
                    (limit,),
                )
            ).fetchall()

    async def cancel_messages(self, message_ids: list[str] | None) -> int:
        """Cancel the given messages, or every message when None; returns how many there were."""
        where, params = (
            ("", ())
            if message_ids is None
            else (" where message_id = any(%s::text[])", (message_ids,))
        )
        async with self.pool.connection() as conn, conn.transaction():
            rows = await (
                await conn.execute(
                    self._sql(
                        "delete from {s}.messages"
                        + where
                        + " returning message_id, url, schedule_id, label"
                    ),
                    params,
                )
            ).fetchall()
            # A cancelled message is logged as requested and honoured at once: the row is gone,
            # so a delivery already in flight finishes without retries or callbacks.
            async with conn.cursor() as cur:
                await cur.executemany(
                    self._sql(_LOG_EVENT),
                    [
                        {**row, "state": state, "detail": Jsonb({})}
                        for row in rows
                        for state in ("CANCEL_REQUESTED", "CANCELED")
                    ],
                )
        return len(rows)

    # --- the dispatcher's side

    async def claim_due(
        self, *, owner: str, limit: int, blocked: list[str], allowances: dict[str, int]
    ) -> list[dict]:
        """Lease up to `limit` due messages, at most allowances[key] per flow-control key."""
        async with self.pool.connection() as conn:
            return await (
                await conn.execute(
                    self._sql(_CLAIM_DUE),
                    {
                        "owner": owner,
                        "limit": limit,
                        "scan": CLAIM_SCAN,
                        "blocked": blocked,
                        "allowances": Jsonb(allowances),
                        "lease_s": LEASE_S,
                    },
                )
            ).fetchall()

    async def extend_leases(self, owner: str, message_ids: list[str]) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(
                self._sql(
                    "update {s}.messages set due_at = now() + make_interval(secs => %s)"
                    " where owner = %s and message_id = any(%s::text[])"
                ),
                (LEASE_S, owner, message_ids),
            )

    async def release_leases(self, owner: str) -> int:
        """Make this dispatcher's unfinished deliveries due again now (used on shutdown)."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                self._sql(
                    "update {s}.messages set owner = null, due_at = now(),"
                    " state = case when retried > 0 then 'RETRY' else 'CREATED' end"
                    " where owner = %s"
                ),
                (owner,),
            )
            return cur.rowcount

    async def finish_delivered(
        self, row: dict, owner: str, detail: dict, followups: list[MessageSpec]
    ) -> bool:
        """Remove a delivered message, queue its callback; False if it was cancelled meanwhile."""
        async with self.pool.connection() as conn, conn.transaction():
            gone = await (
                await conn.execute(
                    self._sql(_FINISH_DELIVERED),
                    {
                        "message_id": row["message_id"],
                        "owner": owner,
                        "detail": Jsonb(detail),
                    },
                )
            ).fetchone()
            if gone and followups:
                await self.insert_messages(conn, followups, caller_ip=row["caller_ip"])
            return gone is not None

    async def finish_retry(
        self, row: dict, owner: str, wait_s: float, detail: dict, followups: list[MessageSpec]
    ) -> bool:
        async with self.pool.connection() as conn, conn.transaction():
            moved = await (
                await conn.execute(
                    self._sql(_FINISH_RETRY),
                    {
                        "message_id": row["message_id"],
                        "owner": owner,
                        "wait_s": float(wait_s),
                        "detail": Jsonb(detail),
                    },
                )
            ).fetchone()
            if moved and followups:
                await self.insert_messages(conn, followups, caller_ip=row["caller_ip"])
            return moved is not None

    async def finish_failed(
        self,
        row: dict,
        owner: str,
        detail: dict,
        dlq_fields: dict,
        followups_for: Callable[[str], list[MessageSpec]],
    ) -> str | None:
        """Move a message to the DLQ and return its dlqId; followups_for(dlq_id) gives callbacks."""
        async with self.pool.connection() as conn, conn.transaction():
            gone = await (
                await conn.execute(
                    self._sql(
                        "delete from {s}.messages where message_id = %s and owner = %s returning *"
                    ),
                    (row["message_id"], owner),
                )
            ).fetchone()
            if gone is None:
                return None
            seq = (
                await (
                    await conn.execute(self._sql("select nextval('{s}.dlq_seq') as seq"))
                ).fetchone()
            )["seq"]
            dlq_id = f"{int(time.time() * 1000)}-{seq}"
            entry = {**message_json(gone), "dlqId": dlq_id, **dlq_fields}
            await conn.execute(
                self._sql(
                    "insert into {s}.dlq (seq, dlq_id, message_id, url, schedule_id, label,"
                    " response_status, message) values (%s, %s, %s, %s, %s, %s, %s, %s)"
                ),
                (
                    seq,
                    dlq_id,
                    gone["message_id"],
                    gone["url"],
                    gone["schedule_id"],
                    gone["label"],
                    dlq_fields["responseStatus"],
                    Jsonb(entry),
                ),
            )
            async with conn.cursor() as cur:
                await cur.executemany(
                    self._sql(_LOG_EVENT),
                    [
                        {
                            **{k: gone[k] for k in ("message_id", "url", "schedule_id", "label")},
                            "state": state,
                            "detail": Jsonb(event_detail),
                        }
                        for state, event_detail in (
                            ("ERROR", detail),
                            ("FAILED", {"dlqId": dlq_id}),
                        )
                    ],
                )
            followups = followups_for(dlq_id)
            if followups:
                await self.insert_messages(conn, followups, caller_ip=gone["caller_ip"])
            return dlq_id

    async def prune_dedup(self) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(
                self._sql(
                    "delete from {s}.dedup where created_at < now() - make_interval(secs => %s)"
                ),
                (float(DEDUP_WINDOW_S),),
            )

    # --- schedules

    async def upsert_schedule(
        self, schedule_id: str, spec: MessageSpec, cron: str, *, caller_ip: str | None
    ) -> None:
        # Overwriting keeps createdAt and the paused flag and restarts the cron from now.
        next_fire = next_cron_time(cron, datetime.now(UTC))
        async with self.pool.connection() as conn:
            await conn.execute(
                self._sql(
                    "insert into {s}.schedules (schedule_id, destination, cron, body, spec, caller_ip,"
                    " created_at, next_fire_at) values (%s, %s, %s, %s, %s, %s, now(), %s)"
                    " on conflict (schedule_id) do update set destination = excluded.destination,"
                    " cron = excluded.cron, body = excluded.body, spec = excluded.spec,"
                    " caller_ip = excluded.caller_ip, next_fire_at = excluded.next_fire_at"
                ),
                (
                    schedule_id,
                    spec.url,
                    cron,
                    spec.body,
                    Jsonb(spec.config_json()),
                    caller_ip,
                    next_fire,
                ),
            )

    async def list_schedules(self) -> list[dict]:
        async with self.pool.connection() as conn:
            return await (
                await conn.execute(
                    self._sql("select * from {s}.schedules order by created_at, schedule_id")
                )
            ).fetchall()

    async def get_schedule(self, schedule_id: str) -> dict:
        async with self.pool.connection() as conn:
            row = await (
                await conn.execute(
                    self._sql("select * from {s}.schedules where schedule_id = %s"), (schedule_id,)
                )
            ).fetchone()
        if row is None:
            raise NotFound(f"schedule {schedule_id} not found")
        return row

    async def delete_schedule(self, schedule_id: str) -> None:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                self._sql("delete from {s}.schedules where schedule_id = %s"), (schedule_id,)
            )
        if cur.rowcount == 0:
            raise NotFound(f"schedule {schedule_id} not found")

    async def set_schedule_paused(self, schedule_id: str, paused: bool) -> None:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                self._sql("update {s}.schedules set paused = %s where schedule_id = %s"),
                (paused, schedule_id),
            )
        if cur.rowcount == 0:
            raise NotFound(f"schedule {schedule_id} not found")

    async def _fire(self, conn: AsyncConnection, schedule: dict) -> str:
        spec = MessageSpec.from_config_json(
            schedule["spec"], url=schedule["destination"], body=schedule["body"]
        )
        [(message_id, _)] = await self.insert_messages(
            conn, [spec], caller_ip=schedule["caller_ip"], schedule_id=schedule["schedule_id"]
        )
        return message_id

    async def fire_due_schedules(self) -> int:
        """Create one message per schedule whose tick has come (paused ones just move on)."""
        fired = 0
        async with self.pool.connection() as conn, conn.transaction():
            due = await (
                await conn.execute(
                    self._sql(
                        "select * from {s}.schedules where next_fire_at <= now()"
                        " order by next_fire_at limit 100 for update skip locked"
                    )
                )
            ).fetchall()
            now = datetime.now(UTC)
            for schedule in due:
                # Ticks missed while no server ran collapse into this one trigger.
                next_fire = next_cron_time(schedule["cron"], max(now, schedule["next_fire_at"]))
                if schedule["paused"]:
                    await conn.execute(
                        self._sql(
                            "update {s}.schedules set next_fire_at = %s where schedule_id = %s"
                        ),
                        (next_fire, schedule["schedule_id"]),
                    )
                    continue
                await self._fire(conn, schedule)
                await conn.execute(
                    self._sql(
                        "update {s}.schedules set next_fire_at = %s, last_fire_at = now()"
                        " where schedule_id = %s"
                    ),
                    (next_fire, schedule["schedule_id"]),
                )
                fired += 1
        return fired

    async def trigger_schedule(self, schedule_id: str) -> str:
        """Fire a schedule now, outside its cron (local-only); its next tick is unchanged."""
        async with self.pool.connection() as conn, conn.transaction():
            schedule = await (
                await conn.execute(
                    self._sql("select * from {s}.schedules where schedule_id = %s for update"),
                    (schedule_id,),
                )
            ).fetchone()
            if schedule is None:
                raise NotFound(f"schedule {schedule_id} not found")
            message_id = await self._fire(conn, schedule)
            await conn.execute(
                self._sql("update {s}.schedules set last_fire_at = now() where schedule_id = %s"),
                (schedule_id,),
            )
        return message_id

    # --- DLQ and events

    async def list_dlq(
        self, *, filters: dict, cursor: int | None, count: int, latest_first: bool
    ) -> tuple[list[dict], int | None]:
        where, params = self._filters(
            filters,
            {
                "messageId": "message_id = %s",
                "url": "url = %s",
                "scheduleId": "schedule_id = %s",
                "label": "label = %s",
                "responseStatus": "response_status = %s",
                "fromDate": "failed_at >= to_timestamp(%s / 1000.0)",
                "toDate": "failed_at <= to_timestamp(%s / 1000.0)",
            },
        )
        if cursor is not None:
            where.append("seq < %s" if latest_first else "seq > %s")
            params.append(cursor)
        order = "desc" if latest_first else "asc"
        async with self.pool.connection() as conn:
            rows = await (
                await conn.execute(
                    self._sql(
                        "select seq, message from {s}.dlq"
                        + (" where " + " and ".join(where) if where else "")
                        + f" order by seq {order} limit %s"
                    ),
                    [*params, count + 1],
                )
            ).fetchall()
        next_cursor = rows[count - 1]["seq"] if len(rows) > count else None
        return [row["message"] for row in rows[:count]], next_cursor

    async def get_dlq(self, dlq_id: str) -> dict:
        async with self.pool.connection() as conn:
            row = await (
                await conn.execute(
                    self._sql("select message from {s}.dlq where dlq_id = %s"), (dlq_id,)
                )
            ).fetchone()
        if row is None:
            raise NotFound(f"dlq message {dlq_id} not found")
        return row["message"]

    async def delete_dlq(self, dlq_ids: list[str]) -> int:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                self._sql("delete from {s}.dlq where dlq_id = any(%s::text[])"), (dlq_ids,)
            )
        return cur.rowcount

    async def list_events(
        self, *, filters: dict, message_ids: list[str], cursor: int | None, count: int
    ) -> tuple[list[dict], int | None]:
        where, params = self._filters(
            filters,
            {
                "messageId": "message_id = %s",
                "state": "state = %s",
                "url": "url = %s",
                "scheduleId": "schedule_id = %s",
                "label": "label = %s",
                "fromDate": "time >= to_timestamp(%s / 1000.0)",
                "toDate": "time <= to_timestamp(%s / 1000.0)",
            },
        )
        if message_ids:
            where.append("message_id = any(%s::text[])")
            params.append(message_ids)
        if cursor is not None:
            where.append("id < %s")
            params.append(cursor)
        async with self.pool.connection() as conn:
            rows = await (
                await conn.execute(
                    self._sql(
                        "select * from {s}.events"
                        + (" where " + " and ".join(where) if where else "")
                        + " order by id desc limit %s"
                    ),
                    [*params, count + 1],
                )
            ).fetchall()
        next_cursor = rows[count - 1]["id"] if len(rows) > count else None
        return [event_json(row) for row in rows[:count]], next_cursor

    @staticmethod
    def _filters(given: dict, allowed: dict[str, str]) -> tuple[list[str], list]:
        where, params = [], []
        for name, clause in allowed.items():
            if given.get(name) not in (None, ""):
                where.append(clause)
                value = given[name]
                if name in ("responseStatus", "fromDate", "toDate"):
                    if not value.isdigit():
                        raise BadRequest(f"invalid {name}: {value!r}")
                    value = int(value)
                params.append(value)
        return where, params

    async def counts(self) -> dict:
        async with self.pool.connection() as conn:
            return await (
                await conn.execute(
                    self._sql(
                        "select (select count(*) from {s}.messages) as queued,"
                        " (select count(*) from {s}.dlq) as dlq,"
                        " (select count(*) from {s}.schedules) as schedules"
                    )
                )
            ).fetchone()
