"""The web console (``kafka-saga ui``): needs the ``kafka-saga[ui]`` extra (Starlette, Jinja2, uvicorn)."""

from saga.ui.app import ACTIONS, create_app
from saga.ui.timeline import Timeline, render_timeline

__all__ = ["ACTIONS", "Timeline", "create_app", "render_timeline"]
