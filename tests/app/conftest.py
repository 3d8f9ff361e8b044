"""The chat application's tests use the same harness as Herald's own HTTP tests."""

from __future__ import annotations

from tests.herald.http.conftest import herald, idle_herald, live, make_herald, make_live

__all__ = ["herald", "idle_herald", "live", "make_herald", "make_live"]
