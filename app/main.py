"""The chat application: Herald serving the chat domain and the chat page.

``herald serve --app app.main:app`` (the Procfile's ``web:``) serves it; ``herald worker
app.chat:chat`` runs its worker when ``REDIS_URL`` is set. ``create_app()`` builds a fresh one
(tests build one per settings).
"""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette

from app.chat import chat
from herald import Settings
from herald import create_app as create_herald_app

STATIC = Path(__file__).resolve().parent.parent / "static"


def create_app(settings: Settings | None = None) -> Starlette:
    """Herald with the chat domain and the chat page at ``/``."""
    return create_herald_app(settings or Settings.from_env(), domains=[chat], static=STATIC)
