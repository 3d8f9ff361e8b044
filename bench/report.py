"""Results: JSON lines per run, the markdown table, Herald's ratios to each baseline, the issue's targets."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Result:
    """One scenario variant against one target."""

    scenario: str
    variant: str
    target: str
    metrics: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0


# (metric, label, which way is better) per scenario; Herald's value / the baseline's is the ratio shown.
IDLE = [("connected", "connected", "higher"), ("failed", "failed", "lower"), ("connect_s", "s to connect all", "lower"),
        ("kib_per_conn", "server KiB / conn", "lower"), ("redis_kib_per_conn", "Redis KiB / conn", "lower"),
        ("rss_after_mib", "server RSS MiB", "lower"), ("cpu_s", "server CPU s", "lower")]
FANOUT = [("delivered", "delivered", "higher"), ("expected", "expected", "higher"), ("lost", "lost", "lower"),
          ("duplicated", "duplicated", "lower"), ("out_of_order", "out of order", "lower"),
          ("publish_rate", "publish rate /s", "higher"), ("p50_ms", "latency p50 ms", "lower"),
          ("p99_ms", "latency p99 ms", "lower"), ("max_ms", "latency max ms", "lower"),
          ("cpu_s", "server CPU s", "lower")]
MANY = [("delivered", "delivered", "higher"), ("expected", "expected", "higher"), ("lost", "lost", "lower"),
        ("deliveries_per_s", "deliveries / s", "higher"), ("p50_ms", "latency p50 ms", "lower"),
        ("p99_ms", "latency p99 ms", "lower"), ("max_ms", "latency max ms", "lower"),
        ("publish_rate", "publish rate /s", "higher"), ("cpu_s", "server CPU s", "lower"),
        ("cpu_us_per_delivery", "server CPU µs / delivery", "lower")]
E2E = [("max_rate_p99_under_100ms", "highest ops/s with p99 < 100 ms", "higher"),
       ("p50_ms_at_500", "p50 ms at 500 ops/s", "lower"), ("p99_ms_at_500", "p99 ms at 500 ops/s", "lower"),
       ("p99_ms_at_1000", "p99 ms at 1,000 ops/s", "lower")]
SATURATION = [("commands_per_s", "commands / s, delivered", "higher"),
              ("accepted_per_s", "commands / s, accepted", "higher"), ("delivered", "delivered", "higher"),
              ("lost", "lost", "lower"), ("p50_ms", "POST-to-event p50 ms", "lower"),
              ("p99_ms", "POST-to-event p99 ms", "lower"), ("post_p99_ms", "POST p99 ms", "lower"),
              ("server_cpu_us_per_command", "gateway + worker + Redis CPU µs / command", "lower")]
PUBLISH = [("events_per_s", "events / s", "higher"), ("requests_per_s", "requests / s", "higher"),
           ("delivered", "delivered", "higher"), ("expected", "expected", "higher"), ("lost", "lost", "lower"),
           ("duplicated", "duplicated", "lower"), ("out_of_order", "out of order", "lower"),
           ("p50_ms", "publish-to-delivery p50 ms", "lower"), ("p99_ms", "publish-to-delivery p99 ms", "lower"),
           ("cpu_us_per_event", "server CPU µs / event", "lower")]


def metrics_of(result: Result) -> list[tuple[str, str, str]]:
    """The metrics shown for a result's scenario variant."""
    if result.scenario == "A" or "idle" in result.variant:
        return IDLE
    if result.scenario == "B":
        return FANOUT
    if result.scenario == "D":
        return E2E
    if result.scenario == "S":
        return SATURATION
    if result.scenario == "P":
        return PUBLISH
    if result.scenario == "R":
        from bench.proxy import METRICS  # bench.proxy imports Herald; the report alone needs nothing of it

        return METRICS
    return MANY


def ratio(herald: Any, baseline: Any) -> float | None:
    """Herald's value divided by the baseline's, when both are positive numbers."""
    if isinstance(herald, bool) or isinstance(baseline, bool):
        return None
    if isinstance(herald, (int, float)) and isinstance(baseline, (int, float)) and baseline > 0 and herald >= 0:
        return herald / baseline
    return None


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _fmt_ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}x" if value < 100 else f"{value:,.0f}x"


# Targets of issue 5 ------------------------------------------------------------------------------

@dataclass
class Check:
    """One target of the issue: what it asks, what was measured, whether it is met."""

    scenario: str
    required: str
    measured: str
    met: bool | None  # None: not measured in this run


def _find(results: list[Result], scenario: str, target: str, variant_has: str = "") -> Result | None:
    for r in results:
        if r.scenario == scenario and r.target == target and variant_has in r.variant and r.error is None:
            return r
    return None


def checks(results: list[Result], sizes_full: bool) -> list[Check]:
    """Evaluate the issue's targets on this run's results (only a full run has the issue's sizes)."""
    out: list[Check] = []
    a = _find(results, "A", "herald", "x10000")
    a_naive = _find(results, "A", "naive", "x10000")
    if a is not None:
        m = a.metrics
        per = m.get("kib_per_conn")
        naive_per = a_naive.metrics.get("kib_per_conn") if a_naive else None
        r = ratio(per, naive_per)
        ok = m["connected"] == 10000 and per is not None and per <= 16 and (r is not None and r <= 0.25)
        out.append(Check("A", "10,000 SSE all connected; ≤ 16 KiB/conn; ≤ 1/4 of naive",
                         f"{m['connected']:,} connected, {m['failed']} failed; {_fmt(per)} KiB/conn; "
                         f"{_fmt_ratio(r)} of naive ({_fmt(naive_per)} KiB/conn)", ok))
    else:
        out.append(Check("A", "10,000 SSE all connected; ≤ 16 KiB/conn; ≤ 1/4 of naive", "not run at 10,000", None))
    b = _find(results, "B", "herald")
    if b is not None:
        m = b.metrics
        full = m["subscribers"] == 1000 and m["published"] == 200
        ok = (full and m["delivered"] == 200_000 and m["lost"] == 0 and m["duplicated"] == 0
              and m["out_of_order"] == 0 and (m["publish_rate"] or 0) >= 49.5 and (m["p99_ms"] or 1e9) <= 50)
        out.append(Check("B", "200,000 deliveries; 0 lost/dup/out of order; 50/s held; p99 ≤ 50 ms",
                         f"{m['delivered']:,}/{m['expected']:,} delivered, {m['lost']} lost, {m['duplicated']} dup, "
                         f"{m['out_of_order']} out of order; {_fmt(m['publish_rate'])}/s; p99 {_fmt(m['p99_ms'])} ms",
                         ok if full else None))
    c = _find(results, "C", "herald", "as fast")
    c_naive = _find(results, "C", "naive", "as fast")
    paced = _find(results, "C", "herald", "paced")
    if c is not None:
        m = c.metrics
        r = ratio(m["deliveries_per_s"], c_naive.metrics.get("deliveries_per_s") if c_naive else None)
        p = paced.metrics if paced is not None else {}
        paced_ok = (bool(p) and p["lost"] == 0 and (p["publish_rate"] or 0) >= 4750 and (p["p99_ms"] or 1e9) <= 20)
        ok = (m["deliveries_per_s"] or 0) >= 5000 and m["lost"] == 0 and r is not None and r >= 5 and paced_ok
        out.append(Check("C", "≥ 5,000 deliveries/s; p99 ≤ 20 ms; ≥ 5x naive",
                         f"as fast as it goes: {_fmt(m['deliveries_per_s'])}/s, {_fmt_ratio(r)} naive "
                         f"({m['delivered']:,}/{m['expected']:,} delivered, p99 {_fmt(m['p99_ms'])} ms); "
                         + (f"paced at {_fmt(p['publish_rate'])}/s: p99 {_fmt(p['p99_ms'])} ms, "
                            f"{p['delivered']:,}/{p['expected']:,} delivered" if p else "paced: not run"),
                         ok if m["subscribers"] >= 2000 else None))
    d = _find(results, "D", "herald")
    if d is not None:
        p99 = d.metrics.get("p99_ms_at_500")
        step = next((s for s in d.metrics["steps"] if s["rate"] == 500), None)
        ok = (step is not None and p99 is not None and p99 <= 50 and step["delivered"] == step["accepted"]
              and step["accepted"] == step["posted"])
        out.append(Check("D", "p99 ≤ 50 ms at 500 operations/s",
                         f"p99 {_fmt(p99)} ms at 500/s" + (f" ({step['delivered']}/{step['posted']} delivered)"
                                                           if step else " (500/s not reached)")
                         + f"; highest rate with p99 < 100 ms: {d.metrics['max_rate_p99_under_100ms']}/s",
                         ok if step is not None or sizes_full else None))
    return out


def checks14(results: list[Result]) -> list[Check]:
    """Evaluate issue 14's targets (the command path, connection setup, the WebSocket) on this run's results."""
    out: list[Check] = []
    s, s_naive = _find(results, "S", "herald"), _find(results, "S", "naive")
    if s is not None:
        m = s.metrics
        parts = {k: m.get(f"{k}_cpu_us_per_command") for k in ("gateway", "worker", "redis")}
        total = m.get("server_cpu_us_per_command")
        ok = (total is not None and total <= 400 and all(v is not None for v in parts.values())
              and (parts["gateway"] or 0) <= 150 and (parts["worker"] or 0) <= 150 and (parts["redis"] or 0) <= 100)
        out.append(Check("S", "server CPU per command ≤ 400 µs (gateway ≤ 150, worker ≤ 150, Redis ≤ 100)",
                         f"{_fmt(total)} µs (gateway {_fmt(parts['gateway'])}, worker {_fmt(parts['worker'])}, "
                         f"Redis {_fmt(parts['redis'])})", ok if m["posted"] >= 1000 else None))
        rate, naive_rate = m.get("commands_per_s"), s_naive.metrics.get("commands_per_s") if s_naive else None
        ok = (rate or 0) >= 3500 and m["lost"] == 0 and naive_rate is not None and (rate or 0) >= naive_rate
        out.append(Check("S", "≥ 3,500 commands/s, each delivered to its own subscriber; ≥ naive's",
                         f"{_fmt(rate)}/s, {_fmt_ratio(ratio(rate, naive_rate))} naive ({_fmt(naive_rate)}/s); "
                         f"{m['delivered']:,}/{m['posted']:,} delivered", ok if m["posted"] >= 1000 else None))
    d, d_naive = _find(results, "D", "herald"), _find(results, "D", "naive")
    if d is not None:
        steps = {st["rate"]: st for st in d.metrics["steps"]}
        naive_steps = {st["rate"]: st for st in d_naive.metrics["steps"]} if d_naive else {}
        behind = [rate for rate, st in naive_steps.items() if st.get("sustained") and not steps.get(rate, {}).get(
            "sustained")]
        top = d.metrics["max_rate_p99_under_100ms"]
        full = "5000" in d.variant  # the full steps (a run stops after a step whose p99 passes a second)
        out.append(Check("D", "highest rate with p99 < 100 ms ≥ 3,000/s, and held at every step naive holds",
                         f"{top}/s (naive {d_naive.metrics['max_rate_p99_under_100ms'] if d_naive else '-'}/s); "
                         + (f"not held where naive held: {', '.join(map(str, sorted(behind)))}/s" if behind
                            else "held wherever naive held"),
                         (top >= 3000 and not behind) if full else None))
        p99 = d.metrics.get("p99_ms_at_1000")
        out.append(Check("D", "p99 ≤ 20 ms at 1,000 operations/s", f"p99 {_fmt(p99)} ms at 1,000/s",
                         (p99 is not None and p99 <= 20) if 1000 in steps else None))
    a = _find(results, "A", "herald", "x10000")
    if a is not None:
        m = a.metrics
        cpu, seconds, connected = m.get("cpu_s"), m.get("connect_s"), m.get("connected") or 0
        per = cpu / connected * 1e6 if cpu is not None and connected else None
        out.append(Check("A", "SSE connection setup ≤ 150 µs of gateway CPU; 10,000 connected in ≤ 2 s",
                         f"{_fmt(per)} µs per connect; {_fmt(seconds)} s for {connected:,}",
                         per is not None and per <= 150 and seconds is not None and seconds <= 2
                         and connected == 10000))
    e = _find(results, "E", "herald", "WS idle x10000")
    e_c, c = _find(results, "E", "herald", "as fast"), _find(results, "C", "herald", "as fast")
    if e is not None or e_c is not None:
        kib = e.metrics.get("kib_per_conn") if e else None
        rate = ratio(e_c.metrics.get("deliveries_per_s") if e_c else None,
                     c.metrics.get("deliveries_per_s") if c else None)
        ok = kib is not None and kib <= 16 and rate is not None and rate >= 0.8
        out.append(Check("E", "WebSocket ≤ 16 KiB per idle connection; 1:1 rate ≥ 0.8x SSE's (C)",
                         f"{_fmt(kib)} KiB/conn; 1:1 {_fmt(e_c.metrics.get('deliveries_per_s') if e_c else None)}/s, "
                         f"{_fmt_ratio(rate)} SSE's", ok if e is not None and e_c is not None else None))
    return out


def _s_budget(results: list[Result]) -> list[str]:
    """Scenario S's CPU per command, party by party, and the rate those costs allow on this machine's cores."""
    rows = [r for r in results if r.scenario == "S" and not r.error]
    if not rows:
        return []
    cores = os.cpu_count() or 1
    keys = [("gateway", "gateway"), ("worker", "worker"), ("redis", "Redis"), ("loadgen", "load generator (bench)")]
    lines = ["### S: CPU µs per command, by party", "",
             f"Every party shares the {cores} cores, so the command rate cannot exceed {cores} x 10^6 / (their sum).",
             "", "| party | " + " | ".join(_label(r) for r in rows) + " |", "|" + " --- |" * (len(rows) + 1)]
    for key, label in keys:
        lines.append(f"| {label} | " + " | ".join(_fmt(r.metrics.get(f"{key}_cpu_us_per_command")) for r in rows)
                     + " |")
    sums = [sum(r.metrics.get(f"{k}_cpu_us_per_command") or 0 for k, _ in keys) for r in rows]
    lines.append("| **sum** | " + " | ".join(_fmt(round(x, 1)) for x in sums) + " |")
    lines.append("| ceiling: cores x 10^6 / sum | " + " | ".join(_fmt(round(cores * 1e6 / x)) if x else "-"
                                                               for x in sums) + " |")
    lines.append("| commands / s, delivered | " + " | ".join(_fmt(r.metrics.get("commands_per_s")) for r in rows)
                 + " |")
    return [*lines, ""]


# Writing -------------------------------------------------------------------------------------------

PARTIES = [("cpu_us_per_delivery", "server (gateway + worker)"), ("redis_cpu_us_per_delivery", "Redis"),
           ("publisher_cpu_us_per_delivery", "publisher (bench)"),
           ("loadgen_cpu_us_per_delivery", "subscribers (bench)")]


def _label(result: Result) -> str:
    """The target's name, and the Redis it ran on when that is not the usual single one (bench/cluster.py)."""
    return result.target + (" (Redis Cluster)" if "Redis Cluster" in result.variant else "")


def _c_budget(results: list[Result], meta: dict[str, Any]) -> list[str]:
    """Scenario C's CPU per delivery, party by party, and the kernel's floor under the server's share."""
    rows = [r for r in results if r.scenario == "C" and "as fast" in r.variant and not r.error]
    if not rows:
        return []
    lines = ["### C as fast as it goes: CPU µs per delivery, by party", "",
             "All parties share the machine's cores, so a delivery rate cannot exceed cores x 10^6 / (their sum).",
             "", "| party | " + " | ".join(_label(r) for r in rows) + " |", "|" + " --- |" * (len(rows) + 1)]
    for key, label in PARTIES:
        lines.append(f"| {label} | " + " | ".join(_fmt(r.metrics.get(key)) for r in rows) + " |")
    sums = [sum(r.metrics.get(k) or 0 for k, _ in PARTIES) for r in rows]
    lines.append("| **sum** | " + " | ".join(_fmt(round(x, 1)) for x in sums) + " |")
    lines.append("| deliveries / s (median round) | " + " | ".join(_fmt(r.metrics.get("deliveries_per_s"))
                                                                  for r in rows) + " |")
    floor = meta.get("write_floor")
    if floor:
        lines += ["", f"Kernel floor, same run (`python -m bench.floor`): one {floor['size']}-byte write to one of "
                  f"{floor['connections']:,} loopback TCP connections read by another process costs "
                  f"{_fmt(floor['us_per_write'])} µs of CPU ({_fmt(floor['system_us_per_write'])} µs in the kernel). "
                  "Every server pays at least that per delivery in C."]
        lines += _c_ceiling(rows, floor["us_per_write"])
    return [*lines, ""]


def _c_ceiling(rows: list[Result], floor_us: float | None) -> list[str]:
    """The most Herald could deliver in C if its server cost only the kernel's write, as a ratio to naive."""
    herald = next((r for r in rows if r.target == "herald"), None)
    naive = next((r for r in rows if r.target == "naive"), None)
    if herald is None or naive is None or not floor_us or not naive.metrics.get("deliveries_per_s"):
        return []
    others = [herald.metrics.get(k) for k, _ in PARTIES[1:]]
    if any(v is None for v in others):
        return []
    cores = os.cpu_count() or 1
    ceiling = cores * 1e6 / (floor_us + sum(v for v in others if v is not None))
    return ["", f"Ceiling, same run: with Herald's server at that floor and the other parties as measured, "
                f"{cores} cores give at most {cores} x 10^6 / ({_fmt(floor_us)} + "
                + " + ".join(_fmt(v) for v in others) + f") = {_fmt(round(ceiling))} deliveries/s, "
                f"{_fmt_ratio(ratio(ceiling, naive.metrics['deliveries_per_s']))} naive's measured rate."]


PUBLISH_PARTIES = [("cpu_us_per_event", "server"), ("redis_cpu_us_per_event", "Redis"),
                   ("publisher_cpu_us_per_event", "publisher (bench)"),
                   ("loadgen_cpu_us_per_event", "subscribers (bench)")]


def _p_budget(results: list[Result]) -> list[str]:
    """Scenario P's CPU per published event, party by party, for every variant and target."""
    rows = [r for r in results if r.scenario == "P" and not r.error]
    if not rows:
        return []
    lines = ["### P: CPU µs per published event, by party", "",
             "| party | " + " | ".join(f"{r.target}, {r.metrics.get('events_per_request')} per request" for r in rows)
             + " |", "|" + " --- |" * (len(rows) + 1)]
    for key, label in PUBLISH_PARTIES:
        lines.append(f"| {label} | " + " | ".join(_fmt(r.metrics.get(key)) for r in rows) + " |")
    lines.append("| events / s | " + " | ".join(_fmt(r.metrics.get("events_per_s")) for r in rows) + " |")
    return [*lines, ""]


def markdown(results: list[Result], meta: dict[str, Any], targets: list[str]) -> str:
    """The table of a run: Herald and each baseline side by side, with Herald's ratios."""
    baselines = [t for t in targets if t != "herald"]
    lines = [
        f"# Herald benchmark: {meta['mode']} run, {meta['started']}",
        "",
        f"Command: `{meta['command']}` · commit `{meta['commit']}` · {meta['machine']} · "
        f"{meta['seconds']:.0f} s in all",
        "",
    ]
    for name, desc in meta["targets"].items():
        lines.append(f"- **{name}**: {desc}")
    lines += ["", "Ratios are Herald's figure divided by the baseline's (lower is better for memory, time and "
              "latency; higher for rates and deliveries).", ""]
    if "herald" in targets:
        lines += ["## Targets of issue 5", "", "| scenario | target | measured | met |", "| --- | --- | --- | --- |"]
        for c in checks(results, meta["mode"] == "full"):
            met = "n/a (not at full size)" if c.met is None else ("yes" if c.met else "**no**")
            lines.append(f"| {c.scenario} | {c.required} | {c.measured} | {met} |")
        lines.append("")
        issue14 = checks14(results)
        if issue14:
            lines += ["## Targets of issue 14", "", "| scenario | target | measured | met |",
                      "| --- | --- | --- | --- |"]
            for c in issue14:
                met = "n/a (not at full size)" if c.met is None else ("yes" if c.met else "**no**")
                lines.append(f"| {c.scenario} | {c.required} | {c.measured} | {met} |")
            lines.append("")
    lines += _s_budget(results)
    lines += _c_budget(results, meta)
    lines += _p_budget(results)
    if any(r.scenario == "R" for r in results):
        from bench.proxy import budget

        lines += budget(results)
    lines += ["## Results", ""]
    head = ["scenario", "metric", *targets, *(f"herald/{b}" for b in baselines if "herald" in targets)]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    seen: list[tuple[str, str]] = []
    for r in results:
        if (r.scenario, r.variant) not in seen:
            seen.append((r.scenario, r.variant))
    for scenario, variant in seen:
        by_target = {r.target: r for r in results if r.scenario == scenario and r.variant == variant}
        sample = next(iter(by_target.values()))
        first = True
        for key, label, _ in metrics_of(sample):
            row = [f"{scenario}: {variant}" if first else "", label]
            values = {}
            for t in targets:
                res = by_target.get(t)
                if res is None:
                    row.append("n/a")
                elif res.error:
                    row.append("error" if first else "")
                else:
                    values[t] = res.metrics.get(key)
                    row.append(_fmt(values[t]))
            if "herald" in targets:
                row += [_fmt_ratio(ratio(values.get("herald"), values.get(b))) for b in baselines]
            lines.append("| " + " | ".join(row) + " |")
            first = False
    d_results = [r for r in results if r.scenario == "D" and not r.error]
    if d_results:
        lines += ["", "### D: each rate step", "",
                  "| target | ops/s asked | achieved | posted | accepted | delivered | p50 ms | p99 ms | max ms "
                  "| POST p99 ms |", "|" + " --- |" * 10]
        for r in d_results:
            for s in r.metrics["steps"]:
                lines.append(f"| {_label(r)} | {s['rate']} | {_fmt(s['achieved_rate'])} | {s['posted']} | "
                             f"{s['accepted']} | {s['delivered']} | {_fmt(s['p50_ms'])} | {_fmt(s['p99_ms'])} | "
                             f"{_fmt(s['max_ms'])} | {_fmt(s['post_p99_ms'])} |")
    errors = [r for r in results if r.error]
    notes = [(r, n) for r in results for n in r.notes]
    if errors or notes:
        lines += ["", "## Notes", ""]
        for r in errors:
            lines.append(f"- {r.scenario} {r.variant} / {r.target}: error: {r.error}")
        for r, n in notes:
            lines.append(f"- {r.scenario} {r.variant} / {r.target}: {n}")
    return "\n".join(lines) + "\n"


def write(out_dir: Path, results: list[Result], meta: dict[str, Any], targets: list[str]) -> Path:
    """Append the run to ``runs.jsonl`` and write its table; returns the table's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "runs.jsonl", "a") as fh:
        for r in results:
            fh.write(json.dumps({"run": meta["run"], "mode": meta["mode"], "commit": meta["commit"],
                                 "started": meta["started"], **asdict(r)}, default=str) + "\n")
        fh.write(json.dumps({"run": meta["run"], "summary": True, **meta,
                             "checks": [asdict(c) for c in checks(results, meta["mode"] == "full")],
                             "checks14": [asdict(c) for c in checks14(results)]},
                            default=str) + "\n")
    name = "latest.md" if meta["mode"] == "full" else f"latest-{meta['mode']}.md"
    path = out_dir / name
    path.write_text(markdown(results, meta, targets))
    return path
