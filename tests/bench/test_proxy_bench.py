"""Scenario R in the bench's tiny mode: commands answered through an upstream and through a Python handler."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.bench.conftest import TinyRun


@pytest.mark.e2e
@pytest.mark.redis
def test_a_tiny_run_answers_commands_on_both_paths_and_reports_cpu_by_party(tiny_bench: Callable[..., TinyRun]) -> None:
    run = tiny_bench("herald,naive", "R")
    rows = run.rows
    assert [(r["target"], r["variant"].split(",")[0]) for r in rows] == [
        ("herald", "Python handler"), ("herald", "proxied to an upstream")]  # naive has neither
    python, proxied = (r["metrics"] for r in rows)
    for m in (python, proxied):
        assert m["commands"] > 0 and m["failed"] == 0, m
        assert m["commands_per_s"] > 0 and 0 < m["p50_ms"] <= m["p99_ms"]
        assert m["gateway_cpu_us_per_command"] > 0 and m["worker_cpu_us_per_command"] > 0
    assert python["upstream_cpu_us_per_command"] is None and proxied["upstream_cpu_us_per_command"] > 0
    table = run.table
    assert "### R: CPU µs per command, by party" in table
    assert "| party | Python handler | proxied to an upstream |" in table
