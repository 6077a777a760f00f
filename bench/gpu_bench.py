"""The GPU measurement: faster-whisper, the LLM, Piper and a sessions curve on one device,
each step time-boxed, into one Markdown table and a JSON.

    python -m s2s.bench.gpu_bench --device cuda --out $OUT        # bench/gpu/run.sh, there
    python -m s2s.bench.gpu_bench --device cpu --quick --out /tmp/gpu-cpu   # proof, here

Each step (bench/gpu_steps.py) runs in a process of its own with a time box: a step that
hangs (a CUDA call that never returns) or crashes is killed and recorded as such, and the
next one still runs; the whole stays under ``--budget`` seconds.  Results go to
``gpu_results.md`` (one table: step, measure, value, note) and ``gpu_results.json`` in
``--out``; each step's log to ``gpu_steps.log`` there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ("env", "llm", "sessions", "stt", "tts")
# seconds each step may take on the GPU machine; together with the install they stay
# inside the device tool's 10 minutes a command (run.sh gives the runner 500 s)
BOXES = {"env": 45, "llm": 120, "sessions": 200, "stt": 90, "tts": 60}
RESULT_MARK = "GPU_BENCH_RESULT "


@dataclass
class StepResult:
    step: str
    status: str                      # ok, not run, failed, timeout
    why: str = ""
    rows: list[list[str]] = field(default_factory=list)  # (measure, value, note)
    data: dict = field(default_factory=dict)
    seconds: float = 0.0


def run_step(argv: list[str], step: str, box_s: float, log) -> StepResult:
    """Run ``step`` in a child process (its own process group, so whatever it starts goes
    with it), killed after ``box_s`` seconds."""
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "s2s.bench.gpu_bench", "--step", step, *argv],
                            stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=box_s)
    except subprocess.TimeoutExpired:
        stop_group(proc)
        return StepResult(step, "timeout", f"killed after its {box_s:.0f} s box",
                          data={"pid": proc.pid}, seconds=time.monotonic() - t0)
    seconds = time.monotonic() - t0
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_MARK):
            res = StepResult(**json.loads(line[len(RESULT_MARK):]))
            res.seconds = seconds
            return res
    return StepResult(step, "failed", f"exit code {proc.returncode}, no result (see the log)",
                      seconds=seconds)


def stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def child(opts: argparse.Namespace) -> int:
    """One step in this process: prints its result as one marked JSON line."""
    from .gpu_steps import STEPS

    try:
        status, why, rows, data = STEPS[opts.step](opts)
    except Exception as e:  # the step's failure is a result: recorded, the run goes on
        import traceback

        traceback.print_exc()
        status, why, rows, data = "failed", f"{type(e).__name__}: {e}"[:300], [], {}
    res = StepResult(opts.step, status, why, [list(r) for r in rows], data)
    print(RESULT_MARK + json.dumps(asdict(res), default=str), flush=True)
    return 0


def cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(results: list[StepResult], meta: dict) -> str:
    """One table: a row per measure; a step with nothing measured has one row saying why."""
    lines = [f"## s2s on {meta['device_name']} ({meta['device']})", "",
             f"{meta['when']}, {meta['host']}; `{meta['command']}`; "
             f"{meta['seconds']:.0f} s in all.", "",
             "| step | measure | value | note |", "|---|---|---|---|"]
    for r in results:
        head = f"{r.step} ({r.status}, {r.seconds:.0f} s)"
        if not r.rows:
            lines.append(f"| {cell(head)} | – | {cell(r.status)} | {cell(r.why)} |")
        for i, (measure, value, note) in enumerate(r.rows):
            lines.append(f"| {cell(head if i == 0 else '')} | {cell(measure)} | {cell(value)} "
                         f"| {cell(note)} |")
        if r.rows and r.why:
            lines.append(f"| | ({r.step}) | | {cell(r.why)} |")
    return "\n".join(lines) + "\n"


def device_name(results: list[StepResult]) -> str:
    env = next((r for r in results if r.step == "env"), None)
    gpu = env.data.get("gpu") if env else None
    return gpu["name"] if gpu else f"CPU ({os.cpu_count()} cores)"


def write(results: list[StepResult], meta: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "device_name": device_name(results)}
    (out / "gpu_results.md").write_text(markdown(results, meta))
    (out / "gpu_results.json").write_text(json.dumps(
        {"meta": meta, "steps": [asdict(r) for r in results]}, indent=1, default=str))
    return out / "gpu_results.md"


def step_args(opts: argparse.Namespace) -> list[str]:
    """The options a step's process gets: all but the runner's own."""
    args = ["--device", opts.device, "--work", opts.work, "--data", opts.data,
            "--llm-weights", opts.llm_weights, "--llm-batch", str(opts.llm_batch),
            "--ramp", str(opts.ramp), "--seed", str(opts.seed)]
    for flag, value in (("--llm-config", opts.llm_config), ("--redis-server", opts.redis_server),
                        ("--levels", opts.levels)):
        if value:
            args += [flag, value]
    return args + (["--quick"] if opts.quick else [])


def runner(opts: argparse.Namespace) -> int:
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + opts.budget
    results: list[StepResult] = []
    steps = [s for s in ORDER if s in opts.steps.split(",")]
    with open(out / "gpu_steps.log", "a") as log:
        for step in steps:
            left = deadline - time.monotonic()
            box = min(BOXES[step] * opts.box_scale, left)  # the last step gets what is left
            if box < 2:
                results.append(StepResult(step, "not run", "the run's time budget is spent"))
                continue
            print(f"gpu_bench: {step} (box {box:.0f} s)…", file=sys.stderr, flush=True)
            log.write(f"\n===== {step} =====\n")
            log.flush()
            # the step stops starting new sizes near its end: what it measured is kept
            ends = ["--ends-at", f"{time.time() + box - 5:.0f}"]
            results.append(run_step(step_args(opts) + ends, step, box, log))
            r = results[-1]
            print(f"gpu_bench: {step} {r.status} in {r.seconds:.0f} s {r.why}", file=sys.stderr,
                  flush=True)
    meta = {"device": opts.device, "quick": opts.quick, "host": platform.node(),
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": " ".join(["python -m s2s.bench.gpu_bench", *sys.argv[1:]]),
            "seconds": opts.budget - (deadline - time.monotonic()),
            "load_average": os.getloadavg()}
    path = write(results, meta, out)
    print(path.read_text())
    return 0 if all(r.status in ("ok", "not run") for r in results) else 1


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m s2s.bench.gpu_bench",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--quick", action="store_true", help="small sizes: a proof on a CPU")
    ap.add_argument("--out", default="gpu-results", help="folder of the table, JSON and log")
    ap.add_argument("--steps", default=",".join(ORDER), help=f"comma-separated, of {ORDER}")
    ap.add_argument("--budget", type=float, default=500, help="seconds for all steps together")
    ap.add_argument("--box-scale", type=float, default=1.0,
                    help="multiplies every step's time box (a slow CPU needs more)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "s2s-gpu-bench"),
                    help="scratch folder (the random-weight model is made here once)")
    ap.add_argument("--data", default=str(ROOT / "tests" / "data" if (ROOT / "tests").is_dir()
                                          else Path.cwd() / "tests" / "data"),
                    help="folder holding jfk.wav (tests/data)")
    ap.add_argument("--llm-weights", choices=("auto", "real", "random"), default="auto",
                    help="auto: the bundled SmolLM2-135M if installed, else random weights "
                         "of its architecture (from --llm-config)")
    ap.add_argument("--llm-config", default="", help="folder with the model's config and "
                    "tokenizer, for random weights (prepare.sh carries it)")
    ap.add_argument("--llm-batch", type=int, default=32, help="sessions curve: llm_max_batch")
    ap.add_argument("--redis-server", default="", help="sessions curve: the server binary")
    ap.add_argument("--levels", default="", help="sessions curve: session counts, e.g. 1,8,32")
    ap.add_argument("--ramp", type=float, default=5.0, help="sessions arrive within this many s")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--step", default="", help=argparse.SUPPRESS)  # a child's one step
    ap.add_argument("--ends-at", type=float, default=0.0, help=argparse.SUPPRESS)  # its box's end
    opts = ap.parse_args(argv)
    Path(opts.work).mkdir(parents=True, exist_ok=True)
    return opts


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    opts = parse(argv)
    return child(opts) if opts.step else runner(opts)


if __name__ == "__main__":
    raise SystemExit(main())
