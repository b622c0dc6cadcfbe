"""The web console: a Starlette app rendering Jinja2 templates, served by ``kafka-saga ui`` under uvicorn.

Reading needs nothing; the actions (retry, replay, cancel, set-attempts) need the console's token, given
once through the page's token form (kept in an HttpOnly, SameSite=Strict cookie) or as an
``Authorization: Bearer`` header. Without a configured token the console is read-only. Every action asks
for confirmation in the page and is written to the ``saga.audit`` log, allowed or refused.

Everything the pages load comes from this package (templates and ``static/``): no CDN, no web fonts.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from saga.cli.output import decode_context, format_duration, format_error, format_time, is_overdue
from saga.config import SagaConfig, build_manager
from saga.errors import SagaBusyError, SagaError, SagaStateError
from saga.manager import SagaManager
from saga.ui.filters import COUNT_LIMIT, cursor_of, parse_filters
from saga.ui.timeline import render_timeline
from storage import (
    TERMINAL_STATUSES,
    ExecutionNotFoundError,
    SagaStatus,
    StorageError,
    SupportsListOutbox,
)

__all__ = ["ACTIONS", "create_app"]

_audit = logging.getLogger("saga.audit")
_HERE = Path(__file__).parent
COOKIE = "kafka_saga_token"
#: Seconds the counts by status are shared between the pages that poll them.
COUNTS_TTL = 2.0
#: The actions the console offers, in the order it shows them.
ACTIONS = ("retry", "replay", "cancel", "set-attempts")


def _pretty(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS, default=str).decode()


def _templates() -> Environment:
    env = Environment(
        loader=FileSystemLoader(_HERE / "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["time"] = lambda v: format_time(v) or "-"
    env.filters["error"] = lambda v, width=None: format_error(v, width=width) or ""
    env.filters["json"] = lambda v: orjson.dumps(
        v, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS
    ).decode()
    return env


class Console:
    """The console's state: configuration, token, the manager its actions go through, the templates."""

    def __init__(self, config: SagaConfig, token: str | None, manager: SagaManager | None) -> None:
        self.config = config
        self.token = token or None
        self._given_manager = manager
        self.manager: SagaManager | None = manager
        self.templates = _templates()
        self.page_size = config.ui.page_size
        self._counts: tuple[float, dict[str, Any]] | None = None

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        if self.manager is None:
            self.manager = build_manager(self.config, consume_replies=False, relay_outbox=False)
        await self.manager.setup()
        try:
            yield
        finally:
            if self._given_manager is None:
                await self.manager.destroy()

    @property
    def m(self) -> SagaManager:
        assert self.manager is not None, "the console's lifespan sets the manager up"
        return self.manager

    def authorized(self, request: Request) -> bool:
        """Whether the request carries the console's token (always false when none is configured)."""
        if self.token is None:
            return False
        given = request.cookies.get(COOKIE) or ""
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            given = header[7:].strip()
        return hmac.compare_digest(given.encode(), self.token.encode())

    def render(self, request: Request, name: str, status_code: int = 200, **data: Any) -> HTMLResponse:
        page = self.templates.get_template(name).render(
            request=request,
            service=self.config.service.name,
            read_only=self.token is None,
            authorized=self.authorized(request),
            statuses=list(SagaStatus),
            **data,
        )
        return HTMLResponse(page, status_code=status_code)

    # -- pages -----------------------------------------------------------------------------------------

    async def executions(self, request: Request) -> Response:
        filters = parse_filters(request.query_params, request.query_params.getlist("status"))
        result = await self.m.storage.query(filters.query(self.page_size))
        now = datetime.now(UTC)
        rows = [
            {
                "record": r,
                "overdue": is_overdue(r, now),
                "error": format_error(r.error, width=90),
                "duration": format_duration(r.created_at, r.updated_at),
            }
            for r in result.rows
        ]
        next_link = None
        if len(result.rows) == self.page_size:
            next_link = filters.link(after=cursor_of(result.rows[-1]))
        return self.render(
            request,
            "list.html",
            rows=rows,
            summary=_summary(result.total, later=filters.after is not None),
            filters=filters,
            next_link=next_link,
            first_link=filters.link(after=None) if filters.after else None,
        )

    async def counts(self, request: Request) -> Response:
        # count_by_status scans the table: every open list page asks every few seconds, so the answer is
        # shared for COUNTS_TTL seconds instead of scanning once per page per poll.
        now = time.monotonic()
        if self._counts is None or now - self._counts[0] >= COUNTS_TTL:
            counts = await self.m.storage.count_by_status()
            body = {"counts": {s.value: counts.get(s, 0) for s in SagaStatus}, "total": sum(counts.values())}
            self._counts = (now, body)
        return JSONResponse(self._counts[1])

    async def execution(self, request: Request) -> Response:
        saga_id = _id(request)
        if saga_id is None:
            return self.render(request, "missing.html", 404, what=request.path_params["id"])
        storage = self.m.storage
        try:
            record = await storage.load(saga_id)
        except ExecutionNotFoundError:
            return self.render(request, "missing.html", 404, what=str(saga_id))
        replies = await storage.list_replies(saga_id)
        commands = await storage.list_outbox(saga_id) if isinstance(storage, SupportsListOutbox) else []
        now = datetime.now(UTC)
        by_request = {s.request_id: f"{s.name} ({s.phase})" for s in record.steps if s.request_id}
        return self.render(
            request,
            "execution.html",
            record=record,
            overdue=is_overdue(record, now),
            overdue_by=format_duration(record.reply_deadline, now) if is_overdue(record, now) else None,
            duration=format_duration(record.created_at, record.updated_at),
            terminal=record.status in TERMINAL_STATUSES,
            timeline=Markup(render_timeline(record, replies, now).svg),
            context=decode_context(record.state),
            replies=[(r, by_request.get(r.request_id)) for r in replies],
            commands=[(c, _payload(c.value)) for c in commands],
            actions=ACTIONS,
            done=request.query_params.get("done"),
            problem=request.query_params.get("problem"),
        )

    # -- token -----------------------------------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        form = await request.form()
        given = str(form.get("token", ""))
        back = _local(str(form.get("next", "/")))
        if self.token is None or not hmac.compare_digest(given.encode(), self.token.encode()):
            _audit.warning("console: wrong token from %s", _client(request))
            return self.render(request, "missing.html", 403, what="the token", refused=True)
        response = RedirectResponse(back, status_code=303)
        response.set_cookie(COOKIE, given, httponly=True, samesite="strict", path="/")
        return response

    async def logout(self, request: Request) -> Response:
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    # -- actions ---------------------------------------------------------------------------------------

    async def act(self, request: Request) -> Response:
        action = request.path_params["action"]
        saga_id = _id(request)
        if action not in ACTIONS or saga_id is None:
            return JSONResponse({"error": "no such action or execution"}, status_code=404)
        form = await request.form()
        who = _client(request)
        if not self.authorized(request):
            _audit.warning(
                "console: refused %s of execution %s from %s: %s",
                action,
                saga_id,
                who,
                "read-only console" if self.token is None else "no valid token",
                extra={"execution_id": str(saga_id), "action": action},
            )
            reason = "this console is read-only" if self.token is None else "the action needs the token"
            return JSONResponse({"error": f"refused: {reason}"}, status_code=403)
        if form.get("confirm") != "yes":
            return JSONResponse({"error": "the action was not confirmed"}, status_code=400)
        try:
            outcome = await self._apply(action, saga_id, form)
        except (SagaStateError, SagaBusyError, ExecutionNotFoundError, ValueError) as exc:
            _audit.warning(
                "console: %s of execution %s by %s failed: %s",
                action,
                saga_id,
                who,
                exc,
                extra={"execution_id": str(saga_id), "action": action},
            )
            return RedirectResponse(f"/executions/{saga_id}?problem={_quote(str(exc))}", status_code=303)
        except (SagaError, StorageError) as exc:
            _audit.exception("console: %s of execution %s by %s failed", action, saga_id, who)
            return RedirectResponse(
                f"/executions/{saga_id}?problem={_quote(f'{type(exc).__name__}: {exc}')}", status_code=303
            )
        _audit.warning(
            "console: %s of execution %s by %s: %s",
            action,
            saga_id,
            who,
            outcome,
            extra={"execution_id": str(saga_id), "action": action},
        )
        return RedirectResponse(f"/executions/{saga_id}?done={_quote(outcome)}", status_code=303)

    async def _apply(self, action: str, saga_id: uuid.UUID, form: Any) -> str:
        manager = self.m
        before = await manager.storage.load(saga_id)
        if action == "retry":
            after = await manager.retry(saga_id)
            return f"retried: {before.status.value} -> {after.status.value}"
        if action == "replay":
            if self.config.broker.type == "memory":
                raise ValueError("replay publishes the pending command, and broker.type is memory")
            await manager.replay(saga_id)
            return "replayed the pending command"
        if action == "cancel":
            reason = str(form.get("reason") or "").strip() or "cancelled from the console"
            execution = await manager.cancel(saga_id, reason=reason)
            return f"cancelled: {before.status.value} -> {execution.status.value}"
        text = str(form.get("attempts", "")).strip()
        try:
            attempts = int(text)
        except ValueError:
            raise ValueError(f"attempts: {text!r} is not a whole number") from None
        if attempts < 0:
            raise ValueError(f"attempts: must be 0 or more, got {attempts}")
        await manager.storage.set_recovery_attempts(saga_id, attempts)
        return f"recovery attempts {before.recovery_attempts} -> {attempts}"


def _summary(total: int, *, later: bool) -> str:
    if total >= COUNT_LIMIT:
        text = f"more than {COUNT_LIMIT - 1:,} executions match"
    else:
        text = f"{total:,} execution{'s match' if total != 1 else ' matches'}"
    return text + (" (a later page)" if later else "")


def _id(request: Request) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(request.path_params["id"]))
    except ValueError:
        return None


def _client(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "unknown client"


def _local(path: str) -> str:
    """Only redirect within the console (``next`` comes from a form)."""
    return path if path.startswith("/") and not path.startswith("//") else "/"


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text[:300], safe="")


def _payload(value: bytes) -> str:
    try:
        return orjson.dumps(orjson.loads(value), option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONDecodeError:
        return f"<{len(value)} bytes, not JSON>"


def create_app(
    config: SagaConfig, *, token: str | None = None, manager: SagaManager | None = None
) -> Starlette:
    """The console for ``config``'s storage; actions need ``token`` (``None``: read-only).

    With ``manager`` (already built; the app sets it up and leaves destroying it to the caller) the console
    uses it instead of building one from ``config``.
    """
    console = Console(config, token, manager)
    routes = [
        Route("/", console.executions),
        Route("/api/counts", console.counts),
        Route("/executions/{id}", console.execution),
        Route("/executions/{id}/{action}", console.act, methods=["POST"]),
        Route("/login", console.login, methods=["POST"]),
        Route("/logout", console.logout, methods=["POST"]),
        Mount("/static", StaticFiles(directory=_HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=console.lifespan)
    app.state.console = console
    return app
