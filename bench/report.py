"""Turn the driver's raw results into the target checks and the markdown table."""

from __future__ import annotations

from typing import Any

LIB_LABEL = {
    "kafka-saga": "**kafka-saga**",
    "python-cqrs": "python-cqrs",
    "dbos": "DBOS (async API)",
    "dbos-sync": "DBOS (sync API, threads)",
    "minos": "Minos",
    "floor": "floor (asyncpg by hand)",
}
SCEN_LABEL = {"seq": "one at a time", "conc50": "50 at once", "fail": "step 3 fails, 2 and 1 compensate"}


def _index(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in doc.get("results", [])}


def _m(idx: dict[str, dict[str, Any]], name: str, key: str) -> float | None:
    r = idx.get(name)
    if not r or r.get("error"):
        return None
    v = r.get("median", {}).get(key)
    return float(v) if isinstance(v, (int, float)) else None


def _faster(idx: dict[str, dict[str, Any]], names: list[str]) -> str:
    """The name, among ``names``, of the measured entry with the highest throughput (else the first)."""
    measured = [(v, n) for n in names if (v := _m(idx, n, "sagas_per_s")) is not None]
    return max(measured)[1] if measured else names[0]


def targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target: what, the measured ratio or value, the bound, met (True/False/None = not measured)."""
    idx = _index(doc)
    out: list[dict[str, Any]] = []

    def ratio(
        what: str,
        a: str,
        b: str,
        key: str,
        bound: float,
        *,
        higher_is_better: bool = True,
        invert: bool = False,
    ) -> None:
        va, vb = _m(idx, a, key), _m(idx, b, key)
        if va is None or vb is None or vb == 0:
            out.append({"target": what, "value": None, "bound": bound, "met": None})
            return
        val = vb / va if invert else va / vb
        met = val >= bound if higher_is_better else val <= bound
        out.append({"target": what, "value": round(val, 2), "bound": bound, "met": met})

    for scen in ("seq", "conc50"):
        label = SCEN_LABEL[scen]
        ks = f"local:kafka-saga:postgres:{scen}"
        ratio(
            f"PostgreSQL, {label}: kafka-saga / python-cqrs sagas/s >= 5",
            ks,
            f"local:python-cqrs:postgres:{scen}",
            "sagas_per_s",
            5.0,
        )
        ratio(
            f"PostgreSQL, {label}: kafka-saga / DBOS (its faster API) sagas/s >= 5",
            ks,
            _faster(idx, [f"local:dbos:postgres:{scen}", f"local:dbos-sync:postgres:{scen}"]),
            "sagas_per_s",
            5.0,
        )
        ratio(
            f"PostgreSQL, {label}: kafka-saga / asyncpg floor sagas/s >= 0.5 (within 2x)",
            ks,
            f"local:floor:postgres:{scen}",
            "sagas_per_s",
            0.5,
        )
    for scen in ("seq", "conc50"):
        ratio(
            f"Memory, {SCEN_LABEL[scen]}: kafka-saga / python-cqrs sagas/s >= 3",
            f"local:kafka-saga:memory:{scen}",
            f"local:python-cqrs:memory:{scen}",
            "sagas_per_s",
            3.0,
        )
    for n in (1, 50, 500):
        ratio(
            f"Remote steps, {n} in flight: p50 per step / floor's <= 1.5",
            f"remote:kafka-saga:inflight{n}",
            f"remote:floor:inflight{n}",
            "step_p50_us",
            1.5,
            higher_is_better=False,
        )
    ratio(
        "Remote steps, 500 in flight: steps/s / floor's >= 0.5",
        "remote:kafka-saga:inflight500",
        "remote:floor:inflight500",
        "steps_per_s",
        0.5,
    )
    for n in (1, 50, 500):
        ratio(
            f"Participant, {n} in flight: transactional store / dedup store commands/s >= 0.8",
            f"participant:kafka-saga:transactional:inflight{n}",
            f"participant:kafka-saga:dedup:inflight{n}",
            "commands_per_s",
            0.8,
        )
    p50 = _m(idx, "recovery:kafka-saga", "p50_ms")
    rows = (idx.get("recovery:kafka-saga") or {}).get("config", {}).get("rows")
    out.append(
        {
            "target": f"get_sagas_for_recovery(limit=100) p50 < 5 ms at {rows or '?':,} rows"
            if isinstance(rows, int)
            else "get_sagas_for_recovery(limit=100) p50 < 5 ms",
            "value": p50,
            "bound": 5.0,
            "met": None if p50 is None else p50 < 5.0,
        }
    )
    return out


DASH = "\u2013"
NOT_MET = {True: "yes", False: "**no**", None: "not measured"}


def _fmt(v: Any, nd: int = 0) -> str:
    if v is None:
        return DASH
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _row(*cells: Any) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _header(doc: dict[str, Any]) -> list[str]:
    m = doc.get("machine", {})
    pg = doc.get("postgres", {})
    kind = ""
    if doc.get("quick"):
        kind += " \u2014 QUICK (smoke sizes, not figures)"
    if doc.get("only"):
        kind += f" \u2014 partial: `{doc.get('only')}`"
    lines = [
        "# kafka-saga benchmark results",
        "",
        f"Run {doc.get('started')} ({doc.get('duration_s')} s){kind}; "
        f"kafka-saga at `{doc.get('kafka_saga_commit')}`; "
        f"median of {doc.get('runs_per_scenario')} runs per scenario.",
        "",
        f"Machine: {m.get('cpu', '?')}, {m.get('cores')} cores, {m.get('memory_gib')} GiB, "
        f"{m.get('platform')}; Python {m.get('python')}; load average (1/5/15 min) at start "
        f"{_load(m.get('loadavg'))}, at end {_load(m.get('loadavg_end'))}.",
    ]
    if pg:
        lines.append(
            f"PostgreSQL {pg.get('server_version')}: fsync={pg.get('fsync')}, "
            f"synchronous_commit={pg.get('synchronous_commit')}, wal_sync_method={pg.get('wal_sync_method')}."
        )
    peers = doc.get("peers") or {}
    if peers:
        vers = []
        for name, st in peers.items():
            v = ", ".join(f"{k} {x}" for k, x in st.get("versions", {}).items()) or DASH
            vers.append(f"{name}: {v} ({st.get('install', '?')})")
        lines.append("Peers: " + "; ".join(vers) + ".")
    lines.append("")
    return lines


def _local(doc: dict[str, Any], idx: dict[str, dict[str, Any]]) -> list[str]:
    local = [r for r in doc.get("results", []) if r.get("group") == "local"]
    if not local:
        return []
    lines = [
        "## Saga of 3 local steps",
        "",
        "Each step adds one key to the context. With PostgreSQL every completed step is durable (fsync "
        "on) before the next one starts (Minos: see the notes). µs/saga is wall time per saga (1 / "
        "throughput); client CPU is the benchmark process's CPU time per saga. SQL statements "
        "(pg_stat_statements calls, BEGIN/COMMIT included) and commits (pg_stat_database.xact_commit, "
        "first run) are per saga, in the library's own database; WAL fsyncs (pg_stat_wal.wal_sync, whole "
        "server, first run) count the flushes to disk, including the WAL writer's background flushes of "
        "commits that did not wait for one.",
        "",
        _row(
            "library",
            "storage",
            "scenario",
            "sagas/s",
            "µs/saga",
            "client CPU µs/saga",
            "SQL stmts/saga",
            "commits/saga",
            "WAL fsyncs/saga",
        ),
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in local:
        md = r.get("median", {})
        head = (LIB_LABEL.get(r["lib"], r["lib"]), r["storage"], SCEN_LABEL.get(r["scenario"], r["scenario"]))
        if r.get("error"):
            lines.append(_row(*head, f"not run: {_short(r['error'])}", "", "", "", "", ""))
            continue
        lines.append(
            _row(
                *head,
                _fmt(md.get("sagas_per_s")),
                _fmt(md.get("us_per_saga")),
                _fmt(md.get("client_cpu_us_per_saga")),
                _fmt(md.get("sql_statements_per_saga"), 1),
                _fmt(md.get("commits_per_saga"), 1),
                _fmt(md.get("wal_syncs_per_saga"), 1),
            )
        )
    lines.append("")
    return lines + _ratio_table(idx)


def _remote(doc: dict[str, Any]) -> list[str]:
    remote = [r for r in doc.get("results", []) if r.get("group") == "remote"]
    if not remote:
        return []
    lines = [
        "## Saga of 3 remote steps over Kafka + PostgreSQL",
        "",
        "Per remote step: from the step starting to the next step starting (the last one: to `run()` "
        "returning), i.e. the command's durable write, the Kafka round trip through an in-process "
        "participant, and the reply's durable write. The floor is a raw aiokafka request/reply ping-pong "
        "with two asyncpg autocommit writes per hop, at the same number of sagas in flight.",
        "",
        _row(
            "implementation",
            "sagas in flight",
            "p50 µs/step",
            "p99 µs/step",
            "remote steps/s",
            "client CPU µs/step",
            "SQL stmts/saga",
            "commits/saga",
            "WAL fsyncs/saga",
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in remote:
        md = r.get("median", {})
        head = (LIB_LABEL.get(r["lib"], r["lib"]), r["scenario"].removeprefix("inflight"))
        if r.get("error"):
            lines.append(_row(*head, f"not run: {_short(r['error'])}", "", "", "", "", "", ""))
            continue
        lines.append(
            _row(
                *head,
                _fmt(md.get("step_p50_us")),
                _fmt(md.get("step_p99_us")),
                _fmt(md.get("steps_per_s")),
                _fmt(md.get("client_cpu_us_per_step")),
                _fmt(md.get("sql_statements_per_saga"), 1),
                _fmt(md.get("commits_per_saga"), 1),
                _fmt(md.get("wal_syncs_per_saga"), 1),
            )
        )
    lines.append("")
    return lines


def _recovery(idx: dict[str, dict[str, Any]]) -> list[str]:
    rec = idx.get("recovery:kafka-saga")
    if not rec:
        return []
    md = rec.get("median", {})
    lines = [
        "## Recovery query",
        "",
        "`get_sagas_for_recovery(limit=100)` through kafka-saga's `SqlAlchemySagaStorage`, rows inserted by "
        "`INSERT ... SELECT generate_series` (97% finished, 1.5% errored, 0.5% dead letter; 1% running, "
        "failed, compensating or paused, spread over 30 days of `updated_at`).",
        "",
        _row("rows stored", "recoverable rows", "calls", "p50 ms", "p99 ms", "mean ms"),
        "|---:|---:|---:|---:|---:|---:|",
    ]
    if rec.get("error"):
        lines.append(_row(f"not run: {_short(rec['error'])}", "", "", "", "", ""))
    else:
        lines.append(
            _row(
                _fmt(md.get("rows")),
                _fmt(md.get("candidates")),
                _fmt(md.get("calls")),
                _fmt(md.get("p50_ms"), 2),
                _fmt(md.get("p99_ms"), 2),
                _fmt(md.get("mean_ms"), 2),
            )
        )
    plan = (rec.get("info") or {}).get("plan")
    if plan:
        lines += ["", "Plan (EXPLAIN ANALYZE of the storage's statement):", "", "```", *plan, "```"]
    return [*lines, ""]


def _memory(idx: dict[str, dict[str, Any]]) -> list[str]:
    mem = idx.get("memory-rss:kafka-saga")
    if not mem:
        return []
    md = mem.get("median", {})
    lines = [
        "## Memory",
        "",
        "RSS growth of the orchestrator process while sagas wait in memory for a remote reply "
        "(`pause_on_disk=False`; in-memory broker and storage, no participant, so nothing replies).",
        "",
        _row("sagas waiting", "RSS growth MiB", "MiB per 10,000", "KiB per saga"),
        "|---:|---:|---:|---:|",
    ]
    if mem.get("error"):
        lines.append(_row(f"not run: {_short(mem['error'])}", "", "", ""))
    else:
        lines.append(
            _row(
                _fmt(md.get("sagas")),
                _fmt(md.get("rss_growth_mib"), 1),
                _fmt(md.get("rss_mib_per_10k"), 1),
                _fmt(md.get("kib_per_saga"), 2),
            )
        )
    return [*lines, ""]


def markdown(doc: dict[str, Any]) -> str:
    idx = _index(doc)
    lines = _header(doc) + _local(doc, idx) + _remote(doc) + _recovery(idx) + _memory(idx)
    tg = doc.get("targets") or []
    if tg:
        lines += ["## Targets", "", _row("target", "measured", "met"), "|---|---:|:---:|"]
        lines += [_row(t["target"], _fmt(t["value"], 2), NOT_MET[t["met"]]) for t in tg]
        lines.append("")
    errs = [r for r in doc.get("results", []) if r.get("error")]
    if errs:
        lines += ["## Not run or failed", ""]
        lines += [f"- `{r['name']}`: {r['error']}" for r in errs]
        lines.append("")
    for name, st in (doc.get("peers") or {}).items():
        if st.get("install_error"):
            lines += [
                f"{name}: the plain `pip install` failed with:",
                "",
                "```",
                st["install_error"],
                "```",
                "",
            ]
    return "\n".join(lines)


def _ratio_table(idx: dict[str, dict[str, Any]]) -> list[str]:
    rows = []
    for storage in ("postgres", "memory"):
        for scen in ("seq", "conc50", "fail"):
            ks = _m(idx, f"local:kafka-saga:{storage}:{scen}", "sagas_per_s")
            if ks is None:
                continue
            cells = []
            for lib in ("python-cqrs", "dbos", "minos", "floor"):
                # Minos has no PostgreSQL saga storage: its durable figure is on LMDB.
                st = "lmdb" if lib == "minos" and storage == "postgres" else storage
                name = f"local:{lib}:{st}:{scen}"
                if lib == "dbos":
                    name = _faster(idx, [name, f"local:dbos-sync:{st}:{scen}"])
                v = _m(idx, name, "sagas_per_s")
                cells.append(f"{ks / v:.2f}x" if v else DASH)
            rows.append(_row(storage, SCEN_LABEL[scen], *cells))
    if not rows:
        return []
    return [
        "kafka-saga's throughput divided by each other's (above 1: kafka-saga is faster; DBOS: its faster "
        "API; Minos's durable row is its LMDB figure):",
        "",
        _row("storage", "scenario", "vs python-cqrs", "vs DBOS", "vs Minos", "vs floor"),
        "|---|---|---:|---:|---:|---:|",
        *rows,
        "",
    ]


def _short(err: str) -> str:
    return err.replace("|", "/").splitlines()[0][:120]


def _load(v: Any) -> str:
    return "/".join(f"{x:.2f}" for x in v) if v else "?"
