"""``herald.toml``: what a config file declares, and how each mistake in one is reported (line, entry, key).

The last tests run ``herald check --config`` and ``herald serve --config`` / ``herald worker --config``
on a broken file, as processes: exit status and the one line that says what is wrong.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from herald.domain import Catalog
from herald.proxy.config import ConfigError, load_config, parse_config
from herald.proxy.forward import ProxyHandler
from tests.support.server import ROOT, TEST_SECRET

GOOD = '''\
name = "thumbnails"

[[command]]
method = "POST"
path = "/albums/{album}/thumbnails"
event = "ThumbnailRequested"
upstream = "http://127.0.0.1:9000/albums/{album}/thumbnails"
timeout = 2.5
attempts = 3
backoff = { initial = 0.2, max = 5, factor = 3 }
schema = { type = "object", required = ["url"], properties = { url = { type = "string" } } }
topics = ["albums/{album}"]
cancel = "http://127.0.0.1:9000/jobs/{operation_id}"
concurrency = 4

[[command]]
path = "/thumbnails"
event = "ThumbnailBatchRequested"
upstream = "https://thumbs.internal/batch"
backoff = 1.5
schema_file = "batch.schema.json"

[[route]]
path = "/thumbnails/{id}"
upstream = "http://127.0.0.1:9000/thumbnails/{id}"
public = true

[[topic]]
pattern = "albums/{album}"
subscribe = "anyone"
'''


def test_a_config_file_declares_commands_routes_and_topics(tmp_path: Path) -> None:
    (tmp_path / "batch.schema.json").write_text(json.dumps({"type": "array"}))
    (tmp_path / "herald.toml").write_text(GOOD)
    domain = load_config(tmp_path / "herald.toml")
    assert domain.name == "thumbnails"
    first, second = domain.commands
    assert (first.method, first.path, first.event_type) == ("POST", "/albums/{album}/thumbnails", "ThumbnailRequested")
    assert first.schema is not None and first.schema["required"] == ["url"]
    assert second.schema == {"type": "array"}
    spec = domain.proxies["ThumbnailRequested"]
    assert (spec.timeout, spec.attempts, spec.concurrency) == (2.5, 3, 4)
    assert (spec.backoff.initial, spec.backoff.max, spec.backoff.factor) == (0.2, 5.0, 3.0)
    assert spec.topics == ("albums/{album}",) and spec.cancel == "http://127.0.0.1:9000/jobs/{operation_id}"
    assert domain.proxies["ThumbnailBatchRequested"].backoff.initial == 1.5
    assert isinstance(domain.handlers["ThumbnailRequested"], ProxyHandler)
    assert [r.path for r in domain.proxy_routes] == ["/thumbnails/{id}"] and domain.public_routes
    assert [(t.pattern, t.subscribe) for t in domain.topics] == [("albums/{album}", "anyone")]
    assert Catalog.of([domain]).proxies.keys() == {"ThumbnailRequested", "ThumbnailBatchRequested"}


def test_a_command_body_is_validated_by_its_schema_and_becomes_the_request_data() -> None:
    domain = parse_config(GOOD.replace('schema_file = "batch.schema.json"', ""))
    command = domain.commands[0]
    assert command.parse({"album": "a"}, {"url": "x"}).data == {"url": "x"}
    with pytest.raises(ValueError, match="url"):
        command.parse({"album": "a"}, {})


def broken(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new, 1)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (broken('upstream = "http://127.0.0.1:9000/albums', 'upstream = "ftp://127.0.0.1:9000/albums'),
         "herald.toml:3: command[1].upstream: upstream must be an absolute http:// or https:// URL"),
        (broken('upstream = "https://thumbs.internal/batch"', 'upstream = "https://thumbs.internal/{album}"'),
         "herald.toml:16: command[2].upstream: upstream 'https://thumbs.internal/{album}' names {album}"),
        (broken("upstream = \"https://thumbs.internal/batch\"\n", ""),
         "herald.toml:16: command[2].upstream: is required"),
        (broken("timeout = 2.5", "timeout = -1"), "command[1].timeout: must be a number of seconds > 0, got -1"),
        (broken("timeout = 2.5", 'timeout = "soon"'),
         "command[1].timeout: must be a number of seconds > 0, got 'soon'"),
        (broken("attempts = 3", "attempts = 0"), "command[1].attempts: must be an integer >= 1, got 0"),
        (broken("attempts = 3", "attempts = 2.5"), "command[1].attempts: must be an integer >= 1, got 2.5"),
        (broken("factor = 3", "factor = 0.5"), "command[1].backoff: backoff needs"),
        (broken("factor = 3", "jitter = 3"), "command[1].backoff: unknown key 'jitter'"),
        (broken('method = "POST"', 'method = "GET"'), "command[1].method: one of POST, PUT, PATCH, DELETE, got 'GET'"),
        (broken('event = "ThumbnailRequested"', 'event = "herald.mine"'), "command[1].event: 'herald.mine'"),
        (broken('event = "ThumbnailBatchRequested"', 'event = "ThumbnailRequested"'),
         "command[2].event: ThumbnailRequested has two handlers"),
        (broken('path = "/thumbnails"', 'path = "/albums/{album}/thumbnails"'), "command[2].path: POST /albums"),
        (broken('path = "/thumbnails"', 'path = "thumbnails"'), "command[2].path: path 'thumbnails' must start"),
        (broken('schema = { type = "object"', 'schema = { type = "objekt"'), "command[1].schema: invalid JSON Schema"),
        (broken('schema_file = "batch.schema.json"', 'schema_file = "missing.json"'),
         "command[2].schema_file: cannot read"),
        (broken('topics = ["albums/{album}"]', 'topics = ["albums/{user}"]'),
         "command[1].topics: topic 'albums/{user}'"),
        (broken('cancel = "http://127.0.0.1:9000/jobs/{operation_id}"', 'cancel = "http://127.0.0.1:9000/jobs/{job}"'),
         "command[1].cancel: cancel"),
        (broken("concurrency = 4", "concurency = 4"),
         "command[1]: unknown key 'concurency' (did you mean 'concurrency'?)"),
        (broken('upstream = "http://127.0.0.1:9000/thumbnails/{id}"', 'upstream = "http://127.0.0.1:9000/t/{tid}"'),
         "herald.toml:23: route[1].upstream: upstream 'http://127.0.0.1:9000/t/{tid}' names {tid}"),
        (broken("public = true", 'public = "yes"'), "route[1].public: must be true or false"),
        (broken('subscribe = "anyone"', 'subscribe = "everyone"'), "herald.toml:28: topic[1].subscribe: one of"),
        (broken('pattern = "albums/{album}"', 'pattern = "operations/{id}"'), "topic[1].pattern:"),
        (broken('name = "thumbnails"', 'name = "thumbnails"\nbogus = 1'), "(top level): unknown key 'bogus'"),
        (broken("[[topic]]", "[topic]"), "topic: declare each one as a [[topic]] table"),
        (broken("attempts = 3", "attempts = = 3"), "herald.toml: not valid TOML: "),
    ],
)
def test_each_mistake_names_the_line_the_entry_and_the_key(text: str, message: str, tmp_path: Path) -> None:
    (tmp_path / "batch.schema.json").write_text("{}")
    (tmp_path / "herald.toml").write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "herald.toml")
    assert message in str(caught.value).replace(str(tmp_path) + "/", "")


def test_a_file_that_declares_nothing_to_serve_is_refused() -> None:
    with pytest.raises(ConfigError, match="nothing to serve"):
        parse_config('[[topic]]\npattern = "a/{b}"\n')


def test_a_file_that_cannot_be_read_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        load_config(tmp_path / "nope.toml")


# The command line ------------------------------------------------------------------------

def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "PORT") and not k.startswith("HERALD_")}
    return subprocess.run([sys.executable, "-m", "herald", *args], env={**clean, **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def bad_file(tmp_path: Path) -> Path:
    path = tmp_path / "herald.toml"
    (tmp_path / "batch.schema.json").write_text("{}")
    path.write_text(broken('upstream = "https://thumbs.internal/batch"', 'upstream = "thumbs.internal/batch"'))
    return path


WHAT = "command[2].upstream: upstream must be an absolute http:// or https:// URL, got 'thumbs.internal/batch'"


@pytest.mark.e2e
def test_check_config_validates_without_serving(tmp_path: Path, bad_file: Path) -> None:
    (tmp_path / "good.toml").write_text(GOOD.replace('schema_file = "batch.schema.json"', ""))
    done = run("check", "--config", str(tmp_path / "good.toml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"ok config {tmp_path / 'good.toml'} (2 commands, 1 routes, 1 topics)" in done.stdout.splitlines()
    done = run("check", "--config", str(bad_file))
    assert done.returncode == 1
    assert f"FAIL config {bad_file}: {bad_file}:16: {WHAT}" in done.stdout.splitlines(), done.stdout
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.e2e
def test_serve_and_worker_refuse_a_broken_file_in_one_line(bad_file: Path) -> None:
    for args in (("serve", "--config", str(bad_file)), ("worker", "--config", str(bad_file))):
        done = run(*args, REDIS_URL="redis://127.0.0.1:1/0", HERALD_SECRET=TEST_SECRET)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert done.stderr.strip() == f"herald {args[0]}: {bad_file}:16: {WHAT}"


@pytest.mark.e2e
@pytest.mark.redis
def test_a_proxy_worker_needs_to_know_where_upstreams_call_back(tmp_path: Path, redis_url: str) -> None:
    (tmp_path / "good.toml").write_text(GOOD.replace('schema_file = "batch.schema.json"', ""))
    done = run("worker", "--config", str(tmp_path / "good.toml"), "--burst", REDIS_URL=redis_url,
               HERALD_SECRET=TEST_SECRET)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "HERALD_CALLBACK_URL" in done.stderr and "Traceback" not in done.stderr
