"""Scenario R in the bench's tiny mode: commands answered through an upstream and through a Python handler."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
@pytest.mark.redis
def test_a_tiny_run_answers_commands_on_both_paths_and_reports_cpu_by_party(tmp_path: Path) -> None:
    if not shutil.which("redis-server"):
        pytest.fail("redis-server is not installed: run the tests with `make test`, which installs it")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--tiny", "--targets", "herald,naive", "--scenarios", "R",
         "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [orjson.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    rows = [r for r in lines if not r.get("summary")]
    assert [(r["target"], r["variant"].split(",")[0]) for r in rows] == [
        ("herald", "Python handler"), ("herald", "proxied to an upstream")]  # naive has neither
    python, proxied = (r["metrics"] for r in rows)
    for m in (python, proxied):
        assert m["commands"] > 0 and m["failed"] == 0, m
        assert m["commands_per_s"] > 0 and 0 < m["p50_ms"] <= m["p99_ms"]
        assert m["gateway_cpu_us_per_command"] > 0 and m["worker_cpu_us_per_command"] > 0
    assert python["upstream_cpu_us_per_command"] is None and proxied["upstream_cpu_us_per_command"] > 0
    table = (tmp_path / "latest-tiny.md").read_text()
    assert "### R: CPU µs per command, by party" in table
    assert "| party | Python handler | proxied to an upstream |" in table
