"""The README's curl session works as printed, against a real Herald process.

The ``sh`` blocks after the ``readme-session`` marker (up to the next ``##`` section) that run
``curl`` are executed in order in one bash session, with the README's port replaced by the
test server's. Each must exit 0 and answer without a problem document; when the README shows
the output (an ``http`` or ``text`` block right after), its status lines, ``event:`` and
``retry:`` lines and header names must appear, in that order.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

import pytest

from tests.support.server import ROOT, HeraldServer

pytestmark = pytest.mark.e2e

README = ROOT / "README.md"
MARKER = "<!-- readme-session"
README_ORIGIN = "http://127.0.0.1:8000"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
EXACT = re.compile(r"^(HTTP/\S+ \d{3}.*|event: .*|retry: .*)$")
NAMED = re.compile(r"^([A-Za-z][A-Za-z0-9-]*):")


@dataclass(frozen=True)
class Step:
    """One ``sh`` block of the session, and the output the README prints after it (if any)."""

    script: str
    shown: str | None


def session_steps(text: str) -> list[Step]:
    """The curl steps of the README's session."""
    start = text.index(MARKER)
    end = text.find("\n## ", start)
    blocks = [(m.group(1), m.group(2)) for m in FENCE.finditer(text[start : end if end >= 0 else None])]
    steps = []
    for i, (lang, body) in enumerate(blocks):
        if lang != "sh" or "curl" not in body:
            continue
        following = blocks[i + 1] if i + 1 < len(blocks) else None
        shown = following[1] if following and following[0] in ("http", "text") else None
        steps.append(Step(body, shown))
    return steps


def run_session(steps: list[Step], origin: str) -> list[tuple[int, str]]:
    """Run the steps in one bash process; each step's exit status and output."""
    lines = ["set -u"]
    for i, step in enumerate(steps):
        script = step.script.replace(README_ORIGIN, origin).rstrip()
        lines += [f"echo '<<<step {i}>>>'", script, "printf '\\n<<<exit %d>>>\\n' $?"]
    done = subprocess.run(["bash", "-c", "\n".join(lines)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    parts = re.findall(r"<<<step (\d+)>>>\n(.*?)<<<exit (\d+)>>>\n", done.stdout, re.DOTALL)
    assert [int(p[0]) for p in parts] == list(range(len(steps))), done.stdout + done.stderr
    return [(int(code), output) for _, output, code in parts]


def check_shape(shown: str, output: str) -> None:
    """The README's status/event/retry lines appear in order, and every header name it shows is there."""
    actual = output.replace("\r\n", "\n").split("\n")
    position = 0
    for line in shown.split("\n"):
        if EXACT.match(line):
            assert line in actual[position:], f"{line!r} is not in the output (in order):\n{output}"
            position = actual.index(line, position) + 1
        elif (named := NAMED.match(line)) and not line.startswith(("{", " ")):
            prefix = named.group(1).lower() + ":"
            assert any(a.lower().startswith(prefix) for a in actual), f"no {prefix} line in:\n{output}"


def test_the_readme_marks_its_curl_session() -> None:
    steps = session_steps(README.read_text())
    assert len(steps) >= 4
    assert any("Prefer: wait" in s.script for s in steps)
    assert any(s.shown is not None for s in steps)


def test_the_readme_curl_session_works_as_printed(server: HeraldServer) -> None:
    steps = session_steps(README.read_text())
    results = run_session(steps, server.url)
    for step, (code, output) in zip(steps, results, strict=True):
        assert code == 0, f"step failed with {code}:\n{step.script}\n---\n{output}"
        assert output.strip(), f"step printed nothing:\n{step.script}"
        assert "application/problem+json" not in output.lower(), f"{step.script}\n---\n{output}"
        for status in re.findall(r"^HTTP/\S+ (\d{3})", output, re.MULTILINE):
            assert status[0] in "23", f"{step.script}\n---\n{output}"
        if step.shown is not None:
            check_shape(step.shown, output)
