"""`formcall status` prints JSON as readable text: no Python reprs (True, None, {...})."""

from formcall_cli.status import _text, as_text


def test_event_details_read_as_text():
    detail = {"attempt_refunded": False, "waiting_for_line": True, "error": None, "n": 2}
    assert _text(detail) == "attempt_refunded: no, waiting_for_line: yes, n: 2"


def test_nested_json_reads_as_text():
    assert as_text({"a": {"b": [1, None]}, "c": {}}) == "a: (b: [1, -]), c: -"
