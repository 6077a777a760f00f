"""Fill deploy/redis/users.acl's ${S2S_REDIS_PASSWORD_*} placeholders from the environment.

    S2S_REDIS_PASSWORD_GATEWAY=… S2S_REDIS_PASSWORD_VAD=… … python3 render_acl.py > users.acl

Refuses (exit 2) when a placeholder has no value, so no template password is ever live.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

TEMPLATE = Path(__file__).with_name("users.acl")
PLACEHOLDER = re.compile(r"\$\{(S2S_REDIS_PASSWORD_[A-Z]+)\}")


def render(template: str, env: dict[str, str]) -> str:
    missing = sorted({m for m in PLACEHOLDER.findall(template) if not env.get(m)})
    if missing:
        raise KeyError(", ".join(missing))
    for name in PLACEHOLDER.findall(template):
        if any(c.isspace() for c in env[name]):
            raise ValueError(f"{name} must not contain spaces")
    # redis-server's ACL files know no comments or blank lines: keep only the users
    lines = [line for line in template.splitlines() if line.strip() and
             not line.lstrip().startswith("#")]
    return PLACEHOLDER.sub(lambda m: env[m.group(1)], "\n".join(lines) + "\n")


def main() -> int:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else TEMPLATE
    try:
        sys.stdout.write(render(path.read_text(), dict(os.environ)))
    except (KeyError, ValueError) as e:
        print(f"render_acl: set {e.args[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
