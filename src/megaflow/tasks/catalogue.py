"""The function catalogue behind the `swe-synth` task family.

Each `FunctionTemplate` is one small Python function with one *target* line in
three versions: the correct line, the buggy line injected into a task, and a
plausible "decoy" fix that still fails the hidden tests. Every target line is
distinct across the catalogue, so a line identifies its function.

Parameter names vary per task (`variants`); lines refer to them as `$name`
placeholders (`string.Template`). `locate_bug` finds a function's buggy line in
source text (a file, or a `cat` of it), which the task generator's reference
patches and the simulated policy both use.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from string import Template

TARGET = "@"  # the body line standing for the target line


@dataclass(frozen=True)
class FunctionTemplate:
    """One function of the catalogue, with its buggy and decoy target lines."""

    name: str
    doc: str
    placeholders: tuple[str, ...]
    variants: tuple[tuple[str, ...], ...]
    body: tuple[str, ...]  # indented lines; the line `TARGET` (after indentation) is the target
    correct: str
    buggy: str
    decoy: str
    cases: tuple[tuple[str, str], ...]  # (argument list source, expected result source)
    example: int  # the case quoted in the problem statement; the buggy line fails it
    buggy_result: str  # repr of what the buggy function returns on the example

    @property
    def target_indent(self) -> str:
        """The whitespace before the target line inside the function."""
        for line in self.body:
            if line.strip() == TARGET:
                return line[: len(line) - len(line.lstrip())]
        raise AssertionError(f"template {self.name} has no target line")

    def mapping(self, params: tuple[str, ...]) -> dict[str, str]:
        """Placeholder -> actual parameter name."""
        return dict(zip(self.placeholders, params, strict=True))

    def line(self, which: str, params: tuple[str, ...]) -> str:
        """The target statement `which` ("correct" | "buggy" | "decoy"), without indentation."""
        text: str = getattr(self, which)
        return _substitute(text, self.placeholders, params)

    def source(self, params: tuple[str, ...], which: str = "correct") -> str:
        """The whole function, with the target line in version `which`."""
        lines = [f"def {self.name}({', '.join(params)}):", f'    """{self.doc}"""']
        for raw in self.body:
            if raw.strip() == TARGET:
                lines.append(self.target_indent + self.line(which, params))
            else:
                lines.append(_substitute(raw, self.placeholders, params))
        return "\n".join(lines) + "\n"


@functools.lru_cache(maxsize=1 << 16)
def _substitute(text: str, placeholders: tuple[str, ...], params: tuple[str, ...]) -> str:
    """`text` with its placeholders replaced by `params` (memoised: the policy, the scorer
    and the task generator render the same few lines over and over)."""
    return Template(text).substitute(dict(zip(placeholders, params, strict=True)))


def _t(
    name: str,
    doc: str,
    variants: tuple[tuple[str, ...], ...],
    body: tuple[str, ...],
    lines: tuple[str, str, str],
    cases: tuple[tuple[str, str], ...],
    example: int,
    buggy_result: str,
) -> FunctionTemplate:
    correct, buggy, decoy = lines
    return FunctionTemplate(
        name=name,
        doc=doc,
        placeholders=variants[0],
        variants=variants,
        body=body,
        correct=correct,
        buggy=buggy,
        decoy=decoy,
        cases=cases,
        example=example,
        buggy_result=buggy_result,
    )


CATALOGUE: tuple[FunctionTemplate, ...] = (
    _t(
        "add",
        "Return the sum of two numbers.",
        (("a", "b"), ("x", "y"), ("lhs", "rhs"), ("left", "right")),
        ("    @",),
        ("return $a + $b", "return $a - $b", "return abs($a) + abs($b)"),
        (("2, 3", "5"), ("0, 0", "0"), ("-2, 3", "1"), ("10, -4", "6"), ("-5, -5", "-10")),
        0,
        "-1",
    ),
    _t(
        "max_of",
        "Return the largest element of a non-empty list.",
        (("values",), ("items",), ("nums",), ("seq",)),
        (
            "    best = $values[0]",
            "    for v in $values[1:]:",
            "        @",
            "            best = v",
            "    return best",
        ),
        ("if v > best:", "if v < best:", "if abs(v) > abs(best):"),
        (
            ("[3, 9, 4]", "9"),
            ("[7]", "7"),
            ("[-10, 2]", "2"),
            ("[-3, -8, -1]", "-1"),
            ("[5, 5, 1]", "5"),
        ),
        0,
        "3",
    ),
    _t(
        "is_even",
        "Return True if the integer is even.",
        (("n",), ("k",), ("num",), ("number",)),
        ("    @",),
        ("return $n % 2 == 0", "return $n % 2 == 1", "return $n % 2 != 1 and $n > 0"),
        (("4", "True"), ("7", "False"), ("0", "True"), ("-2", "True"), ("-3", "False")),
        0,
        "False",
    ),
    _t(
        "factorial",
        "Return n! for a non-negative integer n.",
        (("n",), ("k",), ("num",), ("count",)),
        ("    result = 1", "    @", "        result *= i", "    return result"),
        ("for i in range(2, $n + 1):", "for i in range(2, $n):", "for i in range(2, $n + 2):"),
        (("5", "120"), ("0", "1"), ("1", "1"), ("2", "2"), ("6", "720")),
        0,
        "24",
    ),
    _t(
        "reverse_string",
        "Return the string reversed.",
        (("s",), ("text",), ("word",), ("chars",)),
        ("    @",),
        ("return $s[::-1]", "return $s[::1]", "return $s[:0:-1]"),
        (("'abc'", "'cba'"), ("''", "''"), ("'a'", "'a'"), ("'hello'", "'olleh'")),
        0,
        "'abc'",
    ),
    _t(
        "clamp",
        "Limit the value to the closed interval between the lower and upper bound.",
        (
            ("x", "lo", "hi"),
            ("value", "low", "high"),
            ("v", "floor", "ceiling"),
            ("n", "smallest", "largest"),
        ),
        ("    @",),
        (
            "return max($lo, min($x, $hi))",
            "return min($lo, max($x, $hi))",
            "return max($lo, min($x, $hi - 1))",
        ),
        (
            ("5, 0, 10", "5"),
            ("-3, 0, 10", "0"),
            ("15, 0, 10", "10"),
            ("10, 0, 10", "10"),
            ("0, 0, 10", "0"),
        ),
        0,
        "0",
    ),
    _t(
        "mean",
        "Return the arithmetic mean of a non-empty list of numbers.",
        (("values",), ("items",), ("nums",), ("data",)),
        ("    @",),
        (
            "return sum($values) / len($values)",
            "return sum($values) / (len($values) + 1)",
            "return sum($values) // len($values)",
        ),
        (
            ("[2, 4, 6]", "4.0"),
            ("[1, 2]", "1.5"),
            ("[5]", "5.0"),
            ("[-1, 1]", "0.0"),
            ("[1, 2, 3, 4]", "2.5"),
        ),
        0,
        "3.0",
    ),
    _t(
        "count_vowels",
        "Return how many vowels (a, e, i, o, u; any case) the text contains.",
        (("s",), ("text",), ("word",), ("phrase",)),
        (
            "    count = 0",
            "    for ch in $s.lower():",
            "        @",
            "            count += 1",
            "    return count",
        ),
        ("if ch in 'aeiou':", "if ch in 'aeio':", "if ch in 'aeiouy':"),
        (("'queue'", "4"), ("'rhythm'", "0"), ("'AEIOU'", "5"), ("''", "0"), ("'Umbrella'", "3")),
        0,
        "2",
    ),
    _t(
        "fib",
        "Return the n-th Fibonacci number (fib(0) == 0, fib(1) == 1).",
        (("n",), ("k",), ("index",), ("position",)),
        ("    a, b = 0, 1", "    for _ in range($n):", "        @", "    return a"),
        ("a, b = b, a + b", "a, b = b, a - b", "a, b = b, abs(a - b)"),
        (("6", "8"), ("0", "0"), ("1", "1"), ("2", "1"), ("10", "55")),
        0,
        "-8",
    ),
    _t(
        "gcd",
        "Return the greatest common divisor of two non-negative integers.",
        (("a", "b"), ("x", "y"), ("m", "n"), ("p", "q")),
        ("    while $b:", "        @", "    return $a"),
        ("$a, $b = $b, $a % $b", "$a, $b = $b, $a // $b", "$a, $b = $b, $b % $a"),
        (("12, 18", "6"), ("18, 12", "6"), ("7, 5", "1"), ("0, 9", "9"), ("20, 5", "5")),
        0,
        "18",
    ),
    _t(
        "is_palindrome",
        "Return True if the text reads the same backwards, ignoring case and punctuation.",
        (("s",), ("text",), ("phrase",), ("candidate",)),
        ("    cleaned = [ch.lower() for ch in $s if ch.isalnum()]", "    @"),
        (
            "return cleaned == cleaned[::-1]",
            "return cleaned == sorted(cleaned)",
            "return cleaned[0] == cleaned[-1]",
        ),
        (
            ("'racecar'", "True"),
            ("'rover'", "False"),
            ("'A man, a plan, a canal: Panama'", "True"),
            ("''", "True"),
            ("'abc'", "False"),
        ),
        0,
        "False",
    ),
    _t(
        "sum_of_squares",
        "Return the sum of the squares of the numbers.",
        (("values",), ("items",), ("nums",), ("numbers",)),
        ("    @",),
        (
            "return sum(v * v for v in $values)",
            "return sum(v * 2 for v in $values)",
            "return sum(v ** 2 for v in $values if v > 0)",
        ),
        (("[1, 2, 3]", "14"), ("[]", "0"), ("[-1, 2]", "5"), ("[4]", "16"), ("[-3, -3]", "18")),
        0,
        "12",
    ),
    _t(
        "count_words",
        "Return the number of whitespace-separated words in the text.",
        (("text",), ("s",), ("sentence",), ("line",)),
        ("    @",),
        (
            "return len($text.split())",
            "return len($text.split(' '))",
            "return len($text.split(' ')) - $text.count('  ')",
        ),
        (
            ("'hello  world'", "2"),
            ("''", "0"),
            ("'one'", "1"),
            ("' a b c '", "3"),
            ("'tab\\tseparated words'", "3"),
        ),
        0,
        "3",
    ),
    _t(
        "abs_diff",
        "Return the absolute difference between two numbers.",
        (("a", "b"), ("x", "y"), ("first", "second"), ("u", "w")),
        ("    @",),
        ("return abs($a - $b)", "return abs($a) - abs($b)", "return $b - $a"),
        (("3, 8", "5"), ("8, 3", "5"), ("4, 4", "0"), ("-2, 2", "4")),
        0,
        "-5",
    ),
    _t(
        "celsius_to_fahrenheit",
        "Convert a temperature from degrees Celsius to degrees Fahrenheit.",
        (("c",), ("celsius",), ("degrees",), ("temp",)),
        ("    @",),
        ("return $c * 9 / 5 + 32", "return $c * 5 / 9 + 32", "return $c * 2 + 30"),
        (("10", "50.0"), ("100", "212.0"), ("0", "32.0"), ("-40", "-40.0"), ("25", "77.0")),
        0,
        "37.55555555555556",
    ),
    _t(
        "product",
        "Return the product of the numbers (1 for an empty list).",
        (("values",), ("items",), ("nums",), ("factors",)),
        ("    result = 1", "    for v in $values:", "        @", "    return result"),
        ("result *= v", "result += v", "result = result * abs(v)"),
        (("[2, 3, 4]", "24"), ("[]", "1"), ("[-2, 3]", "-6"), ("[5]", "5"), ("[0, 7]", "0")),
        0,
        "10",
    ),
    _t(
        "index_of",
        "Return the index of the first element equal to target, or -1.",
        (("items", "target"), ("seq", "needle"), ("values", "wanted"), ("elements", "key")),
        (
            "    for i, item in enumerate($items):",
            "        @",
            "            return i",
            "    return -1",
        ),
        ("if item == $target:", "if item != $target:", "if item >= $target:"),
        (
            ("[5, 7, 9], 7", "1"),
            ("[5, 9, 7], 7", "2"),
            ("[], 1", "-1"),
            ("[1, 2], 3", "-1"),
            ("[4, 4], 4", "0"),
        ),
        0,
        "0",
    ),
    _t(
        "capitalize_words",
        "Return the text with each word capitalised and single spaces between words.",
        (("text",), ("s",), ("title",), ("phrase",)),
        ("    @",),
        (
            "return ' '.join(w.capitalize() for w in $text.split())",
            "return ' '.join(w.upper() for w in $text.split())",
            "return $text.title()",
        ),
        (
            ("'hello world'", "'Hello World'"),
            ('"it\'s ok"', '"It\'s Ok"'),
            ("''", "''"),
            ("'  many   spaces '", "'Many Spaces'"),
        ),
        0,
        "'HELLO WORLD'",
    ),
)

BY_NAME: dict[str, FunctionTemplate] = {t.name: t for t in CATALOGUE}


@dataclass(frozen=True)
class BugSite:
    """Where a function's buggy line sits in some text, and its replacements."""

    function: str
    old: str  # the buggy line as seen, with its indentation
    fixed: str  # the correct line, same indentation
    decoy: str  # the decoy line, same indentation


_DEF = re.compile(r"^\s*def (\w+)\((.*)\)\s*(?:->[^:]*)?:")


def locate_bug(text: str, function: str) -> BugSite | None:
    """Find `function`'s buggy target line in `text` (a module, or a `cat` of it).

    Reads the parameter names from the function's `def` line, renders the
    catalogue's buggy line with them and looks for it in the function's body.
    Returns None when the function is unknown, absent, or has no buggy line.
    """
    template = BY_NAME.get(function)
    if template is None:
        return None
    lines = text.splitlines()
    for start, line in enumerate(lines):
        match = _DEF.match(line)
        if match is None or match.group(1) != function:
            continue
        params = tuple(p.split(":")[0].split("=")[0].strip() for p in match.group(2).split(","))
        params = tuple(p for p in params if p)
        if len(params) != len(template.placeholders):
            return None
        buggy = template.line("buggy", params)
        for body_line in lines[start + 1 :]:
            if _DEF.match(body_line):
                break
            at = body_line.find(buggy)
            if at < 0 or body_line[at:].strip() != buggy:
                continue
            prefix = body_line[:at]
            indent = prefix if not prefix.strip() else template.target_indent
            return BugSite(
                function=function,
                old=indent + buggy,
                fixed=indent + template.line("correct", params),
                decoy=indent + template.line("decoy", params),
            )
        return None
    return None
