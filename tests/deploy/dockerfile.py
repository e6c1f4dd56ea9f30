"""What the deployment tests need to know of the Dockerfile: its ENV defaults and the service's uid."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def instructions(path: Path = DOCKERFILE) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    joined, current = [], ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        joined.append(current + line)
        current = ""
    return joined


def env(path: Path = DOCKERFILE) -> dict[str, str]:
    """Every `ENV KEY=VALUE ...` of the Dockerfile (a later one wins)."""
    result: dict[str, str] = {}
    for instruction in instructions(path):
        keyword, _, rest = instruction.strip().partition(" ")
        if keyword.upper() == "ENV":
            for token in shlex.split(rest):
                key, equals, value = token.partition("=")
                assert equals, f"ENV {token!r}: write ENV KEY=VALUE"
                result[key] = value
    return result


def service_uid(path: Path = DOCKERFILE) -> int:
    """The uid that `useradd --uid N` gives the user the image runs as."""
    uids = re.findall(r"useradd\b[^\n]*?(?:--uid[ =]|-u )(\d+)", "\n".join(instructions(path)))
    assert len(uids) == 1, f"expected one `useradd --uid N` in {path}, found {uids}"
    return int(uids[0])
