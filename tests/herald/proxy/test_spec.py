"""Proxy declarations, pure: backoff delays, URL templates, and what a declaration refuses."""

from __future__ import annotations

import pytest

from herald.proxy.spec import Backoff, ProxyCommand, ProxyRoute, ProxySpecError, origin


def test_backoff_doubles_from_initial_with_jitter_between_half_and_whole_step() -> None:
    backoff = Backoff(initial=1.0, max=30.0, factor=2.0)
    assert [backoff.delay(n, jitter=lambda: 0.0) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]
    assert [backoff.delay(n, jitter=lambda: 0.999999) for n in (1, 2, 3)] == pytest.approx([1.0, 2.0, 4.0])


def test_backoff_stops_growing_at_max() -> None:
    assert Backoff(initial=1.0, max=5.0).delay(10, jitter=lambda: 0.999999) == pytest.approx(5.0)


def test_retry_after_is_a_floor_capped_at_max() -> None:
    backoff = Backoff(initial=0.1, max=3.0)
    assert backoff.delay(1, retry_after=2.0, jitter=lambda: 0.0) == 2.0
    assert backoff.delay(1, retry_after=3600.0, jitter=lambda: 0.0) == 3.0
    assert backoff.delay(1, retry_after=0.0, jitter=lambda: 0.0) == 0.05


@pytest.mark.parametrize("options", [{"initial": 0}, {"initial": 2, "max": 1}, {"factor": 0.5}])
def test_backoff_refuses_what_cannot_back_off(options: dict[str, float]) -> None:
    with pytest.raises(ProxySpecError) as caught:
        Backoff(**options)
    assert caught.value.key == "backoff"


def command(**options: object) -> ProxyCommand:
    defaults: dict[str, object] = {"method": "POST", "path": "/albums/{album}/thumbnails",
                                   "event": "ThumbnailRequested",
                                   "upstream": "http://thumbs:9000/albums/{album}?op={operation_id}"}
    return ProxyCommand(**{**defaults, **options})  # type: ignore[arg-type]


def test_the_upstream_url_is_filled_with_path_parameters_encoded_as_one_segment() -> None:
    spec = command()
    assert spec.upstream_url({"album": "a b/c"}, "op_1") == "http://thumbs:9000/albums/a%20b%2Fc?op=op_1"


def test_path_parameters_are_read_back_from_the_request_events_source() -> None:
    spec = command()
    assert spec.params("herald/albums/summer/thumbnails") == {"album": "summer"}
    assert spec.params("elsewhere/albums/summer/thumbnails") == {}


def test_topics_and_cancel_are_templates_too() -> None:
    spec = command(topics=("albums/{album}", "thumbnails/{operation_id}"), cancel="http://thumbs:9000/jobs/{operation_id}")
    assert spec.topic_names({"album": "summer"}, "op_1") == ["albums/summer", "thumbnails/op_1"]
    assert spec.cancel_url({"album": "summer"}, "op_1") == "http://thumbs:9000/jobs/op_1"


def test_origin_is_what_one_pool_serves() -> None:
    assert origin("http://thumbs/x") == "http://thumbs:80"
    assert origin("https://thumbs:8443/x?y") == "https://thumbs:8443"
    assert command().origin == "http://thumbs:9000"


@pytest.mark.parametrize(
    ("options", "key", "says"),
    [
        ({"upstream": "ftp://thumbs/x"}, "upstream", "http:// or https://"),
        ({"upstream": "/relative"}, "upstream", "absolute"),
        ({"upstream": "http://{album}.thumbs/x"}, "upstream", "not the host"),
        ({"upstream": "http://thumbs:port/x"}, "upstream", "not a URL"),
        ({"upstream": "http://thumbs/{size}"}, "upstream", "{size}"),
        ({"upstream": "http://thumbs/{album"}, "upstream", "placeholders"),
        ({"cancel": "http://thumbs/jobs/{job}"}, "cancel", "{job}"),
        ({"topics": ("operations/{operation_id}",)}, "topics", "operations/"),
        ({"topics": ("albums/{nope}",)}, "topics", "{nope}"),
        ({"path": "albums"}, "path", "start with '/'"),
        ({"path": "/albums/{operation_id}"}, "path", "Herald's own"),
        ({"path": "/albums/{album:nope}"}, "path", "convertor"),
        ({"timeout": 0}, "timeout", "> 0"),
        ({"attempts": 0}, "attempts", ">= 1"),
        ({"concurrency": 0}, "concurrency", ">= 1"),
    ],
)
def test_a_declaration_that_cannot_work_names_its_key(options: dict[str, object], key: str, says: str) -> None:
    with pytest.raises(ProxySpecError) as caught:
        command(**options)
    assert caught.value.key == key
    assert says in str(caught.value)


def test_a_read_route_fills_its_upstream_from_its_path() -> None:
    route = ProxyRoute("/things/{thing}", "http://things:9000/v1/things/{thing}")
    assert route.upstream_url({"thing": "x y"}) == "http://things:9000/v1/things/x%20y"
    with pytest.raises(ProxySpecError):
        ProxyRoute("/things/{thing}", "http://things:9000/{other}")


def test_a_cancel_url_the_upstream_gives_is_kept_only_on_its_own_origin() -> None:
    from herald.auth import TokenSigner
    from herald.proxy.forward import Forwarder
    from herald.proxy.pool import UpstreamPool

    forwarder = Forwarder(command(), UpstreamPool(default_limit=1, max_response=1024), TokenSigner("s" * 32),
                          callback_base="http://herald", token_ttl=60)
    url = "http://thumbs:9000/albums/a"
    assert forwarder._cancel_url(url, "/jobs/7", "op_1") == "http://thumbs:9000/jobs/7"
    assert forwarder._cancel_url(url, "jobs/7", "op_1") == "http://thumbs:9000/albums/jobs/7"
    assert forwarder._cancel_url(url, "http://thumbs:9000/jobs/7", "op_1") == "http://thumbs:9000/jobs/7"
    assert forwarder._cancel_url(url, "http://metadata.internal/latest", "op_1") is None
    assert forwarder._cancel_url(url, "ftp://thumbs:9000/x", "op_1") is None
    assert forwarder._cancel_url(url, None, "op_1") is None
