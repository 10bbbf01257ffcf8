"""Log records carry structured context (`extra={"upload_id": ..., "part": ...}`); show it."""

from __future__ import annotations

import logging

CONTEXT_KEYS = ("upload_id", "part", "parts", "etag")


class ContextFormatter(logging.Formatter):
    """Appends ` [upload_id=... part=...]` for the context keys a record carries."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record)
        context = " ".join(f"{key}={getattr(record, key)}" for key in CONTEXT_KEYS if hasattr(record, key))
        return f"{text} [{context}]" if context else text


def add_context(logger: logging.Logger) -> None:
    for handler in logger.handlers:
        if not isinstance(handler.formatter, ContextFormatter):
            handler.setFormatter(ContextFormatter(handler.formatter or logging.Formatter()))
