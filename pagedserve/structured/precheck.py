"""What the compiler refuses before llguidance starts: the shapes it cannot bound itself.

llguidance stops most runaway work with its own fuel, but two costs grow before or beyond it:

* JSON schemas: its JSON compiler takes time quadratic in an object's property count
  (10,000 optional properties take tens of seconds, and a compile cannot be interrupted).
  We count the properties of every object schema (OpenAI allows 5000 in all).
* Counted repetitions in regular expressions: ``(a{1000}){3000}`` is 17 bytes that spell a
  run of three million forced bytes. Where the run starts the answer, the compiler's first
  mask meets it within its fuel; one nested in an object is met only when the answer gets
  there, so we bound what each pattern's repetitions can spell: ``a{m,n}`` spells n times
  what ``a`` does, ``a*`` and ``a+`` their minimum (0 and 1), alternatives the longest.

Patterns are found where clients put them: the regex of ``structured_outputs.regex``, a
schema's ``pattern`` and ``patternProperties``, a Lark grammar's ``/regex/`` terminals and its
``%json`` schemas (which is how forced tool calls embed their parameters). A repetition written
with Lark's own operators (``"a"~1000``) in a rule the answer reaches later is not counted:
it meets llguidance's per-step fuel when reached, and the request ends with an error.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from pagedserve.structured.constraint import Constraint
from pagedserve.structured.limits import GrammarLimits

# keywords whose value is data, not a schema: a "pattern" key inside them is not a pattern
_DATA_KEYS = frozenset({"enum", "const", "default", "examples", "example", "description",
                        "title", "required"})


class TooComplex(ValueError):
    """A constraint over one of the limits; the message says which, without the grammar."""


def check(constraint: Constraint, limits: GrammarLimits) -> None:
    """Raise :class:`TooComplex` if ``constraint`` is over a limit llguidance does not bound."""
    schemas, patterns = _contents(constraint)
    properties = sum(_num_properties(s) for s in schemas)
    if properties > limits.max_schema_properties:
        raise TooComplex(f"the schema has {properties} object properties, over the limit of "
                         f"{limits.max_schema_properties} (pagedserve serve "
                         "--grammar-max-schema-properties)")
    patterns += [p for s in schemas for p in _schema_patterns(s)]
    for pattern in patterns:
        span = regex_span(pattern, limits.max_regex_repeat)
        if span > limits.max_regex_repeat:
            raise TooComplex(f"a regular expression's repetitions spell more than "
                             f"{limits.max_regex_repeat} characters (pagedserve serve "
                             "--grammar-max-regex-repeat)")


def _contents(constraint: Constraint) -> tuple[list[Any], list[str]]:
    """The JSON schemas and the regular expressions a constraint holds."""
    if constraint.kind == "json_schema":
        return [json.loads(constraint.spec)], []
    if constraint.kind == "regex":
        return [], [constraint.spec]
    if constraint.kind == "grammar":
        return _lark_contents(constraint.spec)
    return [], []


def _lark_contents(text: str) -> tuple[list[Any], list[str]]:
    """``%json {...}`` schemas and ``/.../`` regexes of a Lark grammar (GBNF has neither).

    Strings and ``//`` comments are skipped; a ``/`` inside a Lark regex is written ``\\/``.
    """
    schemas, patterns = [], []
    decoder = json.JSONDecoder()
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            i = _skip_quoted(text, i, '"')
        elif text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif c == "/":
            end = _skip_quoted(text, i, "/")
            patterns.append(text[i + 1:end - 1].replace("\\/", "/"))
            i = end
        elif text.startswith("%json", i):
            start = text.find("{", i)
            if start < 0:
                break
            try:
                schema, i = decoder.raw_decode(text, start)
            except (ValueError, RecursionError):
                i = start + 1  # not JSON: llguidance says what is wrong with it
            else:
                schemas.append(schema)
        else:
            i += 1
    return schemas, patterns


def _skip_quoted(text: str, start: int, quote: str) -> int:
    """The index after the closing ``quote`` of the literal opening at ``start``."""
    i = start + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
        elif text[i] == quote or text[i] == "\n":
            return i + 1
        else:
            i += 1
    return i


def _schemas(schema: Any) -> Iterator[dict]:
    """Every schema object in ``schema``, depth first, without recursion."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            yield node
            for key, value in node.items():
                if key in ("properties", "patternProperties", "$defs", "definitions",
                           "dependentSchemas") and isinstance(value, dict):
                    stack.extend(value.values())
                elif key not in _DATA_KEYS:
                    stack.append(value)


def _num_properties(schema: Any) -> int:
    return sum(len(s["properties"]) for s in _schemas(schema)
               if isinstance(s.get("properties"), dict))


def _schema_patterns(schema: Any) -> Iterator[str]:
    for s in _schemas(schema):
        if isinstance(s.get("pattern"), str):
            yield s["pattern"]
        if isinstance(s.get("patternProperties"), dict):
            yield from s["patternProperties"]


def regex_span(pattern: str, cap: int) -> int:
    """The most characters ``pattern``'s counted repetitions can spell (unbounded ``*`` and
    ``+`` count their minimum); any value over ``cap`` may be returned as ``cap + 1``.

    A scan of the syntax shared by Rust's and Python's regexes: groups, alternatives, classes,
    escapes and quantifiers; whatever it does not know counts as one character.
    """
    scan = _RegexSpan(pattern, cap)
    longest = scan.alternatives()
    while scan.i < len(pattern):  # past an unbalanced ")": llguidance will refuse the regex
        scan.i += 1
        longest = max(longest, scan.alternatives())
    return longest


class _RegexSpan:
    def __init__(self, pattern: str, cap: int) -> None:
        self.s, self.i, self.cap = pattern, 0, cap

    def alternatives(self) -> int:
        longest = self.sequence()
        while self.i < len(self.s) and self.s[self.i] == "|":
            self.i += 1
            longest = max(longest, self.sequence())
        return longest

    def sequence(self) -> int:
        total = 0
        while self.i < len(self.s) and self.s[self.i] not in "|)":
            total = min(total + self.quantified(self.atom()), self.cap + 1)
        return total

    def atom(self) -> int:
        s, c = self.s, self.s[self.i]
        self.i += 1
        if c == "(":
            if s.startswith("?", self.i):  # (?:...), (?P<name>...), (?i), (?i:...)
                while self.i < len(s) and s[self.i] not in ":)":
                    self.i += 1
                if s.startswith(")", self.i):
                    self.i += 1
                    return 0
                self.i += 1
            inner = self.alternatives()
            self.i += 1  # ")"
            return inner
        if c == "[":
            self._skip_class()
            return 1
        if c == "\\":
            self._skip_escape()
            return 1
        return 0 if c in "^$" else 1

    def quantified(self, length: int) -> int:
        s = self.s
        while self.i < len(s):
            c = s[self.i]
            if c in "*?":
                times = 0 if c == "*" else 1
            elif c == "+":
                times = 1
            elif c == "{" and (bounds := self._bounds()) is not None:
                times = bounds
            else:
                break
            self.i += 1
            if self.i < len(s) and s[self.i] in "?+":  # lazy or possessive
                self.i += 1
            length = min(length * times, self.cap + 1)
        return length

    def _bounds(self) -> int | None:
        """At ``{m}``, ``{m,}`` or ``{m,n}``: the count it allows (n, or m when unbounded),
        leaving ``i`` on the ``}``; None (``i`` unmoved) where ``{`` is a literal."""
        end = self.s.find("}", self.i)
        if end < 0:
            return None
        low, _, high = self.s[self.i + 1:end].partition(",")
        low, high = low.strip(), high.strip()
        if not low.isdigit() or (high and not high.isdigit()):
            return None
        self.i = end
        return int(high) if high else int(low)

    def _skip_class(self) -> None:
        s, depth = self.s, 1
        if s.startswith("^", self.i):
            self.i += 1
        if s.startswith("]", self.i):  # a leading ] is a member
            self.i += 1
        while self.i < len(s) and depth:
            c = s[self.i]
            if c == "\\":
                self.i += 1
            elif c == "[":
                depth += 1  # Rust's nested classes and [:alpha:]
            elif c == "]":
                depth -= 1
            self.i += 1

    def _skip_escape(self) -> None:
        s = self.s
        if self.i < len(s):
            letter = s[self.i]
            self.i += 1
            if letter in "pPxu" and s.startswith("{", self.i):  # \p{L}, \x{263a}, \u{...}
                end = s.find("}", self.i)
                self.i = len(s) if end < 0 else end + 1
