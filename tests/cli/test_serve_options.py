"""Options of `megaflow serve env` that configure the Environment Service."""

from __future__ import annotations

import pytest

from megaflow.cli.commands import parse_warm_pool


def test_warm_pool_pairs_are_parsed() -> None:
    assert parse_warm_pool(["host=8", "registry:127.0.0.1:5000/py:3.11=2"]) == {
        "host": 8,
        "registry:127.0.0.1:5000/py:3.11": 2,
    }


@pytest.mark.parametrize("bad", ["host", "=3", "host=x", "host=-1"])
def test_bad_warm_pool_pairs_say_what_is_wrong(bad: str) -> None:
    with pytest.raises(ValueError, match="expected IMAGE=N"):
        parse_warm_pool([bad])
