"""Log set-up of the server: one line format, the level from ``XMA2_LOG_LEVEL``, and
access-log lines that never show an API key."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"
"""Greppable ``key=value`` prefix; messages carry their own ``key=value`` fields."""

_SECRET_QUERY = re.compile(
    r"((?:^|[?&;])[^=&;\s]*(?:key|token|secret|password|auth)[^=&;\s]*=)[^&;\s]*",
    re.IGNORECASE)
REDACTED = "***"


_SECRET_WORDS = ("key", "token", "secret", "password", "auth")
"""What every match of ``_SECRET_QUERY`` contains: a cheap test before the regex, which
would otherwise run on every access-log line."""


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with the values of key-like query parameters and each secret replaced."""
    lowered = text.lower()
    if any(word in lowered for word in _SECRET_WORDS):
        text = _SECRET_QUERY.sub(rf"\g<1>{REDACTED}", text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


class RedactSecrets(logging.Filter):
    """Uvicorn logs each request's path with its query string; a client that sends the key
    as ``?api_key=...`` (which is never accepted) must not leave it in the logs."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a, self.secrets) if isinstance(a, str) else a
                                for a in record.args)
        elif isinstance(record.msg, str):
            record.msg = redact(record.msg, self.secrets)
        return True


def configure(level: str, secrets: Iterable[str] = ()) -> None:
    """The server's log level and format, and redaction on the access log."""
    logging.basicConfig(level=level.upper(), format=FORMAT, force=True)
    for noisy in ("PIL", "multipart", "python_multipart"):  # per-chunk debug lines
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.getLevelName(
            level.upper())))
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets(secrets))
