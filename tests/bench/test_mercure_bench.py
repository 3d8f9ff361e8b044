"""Scenario P's Mercure variant, run in the bench's tiny mode: every update published through the hub arrives."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.bench.conftest import TinyRun


@pytest.mark.e2e
@pytest.mark.redis
def test_a_tiny_run_publishes_through_the_mercure_hub_and_every_subscriber_gets_every_update(
    tiny_bench: Callable[..., TinyRun],
) -> None:
    run = tiny_bench("herald", "P", check=False)  # judged by its Mercure row alone
    [row] = [r for r in run.lines if "Mercure" in r.get("variant", "")]
    assert row["error"] is None, row["error"] + run.output(2000)
    m = row["metrics"]
    assert m["published"] == m["expected"] == m["delivered"] == 40 and m["publish_errors"] == 0, m
    assert m["lost"] == m["duplicated"] == m["out_of_order"] == 0
    assert m["events_per_s"] > 0 and m["cpu_us_per_event"] is not None
    assert 0 < m["p50_ms"] <= m["p99_ms"]
    assert "through the Mercure hub" in run.table
