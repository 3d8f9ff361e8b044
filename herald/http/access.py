"""Who may subscribe to which topic: the domains' topic rules applied to subscribe tokens.

A domain declares, per topic pattern, who may subscribe (:meth:`herald.Domain.topic`):

* ``anyone``: no token is needed;
* ``token`` (the default, and the rule of a topic no pattern matches): a subscribe token that
  names the topic, as a domain's read route hands out with ``Gateway.topic_urls``;
* ``owner``: such a token, issued to a subject (the bearer of the request that got it), and a
  connection that carries no other subject's bearer. Without bearer authentication there are no
  subjects, and ``owner`` is ``token``.

An operation's topic is its owner's: push.py checks the operation's stored owner as well.
"""

from __future__ import annotations

from herald.auth import Grant, TokenError, TokenSigner
from herald.domain import Catalog


class TopicAccess:
    """Applies a catalog's topic rules to a connection's token and bearer subject."""

    def __init__(self, catalog: Catalog, signer: TokenSigner, *, subjects: bool) -> None:
        self.catalog = catalog
        self.signer = signer
        self.subjects = subjects
        """Whether bearer authentication is on (so tokens carry subjects)."""

    def rule(self, topic: str) -> str:
        """``anyone``, ``token`` or ``owner`` for ``topic``."""
        found = self.catalog.topic_rule(topic)
        return found.subscribe if found is not None else "token"

    def check(self, token: str | None, topics: list[str], caller: str | None) -> Grant:
        """The grant that opens ``topics`` to this connection; :class:`TokenError` (401/403) otherwise."""
        rules = {topic: self.rule(topic) for topic in topics}
        guarded = [topic for topic in topics if rules[topic] != "anyone"]
        if not guarded:
            return Grant(frozenset(topics), caller, 0)
        grant = self.signer.check(token, guarded)
        if self.subjects:
            for topic in guarded:
                if rules[topic] == "owner" and (grant.subject is None or caller not in (None, grant.subject)):
                    raise TokenError(403, f"topic {topic!r} is open only to the subject its token was issued to")
        return grant
