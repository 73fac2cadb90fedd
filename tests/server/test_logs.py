"""Access-log lines never show a key, however the client spelled its parameter."""

from __future__ import annotations

import pytest

from server.logs import REDACTED, redact


@pytest.mark.parametrize(("line", "expected"), [
    ("POST /predict?task=mnist&api_key=s3cr3t HTTP/1.1",
     f"POST /predict?task=mnist&api_key={REDACTED} HTTP/1.1"),
    ("GET /tasks?X-API-KEY=abc&top_k=2", f"GET /tasks?X-API-KEY={REDACTED}&top_k=2"),
    ("GET /tasks?Token=abc;Auth=def", f"GET /tasks?Token={REDACTED};Auth={REDACTED}"),
    ("GET /x?PassWord=hunter2", f"GET /x?PassWord={REDACTED}"),
    ("POST /predict?task=mnist&top_k=3 HTTP/1.1", "POST /predict?task=mnist&top_k=3 HTTP/1.1"),
    ("GET /keys", "GET /keys"),
])
def test_key_like_query_values_are_redacted(line: str, expected: str) -> None:
    assert redact(line) == expected


def test_a_known_secret_is_redacted_anywhere() -> None:
    assert redact("GET /predict?task=mnist HTTP/1.1 zq9-operator", ["zq9-operator"]) == \
        f"GET /predict?task=mnist HTTP/1.1 {REDACTED}"
