"""The fast word splitter agrees with shlex."""

from __future__ import annotations

import shlex

import pytest
from hypothesis import given
from hypothesis import strategies as st

from megaflow.core.shell import split_words


@pytest.mark.parametrize(
    "command",
    ["cat src/a.py", "  ls\t-la  ", "grep -rn 'def f(' .", 'echo "a b"', "a\\ b", "x\x0by", "é ö"],
)
def test_agrees_with_shlex_on_examples(command: str) -> None:
    assert split_words(command) == shlex.split(command)


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40))
def test_agrees_with_shlex_everywhere(command: str) -> None:
    try:
        expected = shlex.split(command)
    except ValueError:
        with pytest.raises(ValueError):
            split_words(command)
        return
    assert split_words(command) == expected
