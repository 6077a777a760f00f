"""Scores of the spoken eval: per turn (what was heard and answered), per conversation
(turn-taking as the user heard it, measured at the client) and per group.

Turn-taking, from the client's playback (bench/eval_play.py), all on one clock:
- early audio heard: seconds of reply audio heard after the user's first piece started
  and before their last piece started (the assistant talked over a pause), summed per
  conversation; a group reports its p95 over conversations;
- recovery: the user resumes (a later piece) while reply audio is heard, or a reply to the
  earlier pieces starts while they speak: from the piece's first frame to the moment no
  reply of before is heard any more;
- one answer: a paused thought got exactly one reply heard to its end;
- backchannel cancels: backchannels said over a reply after which that reply was cut;
- interruptions stopped: a real interruption cut the reply within ``STOP_S``;
- digit error rate (bench/eval_digits.py), echo and repeat rates (bench/reply_metrics.py).
"""

from __future__ import annotations

import re
import statistics
from typing import Any

from .eval_digits import errors as digit_errors
from .eval_play import Played
from .eval_set import JFK_TEXT, Conversation
from .reply_metrics import session_rates
from .wer import wer as _wer

STOP_S = 0.3   # an interruption must silence the reply within this (issue 19)
NUMBERS = {"zero": "0", "oh": "0", "one": "1", "two": "2", "three": "3", "four": "4",
           "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
           "eleven": "11", "twelve": "12", "fifteen": "15", "twenty": "20", "thirty": "30",
           "forty": "40", "hundred": "100"}
DANGLING = {"and", "but", "or", "the", "a", "an", "of", "to", "for", "with", "in", "on", "at",
            "by", "from", "is", "are", "my", "your", "their", "that", "which", "because"}


# --- text scores ---------------------------------------------------------------------------
def norm_words(text: str) -> list[str]:
    """Lower case, no punctuation; number words and digit runs as single digits, so
    "one zero zero" and "100" and "1,0,0" compare equal."""
    out: list[str] = []
    for w in re.findall(r"[a-z0-9']+", text.lower().replace(",", " ").replace("-", " ")):
        w = NUMBERS.get(w, w)
        out += list(w) if w.isdigit() else [w]
    return out


def wer(reference: str, hypothesis: str) -> float:
    """WER over normalized words (digits and number words alike)."""
    return _wer(reference, hypothesis, norm_words)


def has_keywords(reply: str, keywords: list[tuple[str, ...]]) -> bool:
    text = " ".join(norm_words(reply))
    joined = "".join(norm_words(reply))
    return all(any(" ".join(norm_words(k)) in text or
                   ("".join(norm_words(k)).isdigit() and "".join(norm_words(k)) in joined)
                   for k in group) for group in keywords)


def degenerate(reply: str) -> str:
    """'' for a sensible reply, else why not (repeated, fragment)."""
    from s2s.services.llm.replies import Repeats, ends_sentence

    if not reply.strip():
        return ""
    _, looped = Repeats().check(reply)
    if looped:
        return "repeated"
    words = norm_words(reply)
    if not ends_sentence(reply) and words and words[-1] in DANGLING:
        return "fragment"
    return ""


# --- one conversation -----------------------------------------------------------------------
def score(conv: Conversation, played: Played) -> dict[str, Any]:
    tracker, playback, spans = played.tracker, played.playback, played.spans
    server = [tracker.turns[n] for n in sorted(tracker.turns)]
    out_turns = []
    for i, (turn, (begin, end, starts)) in enumerate(zip(conv.turns, spans)):
        # the VAD may place a speech start a chunk or two before the audio's first sample
        limit = spans[i + 1][0] - 0.5 if i + 1 < len(spans) else float("inf")
        cue = played.cues.get(i)
        if cue and cue.at_s is not None:  # what was said over the reply is a turn of its own
            limit = min(limit, cue.at_s - 0.5)
        mine = [t for t in server if t.start_s is not None and begin - 0.5 <= t.start_s < limit]
        heard: list = []
        for t in mine:  # a continuation re-hears the pieces before it: keep the later one
            if not t.transcript.strip():
                continue
            while heard and heard[-1].end_s is not None and t.start_s < heard[-1].end_s - 0.05:
                heard.pop()
            heard.append(t)
        # done: the whole reply was sent (the client marks it "interrupted" once the user
        # speaks again, even after it ended)
        answered = [t for t in mine if t.done and t.reply.strip()]
        final = answered[-1] if answered else None
        first_turn = min((t.turn for t in mine), default=0)
        piece_at = [played.piece_mono.get(s) for s in starts]
        early_s, recovery = None, []
        if len(starts) > 1 and None not in piece_at:
            early_s = playback.heard(piece_at[0], piece_at[-1], first_turn)
            ends = piece_at[1:] + [played.end_mono.get(i, piece_at[-1])]
            for at, until in zip(piece_at[1:], ends):
                over = {n for n in playback.turns_between(at, until) if n >= first_turn}
                if over:  # the user resumed over a reply to what they had said so far
                    stop = max(playback.turn_end(n) or at for n in over)
                    recovery.append(round(max(0.0, stop - at), 3))
        cue_out = None
        if cue:
            cut = playback.cut.get(cue.over_turn) if cue.over_turn is not None else None
            cue_out = {"kind": cue.kind, "text": cue.text, "said": cue.sent_at is not None,
                       "cut": cut is not None and cue.sent_at is not None and
                       cut >= cue.sent_at,
                       "stop_s": round(cut - cue.sent_at, 3)
                       if cut is not None and cue.sent_at is not None and cut >= cue.sent_at
                       else None}
        reference = turn.reference if turn.recording else turn.text
        if turn.recording == "jfk.wav" and reference is None:
            reference = JFK_TEXT
        transcript = " ".join(t.transcript.strip() for t in heard)
        reply = final.reply if final else ""
        digits = digit_errors(reference, transcript) if conv.group == "digits" else None
        out_turns.append({
            "said": reference if reference is not None else transcript, "heard": transcript,
            "wer": round(wer(reference, transcript), 3) if reference is not None else None,
            "reply": reply, "answered": final is not None,
            "early": bool(early_s and early_s > 0),
            "keywords": [list(k) for k in turn.keywords],
            "keyword_ok": has_keywords(reply, turn.keywords) if turn.keywords else None,
            "degenerate": degenerate(reply),
            "voice_to_voice_ms": final.voice_to_voice_ms if final else None,
            "audio": (final.audio, final.sample_rate) if final and final.audio else None,
            "pauses": len(starts) - 1,
            "early_heard_s": round(early_s, 3) if early_s is not None else None,
            "recovery_s": recovery,
            # replies heard to their end, not cut short at the client (a reply the user
            # heard out counts even if the server later replaced it: it was an answer)
            "answers": sum(1 for t in mine if t.done and t.reply.strip() and
                           t.turn not in playback.cut),
            "cue": cue_out,
            "digit_edits": digits})
    events = [{k: v for k, v in e.items() if k in ("type", "turn", "t", "text", "start_s",
                                                    "end_s")} for e in tracker.events
              if e.get("type") not in ("audio_end",)]
    rates = session_rates([(t["said"], t["reply"]) for t in out_turns])
    return {"id": conv.id, "group": conv.group, "subset": conv.subset, "voice": conv.voice,
            "turns": out_turns, "replies": rates, "errors": tracker.errors, "events": events}


# --- per group ------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of values; None when there are none."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * len(s) + 0.5)) - 1))]


def share(hits: list[bool]) -> float | None:
    return round(sum(hits) / len(hits), 3) if hits else None


def summarize_group(convs: list[dict]) -> dict[str, Any]:
    turns = [t for c in convs for t in c["turns"]]
    kw = [t["keyword_ok"] for t in turns if t["keyword_ok"] is not None]
    paused = [t for t in turns if t["pauses"]]
    v2v = [t["voice_to_voice_ms"] for t in turns if t["voice_to_voice_ms"] is not None]
    rt = [t["round_trip_wer"] for t in turns if t.get("round_trip_wer") is not None]
    wers = [t["wer"] for t in turns if t["wer"] is not None]
    early = [sum(t.get("early_heard_s") or 0.0 for t in c["turns"]) for c in convs
             if any(t.get("early_heard_s") is not None for t in c["turns"])]
    recovery = [r for t in turns for r in t.get("recovery_s") or []]
    resumed = [t for t in turns if t.get("recovery_s")]
    cues = [t["cue"] for t in turns if t.get("cue") and t["cue"]["said"]]
    back = [c["cut"] for c in cues if c["kind"] == "backchannel"]
    stops = [c["cut"] and c["stop_s"] <= STOP_S for c in cues if c["kind"] == "interruption"]
    stop_s = [c["stop_s"] for c in cues if c["kind"] == "interruption" and c["cut"]]
    edits = [t["digit_edits"] for t in turns if t.get("digit_edits")]
    replies = [c.get("replies") or {} for c in convs]
    n_replies = sum(r.get("replies", 0) for r in replies)
    return {
        "conversations": len(convs), "turns": len(turns),
        "answered": sum(t["answered"] for t in turns),
        "wer": round(statistics.mean(wers), 3) if wers else None,
        "keyword_accuracy": share(kw),
        "early_rate": share([t["early"] for t in paused]),
        "early_heard_p95_s": pct(early, 0.95),
        "recovery_p95_ms": round(pct(recovery, 0.95) * 1000) if recovery else None,
        "recovery_n": len(recovery),
        "one_answer": share([t["answers"] == 1 for t in resumed]),
        "cues_said": len(cues), "cues_planned": sum(1 for t in turns if t.get("cue")),
        "backchannel_cancels": share(back), "backchannels": len(back),
        "interruptions_stopped": share(stops), "interruptions": len(stops),
        "interruption_stop_p50_ms": round(pct(stop_s, 0.5) * 1000) if stop_s else None,
        "digit_error_rate": round(sum(e[0] for e in edits) / max(1, sum(e[1] for e in edits)),
                                  3) if edits else None,
        "echo_rate": round(sum(r.get("echoes", 0) for r in replies) / n_replies, 3)
        if n_replies else None,
        "repeat_rate": round(sum(r.get("repeats", 0) for r in replies) / n_replies, 3)
        if n_replies else None,
        "degenerate": sum(bool(t["degenerate"]) for t in turns),
        "round_trip_wer": round(statistics.mean(rt), 3) if rt else None,
        "v2v_p50_ms": round(pct(v2v, 0.5)) if v2v else None,
        "v2v_p90_ms": round(pct(v2v, 0.9)) if v2v else None,
        "v2v_p95_ms": round(pct(v2v, 0.95)) if v2v else None}


def summarize(results: list[dict], group_names: list[str]) -> dict[str, dict]:
    """One row per group, one per group:subset (statements:jfk), and one of all."""
    rows: list[tuple[str, list[dict]]] = []
    for group in group_names:
        convs = [c for c in results if c["group"] == group]
        rows.append((group, convs))
        for subset in sorted({c.get("subset") or "" for c in convs} - {""}):
            rows.append((f"{group}:{subset}", [c for c in convs if c.get("subset") == subset]))
    rows.append(("all", results))
    return {name: summarize_group(convs) for name, convs in rows
            if any(c["turns"] for c in convs)}


# --- tables -------------------------------------------------------------------------------
def _f(v, pct=False, unit=""):
    if v is None:
        return "-"
    return f"{v * 100:.0f}%" if pct else f"{v}{unit}"


def format_table(summary: dict[str, dict], label: str = "") -> str:
    rows = [f"| {label or 'group'} | convs | answered | transcript WER | keyword acc | "
            f"early answers | degenerate | round-trip WER | v2v p50 / p90 ms |",
            "|---|---|---|---|---|---|---|---|---|"]
    for group, s in summary.items():
        rows.append(f"| {group} | {s['conversations']} | {s['answered']}/{s['turns']} | "
                    f"{_f(s['wer'], True)} | {_f(s['keyword_accuracy'], True)} | "
                    f"{_f(s['early_rate'], True)} | {s['degenerate']} | "
                    f"{_f(s['round_trip_wer'], True)} | {_f(s['v2v_p50_ms'])} / "
                    f"{_f(s['v2v_p90_ms'])} |")
    return "\n".join(rows)


def format_turn_taking(summary: dict[str, dict], label: str = "") -> str:
    """The turn-taking table (docs/turn-taking.md)."""
    rows = [f"| {label or 'group'} | convs | v2v p50 / p95 ms | early audio heard p95 | "
            "recovery p95 (n) | one answer | backchannel cancels (n) | "
            "interruptions stopped ≤300 ms (n) | digit error rate | echo | repeat |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for group, s in summary.items():
        rows.append(
            f"| {group} | {s['conversations']} | {_f(s['v2v_p50_ms'])} / {_f(s['v2v_p95_ms'])} | "
            f"{_f(s['early_heard_p95_s'], unit=' s')} | "
            f"{_f(s['recovery_p95_ms'], unit=' ms')} ({s['recovery_n']}) | "
            f"{_f(s['one_answer'], True)} | "
            f"{_f(s['backchannel_cancels'], True)} ({s['backchannels']}) | "
            f"{_f(s['interruptions_stopped'], True)} ({s['interruptions']}) | "
            f"{_f(s['digit_error_rate'], True)} | {_f(s['echo_rate'], True)} | "
            f"{_f(s['repeat_rate'], True)} |")
    return "\n".join(rows)
