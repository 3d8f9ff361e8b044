"""What the bench's tests share: a run of ``python -m bench --tiny`` (real servers, a few seconds) and its files."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True, slots=True)
class TinyRun:
    """One tiny bench run: its process and the directory it wrote ``runs.jsonl`` and ``latest-tiny.md`` to."""

    proc: subprocess.CompletedProcess[str]
    out: Path

    @property
    def lines(self) -> list[dict[str, Any]]:
        """Every line of ``runs.jsonl``: the rows and the summary."""
        return [orjson.loads(line) for line in (self.out / "runs.jsonl").read_text().splitlines()]

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The lines of ``runs.jsonl`` that are rows (not the summary)."""
        return [r for r in self.lines if not r.get("summary")]

    @property
    def table(self) -> str:
        """``latest-tiny.md``."""
        return (self.out / "latest-tiny.md").read_text()

    def output(self, chars: int = 3000) -> str:
        """The end of the run's stdout and stderr, for a failing assertion's message."""
        return self.proc.stdout[-chars:] + self.proc.stderr[-chars:]


@pytest.fixture
def tiny_bench(tmp_path: Path) -> Callable[..., TinyRun]:
    """Run ``python -m bench --tiny --targets T --scenarios S`` into ``tmp_path`` (``check``: it must exit 0)."""

    def run(targets: str, scenarios: str, *, check: bool = True) -> TinyRun:
        if not shutil.which("redis-server"):
            pytest.fail("redis-server is not installed: run the tests with `make test`, which installs it")
        proc = subprocess.run(
            [sys.executable, "-m", "bench", "--tiny", "--targets", targets, "--scenarios", scenarios,
             "--out", str(tmp_path)],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )
        done = TinyRun(proc, tmp_path)
        if check:
            assert proc.returncode == 0, done.output()
        return done

    return run
