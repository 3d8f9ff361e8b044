"""URI Templates (RFC 6570, levels 1-4) as patterns: does a string match what a template expands to? No I/O.

The Mercure hub (:mod:`herald.mercure`) takes templates as topic selectors:
``https://example.com/books/{id}`` selects ``https://example.com/books/1``. A string matches when it
is one of the template's possible expansions, read as the reference hub reads it (dunglas/mercure
matches with the regular expression that yosida95/uritemplate derives from a template):

* a literal matches itself;
* an expression matches nothing at all (every variable undefined), or its operator's prefix
  (``#``, ``.``, ``/``, ``;``, ``?``, ``&``; none for ``{var}`` and ``{+var}``) followed by values
  separated by the operator's separator (``,``, ``.``, ``/``, ``;``, ``&``): at most one value per
  variable, any number when one is exploded (``{/path*}``);
* a value is a run of the operator's characters (unreserved, plus ``,``, plus ``=`` for named or
  exploded variables; unreserved and reserved for ``+`` and ``#``) and percent-encoded triplets.

Variable names, prefix lengths (``{var:3}``) and the order of named pairs are not checked, as the
reference hub does not check them either.

A string that is not a valid template (``{`` unclosed, a space, an operator RFC 6570 reserves)
compiles to ``None``: a selector then matches only itself. Matching takes time linear in the
string's length times the template's size (a set of positions is advanced piece by piece, as a
Thompson automaton would), whatever the template: selectors are chosen by whoever subscribes, and a
backtracking regular expression would let ``{a}{b}{c}{d}!`` take exponential time on a long topic.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
RESERVED = frozenset(":/?#[]@!$&'()*+,;=")
_HEX = frozenset(string.hexdigits)
_VARCHAR = frozenset(string.ascii_letters + string.digits + "_")
_NAMED = frozenset(";?&")
# operator → (prefix, separator, reserved characters allowed in values)
_OPERATORS: dict[str, tuple[str, str, bool]] = {
    "": ("", ",", False),
    "+": ("", ",", True),
    "#": ("#", ",", True),
    ".": (".", ".", False),
    "/": ("/", "/", False),
    ";": (";", ";", False),
    "?": ("?", "&", False),
    "&": ("&", "&", False),
}
_RESERVED_OPERATORS = frozenset("=,!@|")
MAX_PREFIX = 9999


class TemplateError(ValueError):
    """The string is not a URI Template; the message says where."""


@dataclass(frozen=True, slots=True)
class _Expression:
    """What one ``{…}`` may expand to."""

    prefix: str
    separator: str
    first: frozenset[str]  # characters of the first value
    rest: frozenset[str]  # characters of the values after it
    more: int | None  # values allowed after the first (None: any number, a variable is exploded)

    def advance(self, value: str, starts: set[int]) -> set[int]:
        """Where this expression can end in ``value``, having begun at any of ``starts``."""
        ends = set(starts)  # every variable undefined: the expression expands to nothing
        if self.prefix:
            starts = {p + 1 for p in starts if value.startswith(self.prefix, p)}
        current = _run(value, starts, self.first)
        ends |= current
        if self.more is None:
            # (separator value)* is any run that starts with a separator and holds values and separators
            ends |= _run(value, _after(value, current, self.separator), self.rest | {self.separator})
            return ends
        for _ in range(self.more):
            current = _run(value, _after(value, current, self.separator), self.rest)
            if not current:
                break
            ends |= current
        return ends


def _after(value: str, positions: Iterable[int], separator: str) -> set[int]:
    return {p + 1 for p in positions if value.startswith(separator, p)}


def _run(value: str, starts: Iterable[int], allowed: frozenset[str]) -> set[int]:
    """Every position reached from ``starts`` over characters of ``allowed`` and percent-encoded triplets.

    From any position at most one step is possible (``%`` is never an allowed character), so each
    position is visited once whatever the number of starts: linear in ``len(value)``.
    """
    reached: set[int] = set()
    last = len(value)
    for i in starts:
        while i not in reached:
            reached.add(i)
            if i < last and value[i] in allowed:
                i += 1
            elif i + 2 < last and value[i] == "%" and value[i + 1] in _HEX and value[i + 2] in _HEX:
                i += 3
            else:
                break
    return reached


class Template:
    """A compiled URI Template: :meth:`matches` says whether a string is one of its expansions."""

    __slots__ = ("_parts", "source")

    def __init__(self, source: str) -> None:
        """Parse ``source``; :class:`TemplateError` when it is not a URI Template."""
        self.source = source
        self._parts: tuple[str | _Expression, ...] = tuple(_parse(source))

    def __repr__(self) -> str:
        return f"Template({self.source!r})"

    def matches(self, value: str) -> bool:
        """Whether ``value`` is one of the strings the template can expand to."""
        positions = {0}
        for part in self._parts:
            if isinstance(part, str):
                positions = {p + len(part) for p in positions if value.startswith(part, p)}
            else:
                positions = part.advance(value, positions)
            if not positions:
                return False
        return len(value) in positions


@lru_cache(maxsize=4096)
def compile_template(source: str) -> Template | None:
    """The template of ``source``, or ``None`` when it is not one (then it can only equal a string)."""
    try:
        return Template(source)
    except TemplateError:
        return None


def _parse(source: str) -> list[str | _Expression]:
    parts: list[str | _Expression] = []
    i = 0
    while i < len(source):
        if source[i] == "{":
            end = source.find("}", i)
            if end < 0:
                raise TemplateError(f"'{{' at {i} is never closed")
            parts.append(_expression(source[i + 1:end], i))
            i = end + 1
        else:
            end = source.find("{", i)
            end = len(source) if end < 0 else end
            parts.append(_literal(source[i:end], i))
            i = end
    return parts


def _literal(text: str, at: int) -> str:
    i = 0
    while i < len(text):
        char = text[i]
        if char == "%":
            if i + 2 >= len(text) or text[i + 1] not in _HEX or text[i + 2] not in _HEX:
                raise TemplateError(f"'%' at {at + i} does not start a percent-encoded triplet")
            i += 3
            continue
        if not _literal_char(char):
            raise TemplateError(f"{char!r} at {at + i} is not allowed in a URI Template")
        i += 1
    return text


def _literal_char(char: str) -> bool:
    code = ord(char)
    if code < 0x80:
        # RFC 6570 literals: any visible ASCII but " ' % < > \ ^ ` { | } (and '%' only as a triplet)
        return 0x21 <= code <= 0x7E and char not in "\"'%<>\\^`{|}"
    if code < 0x10000:  # ucschar and iprivate of the BMP
        return 0xA0 <= code <= 0xD7FF or 0xE000 <= code <= 0xFDCF or 0xFDF0 <= code <= 0xFFEF
    return (code & 0xFFFF) <= 0xFFFD and not 0xE0000 <= code <= 0xE0FFF


def _expression(body: str, at: int) -> _Expression:
    if not body:
        raise TemplateError(f"empty expression at {at}")
    operator = body[0] if body[0] in _OPERATORS or body[0] in _RESERVED_OPERATORS else ""
    if operator in _RESERVED_OPERATORS:
        raise TemplateError(f"operator {operator!r} at {at} is reserved by RFC 6570")
    exploded = [_varspec(spec, at) for spec in body[len(operator):].split(",")]
    prefix, separator, reserved = _OPERATORS[operator]
    named = operator in _NAMED
    return _Expression(
        prefix=prefix,
        separator=separator,
        first=_value_chars(reserved, named or exploded[0]),
        rest=_value_chars(reserved, named or any(exploded)),
        more=None if any(exploded) else len(exploded) - 1,
    )


def _value_chars(reserved: bool, named: bool) -> frozenset[str]:
    if reserved:
        return UNRESERVED | RESERVED
    # a list's items are joined by "," and an exploded map's pairs by "=", whatever the operator
    return UNRESERVED | ({",", "="} if named else {","})


def _varspec(spec: str, at: int) -> bool:
    """Validate one variable (``name``, ``name*`` or ``name:3``); whether it is exploded."""
    name, colon, length = spec.partition(":")
    exploded = not colon and name.endswith("*")
    if exploded:
        name = name[:-1]
    if colon and not (length.isascii() and length.isdigit() and length[0] != "0" and int(length) <= MAX_PREFIX):
        raise TemplateError(f"prefix {length!r} at {at} must be a number from 1 to {MAX_PREFIX}")
    if not _varname(name):
        raise TemplateError(f"variable name {name!r} at {at} is not a valid RFC 6570 varname")
    return exploded


def _varname(name: str) -> bool:
    # varname = varchar *( ["."] varchar ), varchar = ALPHA / DIGIT / "_" / pct-encoded
    i, previous_dot = 0, True
    while i < len(name):
        char = name[i]
        if char == "." and not previous_dot:
            previous_dot = True
            i += 1
            continue
        if char == "%" and i + 2 < len(name) and name[i + 1] in _HEX and name[i + 2] in _HEX:
            i += 3
        elif char in _VARCHAR:
            i += 1
        else:
            return False
        previous_dot = False
    return bool(name) and not previous_dot
