"""Print the requirements of s2s's core and the named extras, read from pyproject.toml alone.

The role images (deploy/Dockerfile) install these in a layer of their own, before the
package: that layer depends on pyproject.toml only, so a change to the code rebuilds the
small package layer and reuses the dependencies from Docker's build cache.

    python deploy/role_requirements.py pyproject.toml all bench > requirements.txt

An extra that names s2s's own extras (``s2s[gateway,stt]``) is expanded in place; other
requirements are printed as written (markers included: pip evaluates them).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

SELF = re.compile(r"^\s*s2s\s*\[([^\]]+)\]\s*$")


def requirements(project: dict, extras: list[str]) -> list[str]:
    optional = project.get("optional-dependencies", {})
    out: list[str] = list(project.get("dependencies", []))
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop(0)
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"pyproject.toml has no extra {extra!r}")
        seen.add(extra)
        for req in optional[extra]:
            own = SELF.match(req)
            if own:
                todo += [e.strip() for e in own.group(1).split(",")]
            elif req not in out:
                out.append(req)
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 1:
        raise SystemExit(__doc__)
    project = tomllib.loads(Path(argv[0]).read_text())["project"]
    print("\n".join(requirements(project, argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
