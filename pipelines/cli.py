"""The ``corpus-etl`` command: one subcommand per job or tool."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "index": ("pipelines.index", "embed Parquet documents into a Qdrant collection (Beam job)"),
    "label": ("pipelines.label", "label query logs with Qwen3-Reranker into eval and distillation sets (Beam job)"),
    "search": ("pipelines.search", "search a collection"),
    "evaluate": ("pipelines.evaluate", "nDCG@10 / MRR@10 / Recall@100 of a collection on BEIR queries and qrels"),
    "copy": ("pipelines.copy", "copy an embedded collection into a Qdrant server collection (optionally switch an alias)"),
    "dump": ("pipelines.dump", "write every point of a collection to one Parquet file, sorted by id"),
    "sample-data": ("pipelines.sample", "write a small real-text corpus, queries, qrels and a query log"),
}


def usage() -> str:
    lines = ["usage: corpus-etl COMMAND [options]   (corpus-etl COMMAND --help for each)", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"corpus-etl: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    from transforms.gpu import DeviceUnavailableError

    try:
        module.run(rest)
    except (FileNotFoundError, ValueError, DeviceUnavailableError) as exc:
        # Input and configuration problems: one clear line, no traceback.
        print(f"corpus-etl {name}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
