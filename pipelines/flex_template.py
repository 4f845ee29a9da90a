"""Dataflow Flex Templates for ``corpus-etl index`` and ``label``: their metadata, and the launcher's entry point.

The metadata (``infra/flex-template/metadata.json``, ``label-metadata.json``) is generated from the
commands' own parsers (``pipelines.flags``), so a template lists every flag and cannot drift
from the CLI (tests/test_infra.py compares the files with this output):

    python -m pipelines.flex_template metadata index > infra/flex-template/metadata.json
    python -m pipelines.flex_template metadata label > infra/flex-template/label-metadata.json

A parameter is the flag's name with ``_`` for ``-`` (``qdrant_url`` for ``--qdrant-url``),
the spelling of Beam's own options; a switch (``--force``) takes ``true`` or ``false``.
The launcher (``infra/flex-template/main.py`` → ``main``) turns the ``--name=value``
arguments Dataflow passes back into the CLI's flags and runs ``corpus-etl COMMAND``. The
launcher passes ``--template_location``, so the command builds the job without the store or
the input (``pipelines.launch``); the workers check them when the job starts. Standard library
only: the metadata is written without importing Beam.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pipelines import flags

PARSERS = {"index": flags.index_parser, "label": flags.label_parser}
DESCRIPTIONS = {
    "index": "corpus-etl index: Parquet documents -> token chunks -> embeddings -> Qdrant points (idempotent, "
    "incremental). The store and the input are checked by a worker when the job starts.",
    "label": "corpus-etl label: query logs -> first-stage candidates -> Qwen3-Reranker labels -> BEIR, TREC and "
    "distillation files. The index and the inputs are checked by a worker when the job starts.",
}
# What runs in the driver after the job: refused when the job is a template (pipelines.launch).
AFTER_JOB = {"alias", "delete_missing", "hnsw", "gate_queries", "gate_qrels"}
FILES = {"index": "infra/flex-template/metadata.json", "label": "infra/flex-template/label-metadata.json"}
_INT = r"^-?[0-9]+$"
_FLOAT = r"^-?[0-9]+(\.[0-9]*)?([eE]-?[0-9]+)?$"


def _flag_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every long flag of ``parser`` except --help."""
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


def _long(action: argparse.Action) -> str:
    return next(o for o in action.option_strings if o.startswith("--"))


def parameter_name(action: argparse.Action) -> str:
    return _long(action)[2:].replace("-", "_")


def _is_switch(action: argparse.Action) -> bool:
    return isinstance(action, argparse._StoreTrueAction)


def parameters(parser: argparse.ArgumentParser) -> list[dict[str, object]]:
    """Flex Template parameters, one per flag, in the parser's order."""
    out: list[dict[str, object]] = []
    for action in _flag_actions(parser):
        help_ = (action.help or "").replace("%%", "%")
        default = action.default
        if _is_switch(action):
            help_ += " (true or false; default false)"
        elif default not in (None, "", argparse.SUPPRESS) and "default" not in help_:
            help_ += f" (default {default})"
        if parameter_name(action) in AFTER_JOB:
            help_ += "; refused in a template: it runs in the driver after the job (run the command itself for it)"
        param: dict[str, object] = {
            "name": parameter_name(action),
            "label": _long(action),
            "helpText": help_,
            "isOptional": not action.required,
        }
        if _is_switch(action):
            param["regexes"] = ["^(true|false)$"]
        elif action.type is int:
            param["regexes"] = [_INT]
        elif action.type is float:
            param["regexes"] = [_FLOAT]
        out.append(param)
    return out


def metadata(command: str) -> dict[str, object]:
    parser = PARSERS[command]()
    return {"name": f"corpus-etl {command}", "description": DESCRIPTIONS[command], "parameters": parameters(parser)}


def to_cli_argv(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """The launcher's ``--name=value`` arguments as the CLI's flags; anything else (Beam's options) as given."""
    by_name = {parameter_name(a): a for a in _flag_actions(parser)}
    out: list[str] = []
    for arg in argv:
        name, sep, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        action = by_name.get(name.replace("-", "_")) if name else None
        if action is None:
            out.append(arg)
        elif _is_switch(action):
            if not sep or value.lower() == "true":
                out.append(_long(action))
            elif value.lower() != "false":
                raise SystemExit(f"--{name}: expected true or false, got {value!r}")
        else:
            out.append(f"{_long(action)}={value}" if sep else _long(action))
    return out


def main(argv: list[str] | None = None) -> int:
    """The Flex Template launcher's program: ``CORPUS_ETL_COMMAND`` (index or label) with the launch's parameters."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = os.environ.get("CORPUS_ETL_COMMAND", "index")
    if command not in PARSERS:
        raise SystemExit(f"CORPUS_ETL_COMMAND must be one of {sorted(PARSERS)}, got {command!r}")
    if not any(a.startswith("--template_location") for a in argv):
        # The launcher builds the job into the file Dataflow then starts; a run that would wait for the job
        # here (and time the launcher out) is not what a template is for.
        raise SystemExit("the Flex Template launcher passes --template_location; to run the job and wait for it, "
                         f"use `corpus-etl {command} ... --runner DataflowRunner` instead")  # fmt: skip
    from pipelines.cli import main as cli_main

    return cli_main([command, *to_cli_argv(PARSERS[command](), argv)])


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "metadata" and sys.argv[2] in PARSERS:
        print(json.dumps(metadata(sys.argv[2]), indent=2, ensure_ascii=False))
    else:
        sys.exit("usage: python -m pipelines.flex_template metadata index|label")
