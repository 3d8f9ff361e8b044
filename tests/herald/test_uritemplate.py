"""URI Templates as topic selectors: which strings each operator's expansions cover, and in linear time."""

from __future__ import annotations

import time

import pytest

from herald.uritemplate import Template, TemplateError, compile_template


def matches(template: str, value: str) -> bool:
    compiled = compile_template(template)
    assert compiled is not None, template
    return compiled.matches(value)


@pytest.mark.parametrize(("template", "value", "expected"), [
    # level 1: a value of unreserved characters and percent-encoded triplets (and "," for lists)
    ("https://example.com/books/{id}", "https://example.com/books/1", True),
    ("https://example.com/books/{id}", "https://example.com/books/", True),  # an undefined variable
    ("https://example.com/books/{id}", "https://example.com/books/a%2Fb", True),
    ("https://example.com/books/{id}", "https://example.com/books/1/chapters", False),
    ("https://example.com/books/{id}", "https://example.com/books/a b", False),
    ("https://example.com/books/{id}", "https://example.com/books/%2", False),  # not a whole triplet
    ("https://example.com/books/{id}", "https://example.com/books/1,2", True),  # a list value
    ("https://example.com/books/{id}", "http://example.com/books/1", False),
    ("https://example.com/books/{id}.jsonld", "https://example.com/books/1.jsonld", True),
    ("{a}{b}", "xyz", True),
    # level 2: "+" and "#" allow reserved characters
    ("https://example.com/{+path}", "https://example.com/a/b?c=d", True),
    ("https://example.com/{path}", "https://example.com/a/b", False),
    ("https://example.com/page{#section}", "https://example.com/page#intro/2", True),
    ("https://example.com/page{#section}", "https://example.com/page", True),
    # level 3: several variables, prefixed by their operator, separated by its separator
    ("https://example.com/map{?x,y}", "https://example.com/map?x=1&y=2", True),
    ("https://example.com/map{?x,y}", "https://example.com/map?x=1&y=2&z=3", False),  # two variables: two pairs
    ("https://example.com{/a,b}", "https://example.com/1/2", True),
    ("https://example.com{/a,b}", "https://example.com/1/2/3", False),
    ("https://example.com/x{.ext}", "https://example.com/x.json", True),
    ("https://example.com/x{;v}", "https://example.com/x;v=1", True),
    ("https://example.com/x?fixed=1{&y}", "https://example.com/x?fixed=1&y=2", True),
    # level 4: an exploded variable takes any number of values; a prefix changes nothing to the pattern
    ("https://example.com{/path*}", "https://example.com/a/b/c/d", True),
    ("https://example.com{/path*}{.ext}", "https://example.com/a/b.json", True),
    ("https://example.com/{id:3}", "https://example.com/12345", True),
    # the draft's example: a subscribe claim that covers one user's updates through alternate topics
    ("https://example.com/users/foo/{?topic}",
     "https://example.com/users/foo/?topic=https%3A%2F%2Fexample.com%2Fbooks%2F1", True),
    ("https://example.com/users/foo/{?topic}",
     "https://example.com/users/foo/?topic=https://example.com/books/1", False),
    ("https://example.com/users/foo/{?topic}",
     "https://example.com/users/bar/?topic=https%3A%2F%2Fexample.com%2Fbooks%2F1", False),
])
def test_a_template_matches_exactly_the_strings_its_expansions_can_be(template: str, value: str,
                                                                      expected: bool) -> None:
    assert matches(template, value) is expected


@pytest.mark.parametrize("source", [
    "https://example.com/{id",  # never closed
    "https://example.com/{}",
    "https://example.com/{=id}",  # an operator RFC 6570 reserves
    "https://example.com/{|id}",
    "https://example.com/{id:0}",
    "https://example.com/{id:10000}",
    "https://example.com/{i d}",
    "https://example.com/{.id.}",
    "https://example.com/a b/{id}",  # a space is no literal
    "https://example.com/<{id}>",
    "https://example.com/}{id}",
    "https://example.com/%zz/{id}",
])
def test_a_string_that_is_no_uri_template_compiles_to_none(source: str) -> None:
    assert compile_template(source) is None
    with pytest.raises(TemplateError):
        Template(source)


@pytest.mark.parametrize("source", [
    "https://example.com/{id}",
    "https://example.com/{+path}/{var:30}{?a,b*}{&c}{#f}{.e}{;m}{/p*}",
    "https://exämple.com/{id}",  # an IRI: non-ASCII literals are allowed
    "https://example.com/%C3%A9/{a.b_c%20}",
    "plain-string-without-expressions",
])
def test_valid_templates_compile(source: str) -> None:
    assert compile_template(source) is not None


def test_matching_takes_linear_time_on_a_template_that_would_backtrack() -> None:
    # A backtracking regex for "{a}{b}{c}{d}{e}!" tries every way to split the string into five runs.
    template = compile_template("{a}{b}{c}{d}{e}!")
    assert template is not None
    value = "a" * 20_000
    started = time.perf_counter()
    assert template.matches(value) is False
    assert template.matches(value + "!") is True
    assert time.perf_counter() - started < 2.0
