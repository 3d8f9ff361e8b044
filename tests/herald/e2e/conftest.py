"""The Herald process the end-to-end tests talk to (embedded default), one per module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.server import HeraldServer


@pytest.fixture(scope="module")
def server() -> Iterator[HeraldServer]:
    """Herald as ``uvicorn app.main:create_app --factory`` on a free port, stopped with SIGTERM after."""
    with HeraldServer({"HERALD_HEARTBEAT": "1"}) as herald:
        yield herald
        if herald.process is not None and herald.process.poll() is not None:
            pytest.fail(f"herald died during the tests:\n{herald.log()}")
