"""The ``s2s`` command.

Subcommands live in their own modules, each with ``add_arguments(parser)`` and
``main(args) -> int``; they are imported only when used, so ``s2s --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import config

# stage name -> "module:Class" of its Stage
STAGES = {
    "vad": "s2s.services.vad.worker:VadStage",
    "stt": "s2s.services.stt.worker:SttStage",
    "llm": "s2s.services.llm.worker:LlmStage",
    "tts": "s2s.services.tts.worker:TtsStage",
}

COMMANDS = {
    "up": ("s2s.launcher.up", "Start the whole stack (Redis, gateway, one worker per stage) and talk to it."),
    "worker": ("s2s.cli", "Run one stage worker (vad, stt, llm or tts)."),
    "gateway": ("s2s.gateway.server", "Run the gateway: WebSocket sessions, web page, /healthz, /metrics."),
    "talk": ("s2s.client.talk_command", "Talk to a running stack from a WAV/FLAC/MP3 file or the microphone."),
    "bench": ("s2s.bench.loadgen", "Load-test a running stack: voice-to-voice latency vs sessions."),
    "token": ("s2s.gateway.token_command", "Mint a signed, expiring token for the gateway (s2s token create)."),
    "dead": ("s2s.dead", "List, show, replay or purge dead letters (entries that kept killing workers)."),
    "chaos": ("s2s.bench.chaos", "Kill workers, gateways or Redis mid-turn on a stack it starts; "
                                 "report what users notice."),
    "eval": ("s2s.bench.eval", "Score conversation quality (turn-taking, answers, voice) against a running stack."),
    "autoscale": ("s2s.bench.autoscale", "Simulate deploy/k8s's KEDA and HPA over real processes under "
                                         "a ramp of sessions (STT/LLM/TTS: timing stubs)."),
    "config": ("s2s.cli", "Print every setting with its environment variable and value "
                          "(secrets as ***)."),
}


def load_stage(name: str):
    """A built-in stage by name, or any Stage class as ``package.module:Class``."""
    if name not in STAGES and ":" not in name:
        raise SystemExit(f"unknown stage {name!r}: use one of {', '.join(STAGES)} "
                         f"or module:Class for a custom stage")
    module, cls = STAGES.get(name, name).split(":")
    return getattr(importlib.import_module(module), cls)


def add_arguments(parser: argparse.ArgumentParser) -> None:  # `s2s worker`
    parser.add_argument("stage", metavar="STAGE",
                        help=f"which stage this worker runs: {', '.join(STAGES)}, or "
                             f"module:Class for a custom Stage subclass")
    config.add_flags(parser, ["core", "vad", "stt", "llm", "tts"])


def worker_main(args: argparse.Namespace) -> int:
    from . import log
    from .session_worker import run_stage

    settings = config.from_args(args)
    log.setup(settings.log_level, settings.log_json)
    try:
        stage_cls = load_stage(args.stage)
    except ImportError as e:
        print(f"s2s worker {args.stage}: cannot import the stage ({e}). "
              f"Run scripts/install.sh (or `make install`) first.", file=sys.stderr)
        return 2
    settings.redis()  # exits with a clear message when no Redis is configured
    run_stage(stage_cls(settings), settings)
    return 0


def config_main(args: argparse.Namespace) -> int:
    settings = config.load()
    if args.markdown:
        print(config.markdown_table())
        return 0
    for name in config.FIELDS:
        print(f"{config.env_name(name)}={config.redact(name, getattr(settings, name))!r}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="s2s",
        description="s2s: a speech-to-speech voice assistant whose stages (VAD, STT, LLM, TTS) "
                    "are independent workers over Redis Streams. Every option can also be set "
                    "as an S2S_* environment variable.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Quick start: `s2s up`, then open the printed URL, or `s2s talk speech.wav`.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, helptext) in COMMANDS.items():
        p = sub.add_parser(name, help=helptext, description=helptext,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter
                           if name not in ("worker", "up", "gateway") else argparse.HelpFormatter)
        if name == "worker":
            add_arguments(p)
            p.set_defaults(func=worker_main)
        elif name == "config":
            p.add_argument("--markdown", action="store_true", help="print the settings table of docs/configuration.md")
            p.set_defaults(func=config_main)
        else:
            p.set_defaults(module=module)
            if len(sys.argv) > 1 and sys.argv[1] == name:
                mod = importlib.import_module(module)
                mod.add_arguments(p)
                p.set_defaults(func=mod.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub by surprise
    argv = sys.argv[1:] if argv is None else argv
    sys.argv = [sys.argv[0]] + argv
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
