"""Helpers shared by the benchmarks: machine description and BENCHMARKS.md sections."""

from __future__ import annotations

import os
import platform
import re
import shlex
import sys


def command(script: str, argv: list[str] | None = None) -> str:
    """The command line a section records, quoted so that it can be pasted back (``--title "## ..."``)."""
    return shlex.join(["python", script, *(sys.argv[1:] if argv is None else argv)])


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
            mem = f", {kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}"


def replace_section(path: str, title: str, body: list[str]) -> None:
    """Replace (or append) the ``## title`` section of a Markdown file."""
    text = "# Benchmarks\n\nEvery figure below was measured by the command shown with it.\n"
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    section = f"## {title}\n\n" + "\n".join(body).rstrip() + "\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    with open(path, "w") as f:
        f.write(text)


def report(path: str, title: str, body: list[str], write: bool) -> None:
    """Print a bench's section and, with ``write``, replace the ``## title`` section of ``path`` with it."""
    print("\n".join(body))
    if write:
        replace_section(path, title, body)
        print(f"wrote {title!r} to {os.path.basename(path)}")
