"""Scenario P's Mercure variant, run in the bench's tiny mode: every update published through the hub arrives."""

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
def test_a_tiny_run_publishes_through_the_mercure_hub_and_every_subscriber_gets_every_update(tmp_path: Path) -> None:
    if not shutil.which("redis-server"):
        pytest.fail("redis-server is not installed: run the tests with `make test`, which installs it")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--tiny", "--targets", "herald", "--scenarios", "P", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    lines = [orjson.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    [row] = [r for r in lines if "Mercure" in r.get("variant", "")]
    assert row["error"] is None, row["error"] + proc.stdout[-2000:] + proc.stderr[-2000:]
    m = row["metrics"]
    assert m["published"] == m["expected"] == m["delivered"] == 40 and m["publish_errors"] == 0, m
    assert m["lost"] == m["duplicated"] == m["out_of_order"] == 0
    assert m["events_per_s"] > 0 and m["cpu_us_per_event"] is not None
    assert 0 < m["p50_ms"] <= m["p99_ms"]
    assert "through the Mercure hub" in (tmp_path / "latest-tiny.md").read_text()
