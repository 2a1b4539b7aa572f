"""What tests read back from a live system: a form's row, its audit trail, a QStash message."""

from __future__ import annotations


def form_row(conn, form_id: str) -> dict:
    from psycopg.rows import dict_row

    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute("select * from forms where id = %s", (form_id,)).fetchone()


def form_events(conn, form_id: str) -> list[str]:
    rows = conn.execute(
        "select event from form_call_events where form_id = %s order by id", (form_id,)
    ).fetchall()
    return [r[0] for r in rows]


def qstash_message(url: str, token: str, message_id: str) -> dict | None:
    """A message as the local QStash holds it (None once delivered, cancelled or unknown)."""
    import httpx

    answer = httpx.get(
        f"{url}/v2/messages/{message_id}", headers={"Authorization": f"Bearer {token}"}
    )
    return answer.json() if answer.status_code == 200 else None
