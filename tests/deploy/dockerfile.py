"""A small reader for the repo's Dockerfile: enough to compare it with the compose file."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from tests.deploy.catalog import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        keyword, _, rest = text.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def global_args(path: Path = DOCKERFILE) -> dict[str, str]:
    """The ARGs declared before the first FROM, with their defaults ('' when none)."""
    args: dict[str, str] = {}
    for keyword, rest in instructions(path):
        if keyword == "FROM":
            break
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
    return args


def stages(path: Path = DOCKERFILE) -> list[Stage]:
    """The build stages; a FROM's `${ARG}` is expanded to the global ARG's default."""
    defaults = global_args(path)
    result: list[Stage] = []
    for keyword, rest in instructions(path):
        if keyword == "FROM":
            m = re.fullmatch(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            assert m, f"cannot read FROM {rest!r}"
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)",
                          lambda v: defaults[v.group(1) or v.group(2)], m.group(1))
            result.append(Stage(base, m.group(2)))
        elif result:
            result[-1].instructions.append((keyword, rest))
    return result


def exposed_ports(path: Path = DOCKERFILE) -> set[int]:
    final = stages(path)[-1]
    return {int(p.split("/")[0]) for rest in final.args("EXPOSE") for p in rest.split()}


def exec_form(rest: str) -> list[str]:
    """The JSON array of an exec-form ENTRYPOINT/CMD/HEALTHCHECK CMD."""
    value = json.loads(rest)
    assert isinstance(value, list) and all(isinstance(x, str) for x in value), rest
    return value
