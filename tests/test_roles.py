"""Roles install apart: the gateway and the client run without the model engines, the wheel
installs only the `s2s` namespace, and `s2s[gateway]` resolves to no engine at all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from .conftest import ROOT

# What only the stage workers may import (CTranslate2 ships as `ctranslate2`).
ENGINES = ("torch", "transformers", "ctranslate2", "faster_whisper", "onnxruntime")
ENGINE_DISTS = {"torch", "transformers", "ctranslate2", "faster-whisper", "onnxruntime",
                "accelerate", "tokenizers", "safetensors", "triton"}
REPO_FOLDERS = ("services", "gateway", "client", "launcher", "bench")

BLOCKER = textwrap.dedent(f"""
    import importlib.abc, sys
    BLOCKED = {ENGINES!r}
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is blocked: this role must not import it")
            return None
    sys.meta_path.insert(0, Block())
""")


def run_blocked(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter that cannot import any engine."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)], cwd="/",
                          env=env, capture_output=True, text=True, timeout=120)


def test_blocker_really_blocks():
    """The finder is what makes the next test mean something: an engine import must fail."""
    result = run_blocked("import onnxruntime")
    assert result.returncode != 0 and "is blocked" in result.stderr, result.stderr


def test_gateway_client_and_talk_import_without_engines():
    result = run_blocked("""
        import sys
        from s2s import config
        from s2s.gateway.app import create_app
        create_app(config.load({"redis_url": "redis://127.0.0.1:1/0"}, environ={}))
        import s2s.gateway.server, s2s.gateway.session, s2s.gateway.playback
        import s2s.client, s2s.client.protocol, s2s.client.talk_command
        from s2s import cli
        # `s2s talk --help` and `s2s gateway --help` build their parsers without an engine.
        for command in ("talk", "gateway"):
            try:
                cli.main([command, "--help"])
            except SystemExit as e:
                assert e.code == 0, (command, e.code)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {engines!r})
        assert not loaded, loaded
        print("ok")
    """.replace("{engines!r}", repr(ENGINES)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_stage_workers_do_need_their_engines():
    """The converse, so the blocker is not vacuous for the stages: STT imports CTranslate2."""
    result = run_blocked("import s2s.services.stt.worker as w; w.SttStage")
    if result.returncode == 0:
        pytest.skip("the STT module imports its engine lazily (only at model load)")
    assert "is blocked" in result.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                             str(out), str(ROOT)], capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        pytest.fail(f"pip wheel failed:\n{result.stderr[-3000:]}")
    wheels = list(out.glob("s2s-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_installs_only_the_s2s_namespace(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    top = {n.split("/")[0] for n in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"s2s"}, sorted(top)
    # every role folder of the repository is inside, under s2s/
    for folder in REPO_FOLDERS:
        assert f"s2s/{folder}/__init__.py" in names, folder
    assert "s2s/services/stt/worker.py" in names
    assert any(n.startswith("s2s/gateway/static/") for n in names), "web page missing"
    with zipfile.ZipFile(wheel) as zf:
        top_level = next((n for n in names if n.endswith(".dist-info/top_level.txt")), None)
        if top_level:
            assert zf.read(top_level).decode().split() == ["s2s"]


def resolve(requirement: str, tmp_path: Path) -> set[str]:
    """What pip would install for `requirement` into an empty environment (nothing installed:
    --ignore-installed), from the configured indexes, without installing anything."""
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
         "--report", str(report), requirement],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        pytest.fail(f"pip could not resolve {requirement}:\n{result.stderr[-3000:]}")
    data = json.loads(report.read_text())
    return {item["metadata"]["name"].lower().replace("_", "-") for item in data["install"]}


@pytest.mark.parametrize("role", ["gateway", "client"])
def test_light_roles_resolve_without_engines(role, tmp_path):
    names = resolve(f".[{role}]", tmp_path)
    assert "s2s" in names
    assert not names & ENGINE_DISTS, sorted(names & ENGINE_DISTS)
    assert not {n for n in names if n.startswith("nvidia-")}, "CUDA packages pulled"


def test_stt_role_resolves_its_engine(tmp_path):
    """The converse: the resolver report does list engines where a role needs them."""
    names = resolve(".[stt]", tmp_path)
    assert {"faster-whisper", "ctranslate2"} <= names, sorted(names)
    assert "torch" not in names
