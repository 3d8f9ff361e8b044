"""``Settings.from_env``: defaults, parsing, and a clear error for every unusable value."""

from __future__ import annotations

from dataclasses import fields

import pytest

from herald.settings import ANONYMOUS_RATE_LIMIT, Settings, SettingsError


def test_defaults_are_the_embedded_gateway() -> None:
    settings = Settings.from_env({})
    assert settings.redis_url is None
    assert settings.embedded_worker is True
    assert len(settings.secret) >= 32
    assert settings.heartbeat == 15.0
    assert settings.history_size == 1000
    assert settings.max_wait == 30.0
    assert settings.cors_origins == ()
    assert not settings.auth_enabled


def test_a_random_secret_differs_per_process_start() -> None:
    assert Settings.from_env({}).secret != Settings.from_env({}).secret


def test_values_are_read_and_typed() -> None:
    settings = Settings.from_env({
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "HERALD_SECRET": "s" * 32,
        "HERALD_PUBLIC_URL": "https://herald.example/",
        "HERALD_HEARTBEAT": "0.5",
        "HERALD_HISTORY_SIZE": "7",
        "HERALD_QUEUE_SIZE": "3",
        "HERALD_MAX_WAIT": "2.5",
        "HERALD_CORS_ORIGINS": " https://a.example , ,https://b.example",
        "HERALD_LOG_LEVEL": "DEBUG",
        "HERALD_JWT_SECRET": "k" * 32,
    })
    assert settings.redis_url == "redis://127.0.0.1:1/0"
    assert settings.embedded_worker is False  # with Redis the worker is its own process by default
    assert settings.secret == "s" * 32
    assert settings.public_url == "https://herald.example"
    assert settings.heartbeat == 0.5
    assert settings.history_size == 7
    assert settings.queue_size == 3
    assert settings.max_wait == 2.5
    assert settings.cors_origins == ("https://a.example", "https://b.example")
    assert settings.log_level == "debug"
    assert settings.auth_enabled


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1", True), ("true", True), ("yes", True), ("on", True), ("True", True), ("YES", True), (" On ", True),
     ("0", False), ("false", False), ("no", False), ("off", False), ("False", False), ("OFF", False),
     ("No", False)],
)
def test_embedded_worker_switch_reads_booleans_case_insensitively(raw: str, expected: bool) -> None:
    assert Settings.from_env({"HERALD_EMBEDDED_WORKER": raw}).embedded_worker is expected


@pytest.mark.parametrize("raw", ["maybe", "2", "-1", "enabled", "y", "n", "tru", "0.0", "none"])
def test_an_unknown_boolean_is_refused_with_the_variable_named(raw: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"HERALD_EMBEDDED_WORKER": raw})
    assert "HERALD_EMBEDDED_WORKER" in str(caught.value)
    assert repr(raw) in str(caught.value)


def test_every_default_is_stated_once_by_its_field() -> None:
    # from_env without a variable builds exactly what Settings() does: no default is repeated elsewhere
    from_env = Settings.from_env({})
    plain = Settings(secret=from_env.secret)
    for spec in fields(Settings):
        assert getattr(from_env, spec.name) == getattr(plain, spec.name), spec.name
    assert from_env == plain


def test_every_field_names_its_environment_variable() -> None:
    names = [spec.metadata.get("env") for spec in fields(Settings)]
    assert all(isinstance(name, str) and name for name in names)
    assert len(set(names)) == len(names)  # one variable, one field


def test_redis_without_a_secret_is_refused_saying_what_to_set() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"REDIS_URL": "redis://127.0.0.1:6379/0"})
    assert "HERALD_SECRET" in str(caught.value)


def test_redis_with_a_secret_starts_without_the_embedded_worker() -> None:
    settings = Settings.from_env({"REDIS_URL": "redis://127.0.0.1:6379/0", "HERALD_SECRET": "k" * 32})
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.secret == "k" * 32
    assert settings.embedded_worker is False


def test_redis_with_the_embedded_worker_asked_for_keeps_it() -> None:
    settings = Settings.from_env({"REDIS_URL": "redis://127.0.0.1:6379/0", "HERALD_SECRET": "k" * 32,
                                  "HERALD_EMBEDDED_WORKER": "on"})
    assert settings.embedded_worker is True


def test_empty_values_mean_the_default() -> None:
    settings = Settings.from_env({"HERALD_HISTORY_SIZE": "", "HERALD_HEARTBEAT": "", "REDIS_URL": ""})
    assert settings.history_size == 1000
    assert settings.heartbeat == 15.0
    assert settings.redis_url is None


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        ("HERALD_HISTORY_SIZE", "ten", "HERALD_HISTORY_SIZE must be an integer, got 'ten'"),
        ("HERALD_HISTORY_SIZE", "1.5", "HERALD_HISTORY_SIZE must be an integer, got '1.5'"),
        ("HERALD_HISTORY_SIZE", "0", "HERALD_HISTORY_SIZE must be >= 1, got 0"),
        ("HERALD_QUEUE_SIZE", "-1", "HERALD_QUEUE_SIZE must be >= 1, got -1"),
        ("HERALD_MAX_BODY", "10", "HERALD_MAX_BODY must be >= 64, got 10"),
        ("HERALD_OPERATION_TTL", "0", "HERALD_OPERATION_TTL must be >= 1, got 0"),
        ("HERALD_HEARTBEAT", "fast", "HERALD_HEARTBEAT must be a number, got 'fast'"),
        ("HERALD_HEARTBEAT", "0.001", "HERALD_HEARTBEAT must be >= 0.05, got 0.001"),
        ("HERALD_MAX_WAIT", "-1", "HERALD_MAX_WAIT must be >= 0.0, got -1.0"),
        ("HERALD_VISIBILITY_TIMEOUT", "0", "HERALD_VISIBILITY_TIMEOUT must be >= 0.1, got 0.0"),
        ("HERALD_MAX_WS_MESSAGE", "100", "HERALD_MAX_WS_MESSAGE must be >= 256, got 100"),
    ],
)
def test_unusable_values_are_refused_with_the_variable_named(name: str, raw: str, message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({name: raw})
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, ANONYMOUS_RATE_LIMIT),  # anonymous mode: one client may not fill the broker by default
        ({"HERALD_RATE_LIMIT": ""}, ANONYMOUS_RATE_LIMIT),
        ({"HERALD_RATE_LIMIT": "0"}, 0),  # an explicit 0 still turns it off
        ({"HERALD_RATE_LIMIT": "5"}, 5),
        ({"HERALD_JWT_SECRET": "j" * 32}, 0),  # bearer auth: each client is a subject someone issued
        ({"HERALD_JWT_SECRET": "j" * 32, "HERALD_RATE_LIMIT": "7"}, 7),
    ],
)
def test_the_command_rate_limit_defaults_on_in_anonymous_mode_only(env: dict[str, str], expected: int) -> None:
    assert Settings.from_env(env).command_rate_limit == expected


def test_the_memory_broker_bounds_reach_only_the_memory_broker() -> None:
    memory = Settings.from_env({"HERALD_MEMORY_MAX_EVENTS": "50", "HERALD_MEMORY_MAX_OPERATIONS": "7"})
    assert memory.broker_options() | {"max_events": 50, "max_operations": 7} == memory.broker_options()
    assert memory.broker_options()["max_bytes"] == 64 * 1024 * 1024
    redis = Settings.from_env({"REDIS_URL": "redis://127.0.0.1:6379/0", "HERALD_SECRET": "k" * 32})
    assert not {"max_events", "max_bytes", "max_operations", "max_resources"} & redis.broker_options().keys()
