"""A small domain for the token-expiry attacks (finding 14), served by ``herald serve --domain``.

``POST /posts/{kind}/{board}`` publishes ``Posted`` on ``{kind}/{board}``: ``notices/…`` topics are
open to anyone (no token, so nothing to expire), ``drafts/…`` topics need a subscribe token.
"""

from __future__ import annotations

from typing import Any

from herald import Context, Domain

board = Domain("board")
board.topic("notices/{board}", subscribe="anyone")
board.topic("drafts/{board}", subscribe="token")


@board.command("POST", "/posts/{kind}/{board}", event="PostRequested",
               schema={"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}})
def post(params: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
    """Post ``n`` to the topic ``{kind}/{board}``."""
    return {"topic": f"{params['kind']}/{params['board']}", "n": body["n"]}


@board.handler("PostRequested")
async def publish(ctx: Context) -> None:
    """Publish the post on its topic as the operation ends."""
    ctx.stage("Posted", {"n": ctx.data["n"]}, topics=[ctx.data["topic"]])
    await ctx.succeed({"n": ctx.data["n"]})
