"""The prepared GPU measurement (bench/gpu_bench.py, run by bench/gpu/run.sh on a lent GPU):
its steps run in processes of their own, a step past its time box is killed with whatever
it started and recorded as such, the run stops starting steps once its budget is spent,
and what was measured lands in one well-formed Markdown table and a JSON with the same
numbers.  The real env step (it imports torch, onnxruntime and CTranslate2 and reads the
machine) is the measurement; no model is loaded."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil

from s2s.bench.gpu_bench import StepResult, markdown, parse, run_step, runner, step_args, write


def table_rows(md: str) -> list[list[str]]:
    """The cells of each row of the one table in ``md`` (escaped pipes kept inside cells)."""
    rows = []
    for line in md.splitlines():
        if line.startswith("|"):
            cells = line.replace("\\|", "\0").strip().strip("|").split("|")
            rows.append([c.strip().replace("\0", "|") for c in cells])
    return rows


def test_env_step_measures_this_machine_into_the_table_and_the_json(tmp_path):
    opts = parse(["--device", "cpu", "--quick", "--work", str(tmp_path / "work")])
    with open(tmp_path / "log", "w") as log:
        res = run_step(step_args(opts), "env", 120, log)
    assert res.status == "ok", (res.why, (tmp_path / "log").read_text()[-2000:])
    # what the child read is this machine's: the torch this venv holds, nvidia-smi's
    # answer exactly where there is one
    assert res.data["torch"] == importlib.metadata.version("torch")
    assert ("nvidia_smi" in res.data) == (shutil.which("nvidia-smi") is not None)
    assert set(res.data["libs"]) == {"libcublas.so.12", "libcublas.so.13", "libcudnn.so.9"}

    path = write([res], {"device": "cpu", "quick": True, "host": "here", "when": "now",
                         "command": "test", "seconds": res.seconds}, tmp_path / "out")
    rows = table_rows(path.read_text())
    assert rows[0] == ["step", "measure", "value", "note"]
    assert all(len(r) == 4 for r in rows), rows
    body = rows[2:]
    assert len(body) == len(res.rows) and body[0][0].startswith("env (ok,")
    torch_row = next(r for r in body if r[1] == "torch")
    assert torch_row[2] == res.data["torch"]
    saved = json.loads((tmp_path / "out" / "gpu_results.json").read_text())
    assert saved["steps"][0]["data"]["torch"] == res.data["torch"]
    assert saved["meta"]["device_name"].startswith("CPU (")


def test_a_step_past_its_box_is_killed_with_its_process_group(tmp_path):
    opts = parse(["--device", "cpu", "--work", str(tmp_path)])
    with open(tmp_path / "log", "w") as log:
        # the env step imports torch: far longer than 0.2 s
        res = run_step(step_args(opts), "env", 0.2, log)
    assert res.status == "timeout" and "0 s box" in res.why
    try:
        os.killpg(res.data["pid"], 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive, "the step's process group outlived its box"


def test_the_run_starts_no_step_once_its_budget_is_spent(tmp_path, capsys):
    out = tmp_path / "out"
    code = runner(parse(["--device", "cpu", "--out", str(out), "--work", str(tmp_path),
                         "--steps", "env,stt,tts", "--budget", "3"]))
    capsys.readouterr()
    steps = json.loads((out / "gpu_results.json").read_text())["steps"]
    assert [s["step"] for s in steps] == ["env", "stt", "tts"]
    # env had the 3 s (done or killed); nothing was left for the others
    assert steps[0]["status"] in ("ok", "timeout")
    assert [s["status"] for s in steps[1:]] == ["not run", "not run"]
    assert all("budget" in s["why"] for s in steps[1:])
    assert code == (0 if steps[0]["status"] == "ok" else 1)
    rows = table_rows((out / "gpu_results.md").read_text())
    assert all(len(r) == 4 for r in rows)
    assert [r[0].split(" ")[0] for r in rows[2:] if r[0]][-2:] == ["stt", "tts"]
    assert (out / "gpu_steps.log").read_text().count("=====") == 2  # env's header only


def test_cells_with_pipes_and_newlines_keep_the_table_four_columns():
    res = StepResult("tts", "not run", "onnxruntime | no CUDA provider\nsecond line")
    ok = StepResult("llm", "ok", "labelled", [["a|b", "1 | 2", "x\ny"]], seconds=1.0)
    md = markdown([res, ok], {"device_name": "X", "device": "cuda", "when": "t", "host": "h",
                              "command": "c", "seconds": 1.0})
    rows = table_rows(md)
    assert all(len(r) == 4 for r in rows), rows
    assert rows[2][3] == "onnxruntime | no CUDA provider second line"
    assert rows[3][1:] == ["a|b", "1 | 2", "x y"]
    assert rows[4][1:] == ["(llm)", "", "labelled"]  # the step's label follows its rows
