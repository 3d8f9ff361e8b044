"""The soak bench, run briefly: it starts its own gateway, holds its connections, reports figures."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from bench import soak

pytestmark = pytest.mark.e2e


def test_a_short_soak_holds_every_connection_delivers_everything_and_reports(tmp_path: Path) -> None:
    soak.main(["--minutes", "0.2", "--connections", "50", "--rooms", "5", "--rate", "10", "--broker", "memory",
               "--warmup", "3", "--sample", "1", "--out", str(tmp_path)])
    [report_path] = tmp_path.glob("soak-*.json")
    report = orjson.loads(report_path.read_bytes())
    clients = report["clients"]
    assert clients["connected"] == 50
    assert clients["dropped"] == 0
    assert clients["post_errors"] == 0 and clients["posted"] > 50
    # every message reaches the ten connections of its room (the last few may still be in flight)
    assert clients["delivered_ratio"] >= 0.95
    assert report["fds"]["growth_percent"] == 0.0
    assert len(report["samples"]) >= 10
    assert "| gateway RSS (MiB) |" in report_path.with_suffix(".md").read_text()
