"""The token-expiry wheel: one bucket per second, one slot per subscriber, each taken out once at its second."""

from __future__ import annotations

import random

from herald.expiry import ExpiryWheel
from herald.hub import Subscriber

T0 = 1_800_000_000  # a Unix second


def test_many_subscribers_are_each_taken_out_once_at_their_second() -> None:
    rng = random.Random(13)
    wheel = ExpiryWheel()
    subs = [Subscriber(10) for _ in range(2000)]
    expiry = {sub: T0 + rng.randrange(1, 120) for sub in subs}
    for sub, at in expiry.items():
        wheel.add(sub, at)
    assert len(wheel) == len(subs)
    taken: dict[Subscriber, float] = {}
    now = T0 + 0.5
    while now < T0 + 125:
        for sub in wheel.expire(now):
            assert sub not in taken, "a subscriber was taken out twice"
            taken[sub] = now
        now += rng.choice([0.25, 0.5, 1.0, 3.0])  # sweeps late, early, and skipping seconds
    assert taken.keys() == expiry.keys()
    for sub, at in taken.items():
        assert expiry[sub] <= at < expiry[sub] + 3.25, "taken out before its second, or more than a step after"
        assert sub.expires_at is None
    assert len(wheel) == 0


def test_a_subscriber_holds_one_slot_its_earliest_expiry() -> None:
    wheel = ExpiryWheel()
    sub = Subscriber(10)
    wheel.add(sub, T0 + 10)
    wheel.add(sub, T0 + 20)  # a later token does not postpone it
    wheel.add(sub, T0 + 5)  # an earlier one moves it
    assert (len(wheel), sub.expires_at) == (1, T0 + 5)
    assert wheel.expire(T0 + 4.99) == []
    assert wheel.expire(T0 + 5) == [sub]
    assert wheel.expire(T0 + 30) == []


def test_no_expiry_never_enters_and_a_discarded_subscriber_is_never_taken_out() -> None:
    wheel = ExpiryWheel()
    anyone, gone, stays = Subscriber(10), Subscriber(10), Subscriber(10)
    wheel.add(anyone, 0)
    wheel.add(gone, T0 + 1)
    wheel.add(stays, T0 + 1)
    wheel.discard(gone)
    wheel.discard(anyone)
    assert (anyone.expires_at, gone.expires_at) == (None, None)
    assert wheel.expire(T0 + 2) == [stays]
    assert len(wheel) == 0


def test_an_expiry_already_swept_past_is_taken_out_at_the_next_sweep() -> None:
    wheel = ExpiryWheel()
    wheel.expire(T0 + 10)
    late = Subscriber(10)
    wheel.add(late, T0 + 3)  # its token expired while the stream was being opened
    assert wheel.expire(T0 + 10.5) == []  # the same second was swept already
    assert wheel.expire(T0 + 11) == [late]
