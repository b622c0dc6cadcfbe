"""The web console in a real browser: headless Chromium (Debian's) driven by Playwright against
``kafka-saga ui`` processes on a PostgreSQL database seeded with real executions."""

from __future__ import annotations

from typing import Any

import pytest

from tests.browser.conftest import TOKEN, Console, World, screenshot

pytestmark = [pytest.mark.postgres, pytest.mark.browser]


def ids_on(page: Any) -> list[str]:
    return page.locator("#executions tbody tr[data-id]").evaluate_all("rows => rows.map(r => r.dataset.id)")


def test_list_shows_live_counts_and_filters(page: Any, console: Console, world: World) -> None:
    s = world.seeded
    page.goto(console.url + "/")
    page.wait_for_selector("#counts[data-loaded]")
    counts = {
        status: page.locator(f'[data-count="{status}"]').inner_text()
        for status in ("finished", "errored", "dead_letter", "paused", "total")
    }
    assert counts == {"finished": "3", "errored": "2", "dead_letter": "1", "paused": "2", "total": "8"}
    assert page.locator("#summary").inner_text().startswith("8 executions match")
    first = ids_on(page)
    assert len(first) == 4  # ui.page_size
    screenshot(page, "list")

    page.click("#next")  # keyset paging: the next four, none repeated
    second = ids_on(page)
    assert len(second) == 4 and not set(first) & set(second)

    page.goto(console.url + "/")
    page.check('input[name="status"][value="dead_letter"]')
    page.click('#filters button[type="submit"]')
    assert ids_on(page) == [str(s.dead)]

    page.goto(console.url + "/")
    page.check('input[name="overdue"]')
    page.click('#filters button[type="submit"]')
    assert ids_on(page) == [str(s.overdue)]
    assert page.locator(f'tr[data-id="{s.overdue}"] .pill.overdue').is_visible()
    screenshot(page, "list-overdue")

    page.goto(console.url + "/")
    page.fill('input[name="key"]', s.keyed)
    page.click('#filters button[type="submit"]')
    assert ids_on(page) == [str(s.finished[1])]

    page.goto(console.url + "/")
    page.fill('input[name="error"]', "ADDRESS does not")
    page.click('#filters button[type="submit"]')
    assert ids_on(page) == [str(s.dead)]

    page.goto(console.url + "/?saga=hold-order&version=1")
    assert ids_on(page) == [str(s.paused)]
    page.goto(console.url + "/?saga=hold-order&version=2")
    assert ids_on(page) == []
    page.goto(console.url + "/?since=2999-01-01T00:00")
    assert ids_on(page) == []
    page.goto(console.url + "/?until=2999-01-01T00:00&status=errored")
    assert sorted(ids_on(page)) == sorted([str(s.compensated), str(s.timed_out)])
    page.goto(console.url + "/?since=yesterday")
    assert "since: 'yesterday' is not an ISO-8601 time" in page.locator(".problem").inner_text()


def test_timeline_renders(page: Any, console: Console, world: World) -> None:
    s = world.seeded
    page.goto(f"{console.url}/executions/{s.timed_out}")
    svg = page.locator("#timeline svg")
    assert svg.is_visible()
    box = svg.bounding_box()
    assert box is not None and box["width"] > 600 and box["height"] > 100
    # create, reserve, charge (2 attempts, timed out), then the compensations of reserve and create
    assert page.locator("#timeline rect.attempt").count() >= 6
    charge = page.locator('#timeline rect.attempt[data-step="charge"][data-phase="execute"]')
    assert charge.count() == 2  # one bar per attempt
    assert page.locator("#timeline g.timeout").count() == 1
    assert page.locator('#timeline rect.attempt[data-phase="compensate"]').count() == 2
    assert page.locator("#timeline g.reply-applied").count() >= 2
    assert "timeout" in page.locator("#error").inner_text()
    screenshot(page, "timeline-timeout")
    page.locator("#timeline").screenshot(path=str(screenshot(page, "page-timeout").with_name("timeline.png")))

    page.goto(f"{console.url}/executions/{s.finished[0]}")
    assert page.locator("#timeline g.reply-duplicate").count() == 1
    assert page.locator("#timeline g.reply-stale").count() == 1
    assert page.locator("#replies .reply-duplicate").count() == 1
    page.locator("details.command").first.click()
    assert "saga-request-id" in page.locator("details.command").first.inner_text()
    screenshot(page, "timeline-finished")

    page.goto(f"{console.url}/executions/{s.compensated}")
    assert page.locator('#timeline rect.attempt[data-step="charge"][data-status="failed"]').count() == 1
    screenshot(page, "timeline-compensated")


def _post(page: Any, console: Console, saga_id: object, action: str) -> int:
    response = page.request.post(f"{console.url}/executions/{saga_id}/{action}", form={"confirm": "yes"})
    return int(response.status)


def test_actions_are_refused_without_the_token(
    page: Any, read_only_console: Console, console: Console, world: World
) -> None:
    s = world.seeded
    page.goto(f"{read_only_console.url}/executions/{s.dead}")
    assert page.locator(".badge.ro").inner_text() == "read-only"
    for action in ("retry", "replay", "cancel", "set-attempts"):
        assert page.locator(f"#action-{action}").is_disabled()
    assert _post(page, read_only_console, s.dead, "retry") == 403
    assert "refused retry of execution" in read_only_console.log_text()

    page.goto(f"{console.url}/executions/{s.paused}")
    assert page.locator("#action-cancel").is_disabled()
    assert _post(page, console, s.paused, "cancel") == 403
    page.fill('#login input[name="token"]', "wrong")
    page.click('#login button[type="submit"]')
    assert "not the console's token" in page.locator(".problem").inner_text()
    page.goto(f"{console.url}/executions/{s.paused}")
    assert page.locator("#status").inner_text() == "paused"  # nothing changed
    page.goto(f"{console.url}/executions/{s.dead}")
    assert page.locator("#status").inner_text() == "dead_letter"


def test_retry_and_cancel_with_the_token(page: Any, console: Console, world: World) -> None:
    s = world.seeded
    page.goto(f"{console.url}/executions/{s.dead}")
    page.fill('#login input[name="token"]', TOKEN)
    page.click('#login button[type="submit"]')
    assert page.locator(".badge.ok").inner_text() == "actions enabled"
    assert page.locator("#action-retry").is_enabled()

    dialogs: list[str] = []

    def answer(dialog: Any, accept: bool) -> None:
        dialogs.append(dialog.message)
        dialog.accept() if accept else dialog.dismiss()

    page.once("dialog", lambda d: answer(d, False))  # asked, and declined: nothing happens
    page.click("#action-retry")
    assert page.locator("#status").inner_text() == "dead_letter"
    page.once("dialog", lambda d: answer(d, True))
    page.click("#action-retry")
    page.wait_for_selector("#done")
    assert page.locator("#done").inner_text() == "retried: dead_letter -> failed"
    assert page.locator("#status").inner_text() == "failed"

    page.goto(f"{console.url}/executions/{s.paused}")
    page.fill('input[name="reason"]', "customer called")
    page.once("dialog", lambda d: answer(d, True))
    page.click("#action-cancel")
    page.wait_for_selector("#done")
    assert page.locator("#done").inner_text() == "cancelled: paused -> errored"
    assert page.locator("#status").inner_text() == "errored"
    assert "customer called" in page.locator("#error").inner_text()
    screenshot(page, "cancelled")

    page.goto(f"{console.url}/executions/{s.finished[2]}")
    page.once("dialog", lambda d: answer(d, True))
    page.click("#action-cancel")
    assert "cannot cancel execution" in page.locator("#problem").inner_text()
    assert dialogs[0].startswith("Move this execution back to recovery")
    log = console.log_text()
    assert f"console: retry of execution {s.dead}" in log
    assert f"console: cancel of execution {s.paused}" in log
    assert "refused cancel of execution" in log
