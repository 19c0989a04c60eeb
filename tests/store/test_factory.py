"""open_ledger: one URL names one backend; anything else is a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from megaflow.core.errors import InvalidRequestError
from megaflow.store.etcd import EtcdLedger
from megaflow.store.factory import open_ledger
from megaflow.store.redis import RedisLedger
from megaflow.store.sqlite import SqliteLedger


def test_sqlite_urls_and_plain_paths(tmp_path: Path) -> None:
    by_url = open_ledger(f"sqlite://{tmp_path}/a.sqlite")
    assert isinstance(by_url, SqliteLedger) and by_url.path == tmp_path / "a.sqlite"
    by_path = open_ledger("relative/ledger.sqlite")
    assert isinstance(by_path, SqliteLedger) and by_path.path == Path("relative/ledger.sqlite")


def test_redis_and_etcd_urls() -> None:
    redis = open_ledger("redis://127.0.0.1:6380/2")
    assert isinstance(redis, RedisLedger) and redis.url == "redis://127.0.0.1:6380/2"
    etcd = open_ledger("etcd://localhost:2379")
    assert isinstance(etcd, EtcdLedger) and (etcd.host, etcd.port) == ("localhost", 2379)


@pytest.mark.parametrize(
    "url",
    [
        "",
        "sqlite://relative.sqlite",
        "redis://127.0.0.1",
        "redis://127.0.0.1:6379/zero",
        "etcd://127.0.0.1",
        "etcd://127.0.0.1:2379/path",
        "mongodb://127.0.0.1:27017",
    ],
)
def test_anything_else_is_rejected_naming_the_accepted_forms(url: str) -> None:
    with pytest.raises(InvalidRequestError, match=r"sqlite|redis|etcd"):
        open_ledger(url)


def test_an_unknown_scheme_lists_every_accepted_form() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        open_ledger("s3://bucket/ledger")
    for form in ("sqlite:///", "redis://HOST:PORT", "etcd://HOST:PORT", "path"):
        assert form in str(caught.value)
