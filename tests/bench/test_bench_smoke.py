"""The benchmark harness, run in its tiny mode: it starts real servers, measures, and reports figures.

Nothing here asserts a speed (the issue's targets are measured by ``make bench``, never by a timed
test); these tests prove the harness itself counts right, so a broken bench cannot report success.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bench.loadgen import envelope, latency_summary, percentile, sse_messages
from bench.report import Result, _c_ceiling, checks, checks14, markdown, ratio
from tests.bench.conftest import TinyRun


@pytest.mark.e2e
@pytest.mark.redis
def test_a_tiny_run_delivers_every_event_and_writes_json_lines_and_a_table(tiny_bench: Callable[..., TinyRun]) -> None:
    run = tiny_bench("herald,naive", "A,B,C,D,E,P,S")
    lines, rows = run.lines, run.rows
    assert {(r["scenario"], r["target"]) for r in rows} >= {(s, t) for s in "ABCDES" for t in ("herald", "naive")}
    for row in rows:
        assert row["error"] is None, row
        m = row["metrics"]
        if "kib_per_conn" in m:  # A and the WebSocket A
            assert m["connected"] == m["subscribers"] == 20 and m["failed"] == 0
            assert m["kib_per_conn"] is not None and m["rss_after_mib"] > 0
        elif row["scenario"] == "D":
            [step] = m["steps"]
            assert step["posted"] == step["accepted"] == step["delivered"] == 20, step
            assert step["p99_ms"] is not None and step["p99_ms"] > 0
        elif row["scenario"] == "S":  # every command delivered to its own room's subscriber, CPU read by party
            assert m["posted"] == m["accepted"] == m["delivered"] == 20 and m["lost"] == 0, m
            assert m["commands_per_s"] > 0 and 0 < m["p50_ms"] <= m["p99_ms"]
            assert all(m[f"{p}_cpu_us_per_command"] is not None for p in ("gateway", "worker", "redis", "loadgen"))
        else:  # B, C and the WebSocket C: every tick arrives once, in order, with a latency
            assert m["expected"] == m["delivered"] > 0, m
            assert m["lost"] == m["duplicated"] == 0
            assert m.get("out_of_order", 0) == 0
            assert 0 < m["p50_ms"] <= m["p99_ms"] <= m["max_ms"]
    bursts = [r["metrics"] for r in rows if "as fast" in r["variant"]]
    # C and the WebSocket C, on both targets, and C on Herald with a Redis Cluster: two rounds of one event per topic
    assert len(bursts) == 5
    assert sum("Redis Cluster" in r["variant"] for r in rows) == 3  # C as fast, D and S on the cluster
    for m in bursts:
        assert m["rounds"] == 2 and m["expected"] == 2 * 20 and len(m["round_rates"]) == 2, m
        assert m["cpu_us_per_delivery"] is not None
    publishes = [r for r in rows if r["scenario"] == "P" and "over HTTP" in r["variant"]]
    assert {r["target"] for r in publishes} == {"herald"}  # naive has no publish API
    assert [r["metrics"]["events_per_request"] for r in publishes] == [50, 1]
    for row in publishes:  # every event POSTed to /topics/{topic}/events arrives once, in order
        m = row["metrics"]
        assert m["published"] == m["events"] == m["delivered"] and m["publish_errors"] == 0, m
        assert m["events_per_s"] > 0 and m["cpu_us_per_event"] is not None
    b = next(r for r in rows if r["scenario"] == "B" and r["target"] == "herald")["metrics"]
    assert b["expected"] == 20 * 20 and b["publish_rate"] > 40
    [summary] = [r for r in lines if r.get("summary")]
    assert summary["mode"] == "tiny" and {c["scenario"] for c in summary["checks"]} == {"A", "B", "C", "D"}
    assert summary["write_floor"]["connections"] == 20 and summary["write_floor"]["us_per_write"] >= 0
    assert summary["speed_probe_ms"] > 0
    table = run.table
    assert "| scenario | metric | herald | naive | herald/naive |" in table
    assert "| A: SSE idle x20 | connected | 20 | 20 | 1.00x |" in table
    assert "### C as fast as it goes: CPU µs per delivery, by party" in table
    assert "### P: CPU µs per published event, by party" in table
    assert "### S: CPU µs per command, by party" in table and "## Targets of issue 14" in table


def test_sse_parser_follows_chunked_encoding_split_anywhere_and_stamps_the_last_byte() -> None:
    body = b"retry: 2000\n\n:\n\nid: 1-0\nevent: bench.tick\ndata: {\"a\":1}\n\nid: 1-1\ndata: {\"a\":2}\n\n"
    raw = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
           + b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:20], body[20:47], body[47:])))
    pieces = [(t, raw[i:i + 7]) for t, i in enumerate(range(0, len(raw), 7))]
    status, messages = sse_messages(pieces)
    assert status == 200
    assert [(m.id, m.event, m.json()) for m in messages] == [
        ("1-0", "bench.tick", {"a": 1}),
        ("1-1", "message", {"a": 2}),
    ]
    end_of_first = raw.index(b'{"a":1}') + len(b'{"a":1}\n\n')
    assert messages[0].arrived_ns == (end_of_first - 1) // 7


def test_envelope_is_found_in_sse_data_and_in_herald_websocket_frames() -> None:
    event = {"specversion": "1.0", "type": "bench.tick", "data": {"seq": 3}}
    assert envelope(event) == event
    assert envelope({"type": "event", "topic": "t", "cursor": "1-0", "event": event}) == event
    assert envelope({"type": "subscribed", "topic": "t"}) is None


def test_percentiles_use_nearest_rank() -> None:
    values = sorted(float(v) for v in range(1, 101))
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99 and percentile([], 50) is None
    assert latency_summary([3.0, 1.0, 2.0]) == {"p50_ms": 2.0, "p99_ms": 3.0, "max_ms": 3.0}


def test_ratios_and_targets_are_judged_on_the_measured_figures() -> None:
    assert ratio(4.0, 16.0) == 0.25 and ratio(1, 0) is None and ratio(None, 3) is None
    def a(target: str, kib: float, connected: int = 10000) -> Result:
        return Result("A", "SSE idle x10000", target, {"connected": connected, "failed": 10000 - connected,
                                                      "kib_per_conn": kib, "subscribers": 10000})
    [check] = [c for c in checks([a("herald", 12.0), a("naive", 60.0)], True) if c.scenario == "A"]
    assert check.met is True
    [check] = [c for c in checks([a("herald", 20.0), a("naive", 60.0)], True) if c.scenario == "A"]
    assert check.met is False  # over 16 KiB per connection
    [check] = [c for c in checks([a("herald", 12.0, 9990), a("naive", 60.0)], True) if c.scenario == "A"]
    assert check.met is False  # not all connected
    meta = {"mode": "full", "started": "now", "command": "make bench", "commit": "x", "machine": "m", "seconds": 1.0,
            "targets": {"herald": "h", "naive": "n"}}
    table = markdown([a("herald", 12.0), a("naive", 60.0)], meta, ["herald", "naive"])
    assert "| A | 10,000 SSE all connected" in table


def test_c_ceiling_puts_herald_at_the_kernel_floor_and_compares_with_naive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    parties = {"cpu_us_per_delivery": 30.0, "redis_cpu_us_per_delivery": 9.0,
               "publisher_cpu_us_per_delivery": 6.0, "loadgen_cpu_us_per_delivery": 14.0}
    rows = [Result("C", "as fast", "herald", {**parties, "deliveries_per_s": 20_000.0}),
            Result("C", "as fast", "naive", {**parties, "deliveries_per_s": 10_000.0})]
    [_, line] = _c_ceiling(rows, 11.0)
    # 2e6 / (11 + 9 + 6 + 14) = 50,000/s, five times naive's 10,000/s; Herald's own server figure plays no part
    assert "= 50,000 deliveries/s, 5.00x naive" in line
    assert _c_ceiling(rows[:1], 11.0) == [] and _c_ceiling(rows, None) == []


def test_issue_14s_command_path_targets_are_judged_by_party_and_against_naive() -> None:
    def s(target: str, rate: float, gateway: float = 140.0, worker: float = 140.0, redis: float = 90.0) -> Result:
        return Result("S", "3,000 commands", target, {
            "posted": 3000, "delivered": 3000, "lost": 0, "commands_per_s": rate,
            "gateway_cpu_us_per_command": gateway, "worker_cpu_us_per_command": worker,
            "redis_cpu_us_per_command": redis, "server_cpu_us_per_command": gateway + worker + redis})
    cpu, rate = checks14([s("herald", 4000.0), s("naive", 3000.0)])
    assert cpu.met is True and rate.met is True
    cpu, rate = checks14([s("herald", 4000.0, worker=200.0), s("naive", 4500.0)])
    assert cpu.met is False  # the worker over its 150 µs, though the sum is under 400
    assert rate.met is False  # over 3,500/s, but below naive's
