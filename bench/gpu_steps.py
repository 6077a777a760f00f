"""The measurements of ``s2s.bench.gpu_bench``, one function per step, each run in its
own process (the runner time-boxes and kills it).  Each takes the parsed options and
returns ``(status, why, rows, data)``: ``rows`` are (measure, value, note) lines of the
result table, ``data`` the raw numbers for the JSON.

Every step goes through the project's own code: the STT stage (``SttStage``, faster-
whisper, float16 on CUDA), the LLM's transformers backend (``backends.create``) with
bench/bench_llm.py's measurement, the TTS stage (``TtsStage``, Piper, the CUDA provider
when onnxruntime has one) and, for the sessions curve, the LLM stage's worker runtime on a
real Redis under ramped sessions.  A step whose engine is not installed says so ("not
run") instead of measuring something else.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what the bundled SmolLM2-135M folder holds besides its weights
MODEL_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json",
                    "tokenizer_config.json", "chat_template.jinja")


def wav(opts, name: str) -> Path:
    return Path(opts.data) / name


def settings(opts, **overrides):
    from s2s import config

    return config.load({"device": opts.device, **overrides}, environ={})


def time_left(opts) -> float:
    """Seconds until the step's box ends (the runner kills it then); inf when run alone."""
    return opts.ends_at - time.time() if opts.ends_at else float("inf")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


# --- env ----------------------------------------------------------------------------------
def can_load(lib: str) -> bool:
    try:
        ctypes.CDLL(lib)
        return True
    except OSError:
        return False


def step_env(opts):
    import platform

    rows, data = [], {"python": platform.python_version(), "cpus": os.cpu_count()}
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        data["nvidia_smi"] = out.stdout.strip() or out.stderr.strip()
    rows.append(("nvidia-smi", data.get("nvidia_smi", "not found"), ""))
    try:
        import torch

        data["torch"] = torch.__version__
        data["torch_cuda"] = torch.cuda.is_available()
        if data["torch_cuda"]:
            p = torch.cuda.get_device_properties(0)
            data["gpu"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                           "capability": f"sm_{p.major}{p.minor}", "cuda": torch.version.cuda}
    except ImportError as e:
        data["torch"] = f"not importable ({e})"
    gpu = data.get("gpu")
    rows.append(("torch", data["torch"], f"CUDA {gpu['cuda']}: {gpu['name']}, {gpu['memory_gib']} "
                 f"GiB, {gpu['capability']}" if gpu else "no CUDA device"))
    # faster-whisper's CTranslate2 wheels link CUDA 12's cuBLAS; onnxruntime-gpu 1.31 CUDA 13's
    data["libs"] = {lib: can_load(lib) for lib in ("libcublas.so.12", "libcublas.so.13",
                                                   "libcudnn.so.9")}
    found = sorted({p.name for d in map(Path, sys.path) if d.is_dir()
                    for p in d.glob("nvidia/*/lib/libcublas.so.*")})
    data["pip_cublas"] = found
    rows.append(("CUDA libraries the loader finds", ", ".join(
        f"{k} {'yes' if v else 'no'}" for k, v in data["libs"].items()),
        f"CTranslate2 4.8 needs libcublas.so.12; in pip's nvidia packages: "
        f"{', '.join(found) or 'none'}"))
    try:
        import onnxruntime as ort

        data["onnxruntime"] = f"{ort.__version__} {ort.get_available_providers()}"
    except ImportError as e:
        data["onnxruntime"] = f"not importable ({e})"
    rows.append(("onnxruntime", data["onnxruntime"], ""))
    try:
        import ctranslate2

        data["ctranslate2"] = (f"{ctranslate2.__version__}, CUDA devices "
                               f"{ctranslate2.get_cuda_device_count()}")
    except ImportError as e:
        data["ctranslate2"] = f"not installed ({e})"
    rows.append(("ctranslate2", data["ctranslate2"], ""))
    return "ok", "", rows, data


# --- stt ----------------------------------------------------------------------------------
JFK_TEXT = ("And so my fellow Americans, ask not what your country can do for you, "
            "ask what you can do for your country.")


def step_stt(opts):
    try:
        import ctranslate2
        import faster_whisper  # noqa: F401
    except ImportError as e:
        return "not run", f"faster-whisper is not installed here ({e})", [], {}
    if opts.device == "cuda" and ctranslate2.get_cuda_device_count() == 0:
        return ("not run", "CTranslate2 sees no CUDA device (its wheel needs CUDA 12's "
                "libcublas.so.12)", [], {})
    import numpy as np

    from s2s.audio import read_audio
    from s2s.bench.wer import wer
    from s2s.frames import Utterance
    from s2s.services.stt.batching import Job
    from s2s.services.stt.worker import SttStage

    stt = SttStage(settings(opts, stt_incremental=False))
    t0 = time.perf_counter()
    stt.setup()
    load_s = time.perf_counter() - t0
    jfk = read_audio(wav(opts, "jfk.wav"), 16000)
    runs = 2 if opts.quick else 5

    async def transcribe(pcm) -> str:
        text = ""
        async for out in stt.process(Utterance(sid="gpu-bench", pcm=pcm.tobytes(), sr=16000)):
            text = getattr(out, "text", text)
        return text

    rows = [("model", stt.describe(), f"loaded in {load_s:.1f} s")]
    data = {"describe": stt.describe(), "load_s": load_s, "latency": {}}
    for label, piece in (("3 s", jfk[int(0.3 * 16000):int(3.3 * 16000)]), ("11 s", jfk)):
        asyncio.run(transcribe(piece))  # warm-up
        times, text = [], ""
        for _ in range(runs):
            t = time.perf_counter()
            text = asyncio.run(transcribe(piece))
            times.append(time.perf_counter() - t)
        lat = statistics.median(times)
        seconds = len(piece) / 16000
        data["latency"][label] = {"ms": lat * 1000, "rtf": lat / seconds, "text": text}
        note = f"WER {wer(JFK_TEXT, text):.1%} vs the speech's text" if label == "11 s" else ""
        rows.append((f"latency, {label} of jfk.wav (median of {runs})",
                     f"{ms(lat)}, RTF {lat / seconds:.3f}", note))
    n = 2 if opts.quick else 8
    pieces = [jfk[int((0.3 + i * 0.4) * 16000):int((3.3 + i * 0.4) * 16000)].astype(np.float32)
              / 32768 for i in range(n)]
    stt.whisper.decode_jobs([Job(pieces[0])])
    t = time.perf_counter()
    stt.whisper.decode_jobs([Job(p) for p in pieces])
    batch = time.perf_counter() - t
    data["batch"] = {"n": n, "ms": batch * 1000}
    rows.append((f"batch of {n} utterances of 3 s (one decode)", ms(batch),
                 f"{batch / n * 1000:.0f} ms each"))
    return "ok", "", rows, data


# --- llm ----------------------------------------------------------------------------------
def llm_model(opts) -> tuple[str, str]:
    """(folder, what its weights are): the bundled SmolLM2-135M when its package is here
    (``--llm-weights real``), else the same architecture and tokenizer with random weights
    (the real ones do not travel to the GPU machine): a 135M model's speed on a GPU does not
    depend on its weight values, and with random weights every reply runs to max tokens."""
    from s2s import config
    from s2s.services.llm.backends.model_files import resolve

    if opts.llm_weights in ("auto", "real"):
        try:
            return resolve(config.load({}, environ={})), "real (bundled SmolLM2-135M)"
        except Exception as e:
            if opts.llm_weights == "real":
                raise
            print(f"gpu_bench: real weights unavailable ({e}): random ones", file=sys.stderr)
    src = Path(opts.llm_config) if opts.llm_config else Path(resolve(config.load({}, environ={})))
    dest = Path(opts.work) / "smollm2-135m-random"
    if not (dest / "done").exists():
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))
        model.save_pretrained(dest)
        for name in MODEL_SIDE_FILES:
            if (src / name).exists():
                shutil.copy(src / name, dest / name)
        (dest / "done").write_text("")
    return str(dest), "RANDOM weights, SmolLM2-135M architecture and tokenizer"


def step_llm(opts):
    from transformers import AutoTokenizer

    from s2s.bench.bench_llm import measure
    from s2s.services.llm.backends import create

    path, weights = llm_model(opts)
    random_weights = weights.startswith("RANDOM")
    batches = [1, 2] if opts.quick else [1, 8, 32]
    tokens = 16 if opts.quick else 64
    s = settings(opts, llm_backend="transformers", llm_model=path, llm_max_tokens=tokens,
                 llm_max_batch=max(batches))
    backend = create(s)
    t0 = time.perf_counter()
    backend.setup()
    load_s = time.perf_counter() - t0
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = [("backend", backend.describe(), f"weights: {weights}; loaded in {load_s:.1f} s")]
    data = {"describe": backend.describe(), "weights": weights, "load_s": load_s, "batches": {}}

    async def all_sizes() -> None:  # one event loop for the engine's callbacks
        for n in batches:
            if time_left(opts) < 30:
                rows.append((f"{n} replies at once", "not run", "the step's box was spent"))
                continue
            m = await measure(backend, tokenizer, s, n, 1 if opts.quick else 3)
            data["batches"][n] = m
            replies = "reply" if n == 1 else "replies"
            rows.append((f"{n} {replies} at once, ≤ {tokens} tokens each",
                         f"TTFT {m['ttft_ms']:.0f} ms, {m['tok_s']:.0f} tok/s total, "
                         f"{m['tok_s_session']:.0f} tok/s per reply",
                         f"first speakable chunk p95 {m['chunk_p95_ms']:.0f} ms"
                         + (" (random text: not representative)" if random_weights else "")))
    try:
        asyncio.run(all_sizes())
    finally:
        backend.close()
    return "ok", "", rows, data


# --- tts ----------------------------------------------------------------------------------
def step_tts(opts):
    try:
        import onnxruntime as ort
        import piper  # noqa: F401

        from s2s.services.tts.worker import voice_paths

        voice_paths("")
    except Exception as e:
        return "not run", f"Piper or its voice is not installed here ({e})", [], {}
    if opts.device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        return ("not run", f"onnxruntime {ort.__version__} here has no CUDA provider "
                "(onnxruntime-gpu is not installed)", [], {})
    from s2s.bench.bench_tts import SENTENCES, measure
    from s2s.services.tts.worker import TtsStage

    stage = TtsStage(settings(opts))
    t0 = time.perf_counter()
    stage.setup()
    rows = [("voice", stage.describe(), f"loaded in {time.perf_counter() - t0:.1f} s")]
    data = {"describe": stage.describe(), "provider": stage.backend, "texts": {}}
    if opts.device == "cuda" and stage.backend != "cuda":
        return "failed", f"the stage chose {stage.backend}, not CUDA", rows, data
    runs = 1 if opts.quick else 5
    for name in ("short", "long"):
        got = [asyncio.run(measure(stage, SENTENCES[name], 0, 0)) for _ in range(runs)]
        first, total, audio = (statistics.median(g[i] for g in got) for i in range(3))
        data["texts"][name] = {"first_ms": first * 1000, "total_ms": total * 1000,
                               "audio_s": audio}
        rows.append((f"{name} reply ({len(SENTENCES[name])} chars, median of {runs})",
                     f"first audio {ms(first)}, RTF {total / audio:.3f}",
                     f"{audio:.1f} s of audio"))
    return "ok", "", rows, data


# --- sessions curve -----------------------------------------------------------------------
QUESTIONS = ("What is the capital of France?", "How far away is the moon?",
             "Why is the sky blue?", "Can you recommend a good book?",
             "How do plants make food from sunlight?", "What should I cook for dinner tonight?")


def pct(xs: list[float], q: float) -> float | None:
    xs = sorted(xs)
    return xs[min(int(q * len(xs)), len(xs) - 1)] if xs else None


async def llm_sessions(stage, s, n: int, turns: int, ramp: float, gap: float,
                       seed: int) -> dict[str, list[float]]:
    """``n`` sessions arriving at random times within ``ramp`` s, each asking ``turns``
    questions (``gap`` s apart once its reply is complete, as a listener would) through a
    worker Runtime of the LLM stage on real Redis: per turn, transcript in -> first
    speakable reply chunk out, and -> the reply's last chunk."""
    import random

    import redis.asyncio as aioredis

    from s2s import keys
    from s2s.bus import FIELD
    from s2s.frames import ReplyText, Transcript, decode, encode
    from s2s.worker import Runtime

    runtime = Runtime(stage, s)
    worker = asyncio.create_task(runtime.run())
    client = aioredis.Redis.from_url(s.redis_url)
    rng, run_id = random.Random(seed), os.urandom(3).hex()
    first: list[float] = []
    done: list[float] = []

    async def session(k: int) -> None:
        sid, cursor = f"gpu-{n}-{k}-{run_id}", b"0-0"
        await asyncio.sleep(rng.uniform(0, ramp))
        for turn in range(1, turns + 1):
            await client.set(keys.turn(sid), turn)
            t0 = time.perf_counter()
            text = QUESTIONS[(k + turn) % len(QUESTIONS)]
            await client.xadd(keys.stage_stream("llm"), {FIELD: encode(
                Transcript(sid=sid, turn=turn, text=text, complete=True))})
            got_first = ended = None
            while ended is None:
                res = await client.xread({keys.out(sid): cursor}, count=50, block=1000)
                if not res and time.perf_counter() - t0 > 120:
                    raise TimeoutError(f"{sid}: turn {turn} not answered in 120 s")
                for _, entries in res or ():
                    for eid, fields in entries:
                        cursor = eid
                        out = decode(fields[FIELD])
                        if isinstance(out, ReplyText) and out.turn == turn:
                            got_first = got_first or time.perf_counter() - t0
                            ended = time.perf_counter() - t0 if out.final else None
            first.append(got_first)
            done.append(ended)
            await asyncio.sleep(gap)

    try:
        await asyncio.wait_for(asyncio.gather(*(session(k) for k in range(n))), 300)
    finally:
        runtime.stopping.set()
        await asyncio.wait_for(worker, 30)
        await client.aclose()
    return {"first": first, "done": done}


def step_sessions(opts):
    from s2s.launcher.redis_server import RedisServer
    from s2s.services.llm.worker import LlmStage

    path, weights = llm_model(opts)
    levels = [int(x) for x in
              (opts.levels or ("1,2" if opts.quick else "1,8,32,64,128")).split(",")]
    turns, gap = (2, 0.5) if opts.quick else (3, 1.0)
    rows, data = [], {"weights": weights, "levels": []}
    with RedisServer(binary=opts.redis_server) as server:
        # holds off: what is measured is the model's compute and queueing, not the wait for
        # the user to go on (random weights give no meaningful end-of-turn probability)
        s = settings(opts, redis_url=server.url, metrics_port=0, llm_backend="transformers",
                     llm_model=path, llm_max_batch=opts.llm_batch, llm_turn_hold_ms=0,
                     llm_statement_hold_ms=0, llm_max_tokens=16 if opts.quick else 60)
        stage = LlmStage(s)
        stage.setup()
        stage.setup = lambda: None  # loaded once for every level
        rows.append(("LLM worker", stage.describe(), f"weights: {weights}"))
        asyncio.run(llm_sessions(stage, s, 1, 1, 0, 0, opts.seed))  # warm-up, not counted
        for n in levels:
            if time_left(opts) < 60:  # a level takes ~20-60 s: keep what was measured
                rows.append((f"{n} sessions", "not run", "the step's box was spent"))
                continue
            r = asyncio.run(llm_sessions(stage, s, n, turns, opts.ramp, gap, opts.seed + n))
            p50, p95, end95 = pct(r["first"], .5), pct(r["first"], .95), pct(r["done"], .95)
            data["levels"].append({"sessions": n, "turns": len(r["first"]), "first_p50_ms":
                                   p50 * 1000, "first_p95_ms": p95 * 1000,
                                   "reply_p95_ms": end95 * 1000})
            rows.append((f"{n} session{'s' if n > 1 else ''} × {turns} turns (arrivals over "
                         f"{opts.ramp:g} s)",
                         f"first chunk p50 {ms(p50)}, p95 {ms(p95)}",
                         f"whole reply p95 {ms(end95)}; {len(r['first'])} turns answered"))
    why = ("the LLM stage's share of voice-to-voice (transcript in -> first speakable chunk "
           "out) through its worker runtime on a real Redis; not the whole stack (see docs)")
    return "ok", why, rows, data


STEPS = {"env": step_env, "stt": step_stt, "llm": step_llm, "tts": step_tts,
         "sessions": step_sessions}
