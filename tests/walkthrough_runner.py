"""Run the console blocks of a Markdown document against a real demo server and compare outputs.

A ```console block holds ``$ command`` lines, each followed by the output it printed. The
runner starts ``lockgate demo`` (as ``make demo`` does, on free ports) in a scratch
directory, runs every command there with bash, with the demo's tokens sourced and
``lockgate`` meaning ``python -m lockgate.cli`` of this interpreter, and compares what each
printed with the document after ``normalise`` (times, hashes, tokens, latencies, the scratch
path and table padding differ from run to run; nothing else may).

``LOCKGATE_WALKTHROUGH_UPDATE=1`` rewrites the document's outputs with this run's (the only
way they are written: the document always shows real output).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

DOC_HOME = "~/lockgate"  # the scratch directory as the document shows it
FENCE = "```console"

_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)?"), "<time>"),
    (re.compile(r"\b[0-9a-f]{64}\b"), "<sha256>"),
    (re.compile(r"\b[0-9a-f]{12}\b"), "<sha12>"),
    (re.compile(r"lgt_[A-Za-z0-9_-]+"), "<token>"),
    (re.compile(r"\b\d+(?:\.\d+)? ?(?:ms|µs|s)\b"), "<duration>"),
    (re.compile(r"127\.0\.0\.1:\d+"), "127.0.0.1:<port>"),
    (re.compile(r"max \|diff\| [0-9.e+-]+"), "max |diff| <n>"),  # float rounding differs between CPUs
    (re.compile(r"[─━═]+"), "─"),
    (re.compile(r"[ \t]+"), " "),
]


def normalise(text: str) -> list[str]:
    """The lines of ``text`` with what legitimately differs between runs replaced."""
    lines = []
    for line in text.splitlines():
        for pattern, replacement in _RULES:
            line = pattern.sub(replacement, line)
        line = line.strip()
        if line:
            lines.append(line)
    return lines


@dataclass
class Step:
    command: str
    expected: list[str] = field(default_factory=list)  # the document's output lines, as written
    line: int = 0  # where the command is in the document (1-based)


def parse(document: str) -> list[Step]:
    """Every ``$ command`` of every console block, with the output lines under it."""
    steps: list[Step] = []
    inside = False
    for number, line in enumerate(document.splitlines(), 1):
        if line.strip() == FENCE:
            inside = True
        elif inside and line.strip() == "```":
            inside = False
        elif inside and line.startswith("$ "):
            steps.append(Step(line[2:], line=number))
        elif inside and steps:
            steps[-1].expected.append(line)
    return steps


def rewrite(document: str, outputs: list[str]) -> str:
    """The document with each command's output block replaced by ``outputs`` (in order)."""
    result: list[str] = []
    inside = False
    index = -1
    for line in document.splitlines():
        if line.strip() == FENCE:
            inside = True
            result.append(line)
        elif inside and line.strip() == "```":
            inside = False
            result.append(line)
        elif inside and line.startswith("$ "):
            index += 1
            result.append(line)
            result.extend(outputs[index].rstrip("\n").splitlines())
        elif not inside:
            result.append(line)
    return "\n".join(result) + "\n"


def run_step(step: Step, cwd: Path, env: dict[str, str], timeout: float = 180.0) -> tuple[int, str]:
    """Run one command as the reader would, in bash, with the demo tokens sourced."""
    prelude = (
        f"lockgate() {{ {shlex.quote(sys.executable)} -m lockgate.cli \"$@\"; }}\n"
        "source demo-repo/demo-tokens.env\n"
    )
    done = subprocess.run(
        ["bash", "-c", prelude + step.command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )
    return done.returncode, as_documented(done.stdout + done.stderr, str(cwd))


def as_documented(output: str, cwd: str) -> str:
    """The scratch directory shown as ``DOC_HOME``; inside a table cell the difference in length
    becomes padding, so the table's borders stay aligned."""
    lines = []
    pad = " " * max(0, len(cwd) - len(DOC_HOME))
    for line in output.splitlines():
        if "│" in line:
            line = re.sub(re.escape(cwd) + r"(\S*)", lambda m: DOC_HOME + m.group(1) + pad, line)
        lines.append(line.replace(cwd, DOC_HOME))
    return "\n".join(lines) + ("\n" if output.endswith("\n") else "")


def update_requested() -> bool:
    return os.environ.get("LOCKGATE_WALKTHROUGH_UPDATE") == "1"
