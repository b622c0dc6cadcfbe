"""``kafka-saga demo`` on the embedded configuration, and the demo pieces it is made of."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from saga.cli.demo import ProgressDisplay
from saga.config import load_config
from saga.demo import CRASH_SWITCH, ORDER_SAGA, SimulatedCrash
from saga.demo.runner import DemoProgress, OrderPlan, OrderResult, plan_orders, run_demo
from saga.demo.services import DemoLedger
from storage import SagaStatus

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "saga.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        check=False,
    )


def summary_rows(stdout: str) -> dict[str, list[str]]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("OUTCOME"))
    rows = {}
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        cells = line.split()
        rows[cells[0]] = cells[1:4]
    return rows


@pytest.mark.slow
def test_demo_on_the_embedded_default(tmp_path: Path) -> None:
    database = tmp_path / "demo.sqlite3"
    result = run_cli("demo", "--config", "config/default.yml", env={"SAGA_SQLITE_PATH": str(database)})
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.startswith("kafka-saga demo: 20 orders through saga 'demo-order' (in-memory broker, storage ")
    assert summary_rows(out) == {
        "finished": ["16", "16", "ok"],
        "errored": ["3", "3", "ok"],
        "recovered": ["1", "1", "ok"],
        "total": ["20", "20", "ok"],
    }
    assert "statuses in storage: ERRORED 3, FINISHED 17" in out
    assert (
        "participants: 20 stock reservations (3 released), 17 charges (3 declined, 0 refunded), 17 shipments"
        in out
    )
    assert re.search(
        r"crashed: order-\w+-0012 \(execution [0-9a-f-]{36}\): RUNNING after the crash, FINISHED", out
    )
    assert re.search(r"result: OK, all 20 sagas reached their expected status in [\d.]+s", out)
    # Not a terminal: plain progress lines on stderr, one per order plus the recovery.
    progress = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert len(progress) == 21
    assert progress[-1].endswith("recovered, now FINISHED")
    assert database.exists()

    # The executions stay in the database for the admin commands.
    stats = run_cli(
        "stats", "--json", "--config", "config/default.yml", env={"SAGA_SQLITE_PATH": str(database)}
    )
    assert stats.returncode == 0, stats.stderr
    assert '"total": 20' in stats.stdout


@pytest.mark.slow
def test_demo_without_a_crash_and_fewer_orders(tmp_path: Path) -> None:
    result = run_cli(
        "demo",
        "--orders",
        "5",
        "--no-crash",
        "--config",
        "config/default.yml",
        env={"SAGA_SQLITE_PATH": str(tmp_path / "demo.sqlite3")},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert summary_rows(result.stdout) == {
        "finished": ["4", "4", "ok"],
        "errored": ["1", "1", "ok"],
        "total": ["5", "5", "ok"],
    }


# -- in process (fast, and counted by coverage) --------------------------------------------------------


def test_plan_orders() -> None:
    plans = plan_orders(20, run_tag="t")
    assert [p.index for p in plans if p.declined] == [3, 10, 17]
    assert [p.index for p in plans if p.crash] == [11]
    assert plans[0].order_id == "order-t-0001"
    assert [p.expected for p in plans].count("finished") == 16
    assert plans[11].expected == "recovered"
    assert plans[11].expected_status is SagaStatus.FINISHED
    assert plans[3].expected_status is SagaStatus.ERRORED
    assert plans[3].context()["card"] != plans[0].context()["card"]
    assert not any(p.crash for p in plan_orders(20, crash=False))
    assert [p.crash for p in plan_orders(1)] == [True]
    assert plan_orders(0) == []


async def test_run_demo_in_memory() -> None:
    seen: list[DemoProgress] = []
    report = await run_demo(load_config(REPO / "config" / "test.yml"), orders=12, on_progress=seen.append)
    assert report.ok, report.problems
    assert report.statuses() == {SagaStatus.FINISHED: 10, SagaStatus.ERRORED: 2}
    assert report.count("recovered", actual=True) == 1
    crashed = [r for r in report.results if r.crashed]
    assert len(crashed) == 1
    assert crashed[0].status_after_crash is SagaStatus.RUNNING
    assert crashed[0].recovered
    assert seen[-1].phase == "done"
    assert seen[-1].done == 12
    assert {p.phase for p in seen} == {"running", "recovering", "done"}
    ledger = report.ledger
    for result in report.results:
        order = result.plan.order_id
        if result.plan.declined:
            assert order in ledger.declined and not ledger.holds_stock(order) and order not in ledger.shipped
        else:
            assert ledger.holds_stock(order) and ledger.holds_payment(order) and order in ledger.shipped


async def test_an_unrecovered_crash_is_reported() -> None:
    async def no_recovery(*args: object, **kwargs: object) -> None:
        return None

    config = load_config(REPO / "config" / "test.yml")
    import saga.demo.runner as runner

    original = runner._recover_crashed
    runner._recover_crashed = no_recovery  # type: ignore[assignment]
    try:
        report = await run_demo(config, orders=3, time_limit=30)
    finally:
        runner._recover_crashed = original
    assert not report.ok
    assert len(report.problems) == 1
    assert report.problems[0].endswith("expected FINISHED, got RUNNING and was not recovered")


async def test_time_limit() -> None:
    report = await run_demo(load_config(REPO / "config" / "test.yml"), orders=4, time_limit=0.001)
    assert report.timed_out
    assert not report.ok
    assert "gave up after 0.001s" in report.problems[0]


def test_crash_switch() -> None:
    CRASH_SWITCH.reset()
    CRASH_SWITCH.arm("a")
    assert CRASH_SWITCH.take("a")
    assert not CRASH_SWITCH.take("a")
    assert CRASH_SWITCH.crashed == ["a"]
    CRASH_SWITCH.reset()
    assert CRASH_SWITCH.crashed == []
    assert issubclass(SimulatedCrash, BaseException) and not issubclass(SimulatedCrash, Exception)


def test_the_demo_saga() -> None:
    assert ORDER_SAGA.committed
    assert ORDER_SAGA.step_names() == [
        "create_order",
        "reserve_stock",
        "charge_payment",
        "schedule_shipping",
        "confirm_order",
    ]


def test_order_plan_is_frozen() -> None:
    plan = OrderPlan(index=0, order_id="o", declined=False, crash=False)
    with pytest.raises(AttributeError):
        plan.crash = True  # type: ignore[misc]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _progress(phase: str, done: int, last: OrderResult | None = None) -> DemoProgress:
    return DemoProgress(
        phase=phase,
        total=3,
        done=done,
        finished=done,
        errored=0,
        crashed=0,
        recovered=0,
        elapsed=0.5,
        last=last,
    )


def test_progress_on_a_terminal_rewrites_one_line() -> None:
    stream = _Terminal()
    display = ProgressDisplay(stream)
    display(_progress("running", 1))
    display(_progress("running", 2))
    display(_progress("done", 3))
    text = stream.getvalue()
    assert text.count("\r") == 3
    assert text.count("\n") == 1 and text.endswith("\n")
    assert "[done] 3/3 done · 3 finished · 0 errored · 0 crashed · 0 recovered · 0.5s" in text


def test_progress_elsewhere_prints_a_line_per_order() -> None:
    stream = io.StringIO()
    display = ProgressDisplay(stream)
    plan = OrderPlan(index=0, order_id="order-x-0001", declined=False, crash=False)
    display(_progress("running", 0))
    display(_progress("running", 1, OrderResult(plan, status=SagaStatus.FINISHED)))
    crashed = OrderResult(plan, status=SagaStatus.RUNNING, crashed=True)
    display(_progress("running", 2, crashed))
    display(
        DemoProgress(
            phase="recovering", total=3, done=2, finished=1, errored=0, crashed=1, recovered=0, elapsed=1.0
        )
    )
    assert stream.getvalue().splitlines() == [
        "[1/3] order-x-0001  FINISHED",
        "[2/3] order-x-0001  CRASHED (simulated), left RUNNING in storage",
        "recovering 1 crashed execution(s) ...",
    ]


def test_the_ledger_keeps_to_this_runs_orders() -> None:
    ledger = DemoLedger(
        reserved={"a": 1, "old": 2},
        released={"old"},
        charged={"a": 10, "old": 5},
        declined={"old"},
        refunded={"old"},
        shipped={"a": "t1", "old": "t0"},
    )
    mine = ledger.only(["a"])
    assert mine == DemoLedger(reserved={"a": 1}, charged={"a": 10}, shipped={"a": "t1"})
