"""Open a ledger from a URL: ``megaflow serve scheduler --store URL``."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from megaflow.core.errors import InvalidRequestError
from megaflow.store.ledger import TaskLedger

ACCEPTED = (
    "sqlite:///ABSOLUTE/PATH, a plain file path (SQLite), redis://HOST:PORT[/DB], etcd://HOST:PORT"
)


def open_ledger(url: str) -> TaskLedger:
    """The ledger ``url`` names (not opened yet: call ``await ledger.open()``)."""
    text = str(url).strip()
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme == "":
        if not text:
            raise InvalidRequestError(f"empty store URL; accepted: {ACCEPTED}")
        from megaflow.store.sqlite import SqliteLedger

        return SqliteLedger(Path(text))
    if scheme == "sqlite":
        path = text[len("sqlite://") :]
        if not path.startswith("/") or path == "/":
            raise InvalidRequestError(
                f"sqlite URL needs an absolute path (sqlite:///abs/path), got {url!r}"
            )
        from megaflow.store.sqlite import SqliteLedger

        return SqliteLedger(Path(path))
    parts = urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        port = None
    if scheme in ("redis", "etcd") and (not parts.hostname or port is None):
        raise InvalidRequestError(f"{scheme} URL needs a host and a port, got {url!r}")
    if scheme == "redis":
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise InvalidRequestError(f"redis database must be a number, got {url!r}")
        from megaflow.store.redis import RedisLedger

        return RedisLedger(text)
    if scheme == "etcd":
        if parts.path.strip("/"):
            raise InvalidRequestError(f"etcd URL takes no path, got {url!r}")
        from megaflow.store.etcd import EtcdLedger

        return EtcdLedger(f"etcd://{parts.hostname}:{port}")
    raise InvalidRequestError(f"unknown store URL {url!r}; accepted: {ACCEPTED}")
