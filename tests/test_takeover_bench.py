"""`python -m s2s.bench.takeover`, CI-sized: one kill per path; the acked-payload
memory comparison is exact enough to assert (deleting frees the payloads)."""

from __future__ import annotations

import re

from s2s.bench import takeover


def test_takeover_bench_reports_both_paths_and_freed_payloads(redis_server, capsys):
    assert takeover.main(["--kills", "1"]) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"^\| (lease|idle-time claim only).*\| 1 \|", out, re.M)) == 2, out
    mem = dict(re.findall(r"^\| (XACK[^|]*?) \| ([\d.]+) MB \|", out, re.M))
    assert float(mem["XACK only (before)"]) > 20 > float(mem["XACK + XDEL (Bus.ack)"]), out
