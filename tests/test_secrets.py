"""Secrets never printed (issue 22): `s2s config`, a Settings' repr and the log lines show
API keys, the token secret and Redis passwords as ***."""

from __future__ import annotations

import json
import logging
import sys

from s2s import cli, config, log

SECRETS = {
    "S2S_API_KEYS": "alice:ak-alice-111, ak-bare-222",
    "S2S_TOKEN_SECRET": "ts-333",
    "S2S_REDIS_URL": "redis://gw:pw-444@redis.internal:6379/0",
    "S2S_REDIS_CELLS": "a=redis://:pw-555@h1:6379,b=rediss://u:pw-666@h2:6380/1",
    "S2S_LLM_OPENAI_API_KEY": "sk-777",
    "S2S_LLM_OPENAI_BASE_URL": "https://u:pw-888@llm.example/v1?api_key=qk-999",
}
LEAKS = ["ak-alice-111", "ak-bare-222", "ts-333", "pw-444", "pw-555", "pw-666", "sk-777",
         "pw-888", "qk-999"]


def test_s2s_config_prints_no_secret(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # cli.main rewrites it
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["config"]) == 0
    out = capsys.readouterr().out
    assert not [s for s in LEAKS if s in out], out
    lines = dict(line.split("=", 1) for line in out.splitlines())
    assert lines["S2S_API_KEYS"] == "'alice:***,***'"  # which keys: yes; the keys: no
    assert lines["S2S_TOKEN_SECRET"] == "'***'"
    assert lines["S2S_LLM_OPENAI_API_KEY"] == "'***'"
    assert lines["S2S_REDIS_URL"] == "'redis://gw:***@redis.internal:6379/0'"
    assert lines["S2S_REDIS_CELLS"] == "'a=redis://:***@h1:6379,b=rediss://u:***@h2:6380/1'"
    assert lines["S2S_LLM_OPENAI_BASE_URL"] == "'https://u:***@llm.example/v1?api_key=***'"
    assert lines["S2S_LOG_LEVEL"] == "'INFO'"  # everything else as it is


def test_unset_secrets_and_plain_urls_show_as_they_are():
    assert config.redact("token_secret", "") == ""
    assert config.redact("api_keys", "") == ""
    assert config.redact("redis_url", "redis://h:1/0") == "redis://h:1/0"
    assert config.redact("port", 8000) == 8000
    assert config.redacted_url("http://127.0.0.1:8000/#key=abc&x=1") == \
        "http://127.0.0.1:8000/#key=***&x=1"
    assert config.redacted_url("see ws://h/ws?token=t0k and redis://:p@h") == \
        "see ws://h/ws?token=*** and redis://:***@h"
    assert config.redacted_url("url='http://h/#key=abc'") == "url='http://h/#key=***'"
    # a password with an @ (urlsplit takes the host after the last one)
    assert config.redacted_url("redis://u:p@ss@h:1/0") == "redis://u:***@h:1/0"


def test_a_settings_repr_holds_no_secret():
    env = {name: value for name, value in SECRETS.items()}
    text = repr(config.load(environ=env))
    assert text.startswith("Settings(") and "token_secret='***'" in text
    assert not [s for s in LEAKS if s in text], text


def test_log_lines_hide_urls_secrets():
    record = logging.makeLogRecord({
        "name": "s2s.bus", "levelno": logging.ERROR, "levelname": "ERROR",
        "msg": "cannot reach %s", "args": (SECRETS["S2S_REDIS_URL"],),
        "gateway": "http://127.0.0.1:8000/#key=ak-bare-222"})
    plain = log._Plain().format(record)
    assert "redis://gw:***@redis.internal:6379/0" in plain and "#key=***" in plain
    payload = json.loads(log._Json().format(record))
    assert payload["msg"] == "cannot reach redis://gw:***@redis.internal:6379/0"
    assert payload["gateway"] == "http://127.0.0.1:8000/#key=***"
    for line in (plain, json.dumps(payload)):
        assert "pw-444" not in line and "ak-bare-222" not in line
