"""A small corpus of real English text, made offline: the Python standard library's own docs.

Each document is one stdlib module: its docstring and the docstrings of its public
functions and classes (title = module name). Queries are hand-written questions whose
answer is a known module, so retrieval quality is measured, not assumed. Everything is
derived from the running Python, so it needs no download.

    corpus-etl sample-data --out demo_data
    → corpus.parquet (id, title, text, n_members), queries.jsonl, qrels/test.tsv (BEIR),
      query_log.parquet (query_id, query, count: a query log with duplicates and bad rows)
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import warnings

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.flags import sample_parser

MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fileinput", "fnmatch", "fractions",
    "ftplib", "functools", "getpass", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html",
    "http.client", "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging",
    "lzma", "mailbox", "math", "mimetypes", "operator", "optparse", "os", "pathlib", "pickle", "platform",
    "poplib", "pprint", "queue", "random", "re", "sched", "secrets", "selectors", "shelve", "shlex",
    "shutil", "signal", "smtplib", "socket", "sqlite3", "ssl", "statistics", "string", "struct",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback",
    "types", "typing", "unittest", "urllib.parse", "uuid", "warnings", "weakref", "xml.dom.minidom",
    "zipfile", "zlib",
)  # fmt: skip

QUERIES = {
    "q01": ("how do I parse command line options and arguments", ["argparse", "optparse"]),
    "q02": ("read and write comma separated values files", ["csv"]),
    "q03": ("compress a file with gzip", ["gzip", "zlib"]),
    "q04": ("greatest common divisor and square root", ["math"]),
    "q05": ("regular expression pattern matching", ["re"]),
    "q06": ("encode python objects as JSON", ["json"]),
    "q07": ("secure hash functions like sha256 and md5", ["hashlib", "hmac"]),
    "q08": ("run a child process and capture its output", ["subprocess"]),
    "q09": ("locks and threads for concurrency", ["threading", "queue"]),
    "q10": ("store data in an embedded SQL database", ["sqlite3"]),
    "q11": ("send an email message over SMTP", ["smtplib", "email"]),
    "q12": ("generate pseudo-random numbers and shuffle a list", ["random", "secrets"]),
    "q13": ("split a URL into its components", ["urllib.parse"]),
    "q14": ("write unit tests with assertions and test cases", ["unittest"]),
    "q15": ("emit log records to handlers at different severity levels", ["logging"]),
    "q16": ("create and extract zip archives", ["zipfile", "tarfile"]),
    "q17": ("priority queue implemented with a heap", ["heapq", "queue"]),
    "q18": ("copy and remove directory trees", ["shutil"]),
    "q19": ("create temporary files and directories", ["tempfile"]),
    "q20": ("serialize objects to bytes and back", ["pickle", "shelve"]),
    "q21": ("exact decimal floating point arithmetic", ["decimal", "fractions"]),
    "q22": ("compute mean, median and standard deviation", ["statistics"]),
    "q23": ("measure execution time of small code snippets", ["timeit"]),
    "q24": ("generate universally unique identifiers", ["uuid"]),
    "q25": ("manipulate IPv4 and IPv6 addresses and networks", ["ipaddress"]),
}


def module_text(name: str, max_chars: int = 6000) -> tuple[str, int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mod = importlib.import_module(name)
    parts = [inspect.cleandoc(mod.__doc__ or "")]
    members = 0
    for attr in sorted(getattr(mod, "__all__", None) or dir(mod)):
        if attr.startswith("_"):
            continue
        obj = getattr(mod, attr, None)
        if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
            continue
        doc = inspect.getdoc(obj)
        owner = getattr(obj, "__module__", None) or name
        if doc and owner.lstrip("_").split(".")[0] == name.split(".")[0]:
            parts.append(f"{attr}: {doc}")
            members += 1
    text = "\n\n".join(p for p in parts if p)
    return text[:max_chars], members


def build_corpus() -> list[dict]:
    rows = []
    for name in MODULES:
        text, members = module_text(name)
        if text.strip():
            rows.append({"id": name, "title": name, "text": text, "n_members": members})
    return rows


def write_sample(out: str) -> dict[str, str]:
    os.makedirs(os.path.join(out, "qrels"), exist_ok=True)
    rows = build_corpus()
    ids = {r["id"] for r in rows}
    paths = {
        "corpus": os.path.join(out, "corpus.parquet"),
        "queries": os.path.join(out, "queries.jsonl"),
        "qrels": os.path.join(out, "qrels", "test.tsv"),
        "query_log": os.path.join(out, "query_log.parquet"),
    }
    pq.write_table(pa.Table.from_pylist(rows), paths["corpus"])
    with open(paths["queries"], "w", encoding="utf-8") as f:
        for qid, (text, _) in QUERIES.items():
            f.write(json.dumps({"_id": qid, "text": text}) + "\n")
    with open(paths["qrels"], "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for qid, (_, rel) in QUERIES.items():
            for grade, doc in zip((2, 1), rel):
                if doc in ids:
                    f.write(f"{qid}\t{doc}\t{grade}\n")
    log = []
    for i, (text, _) in enumerate(QUERIES.values()):
        log.append({"query_id": None, "query": text, "count": 1 + (i * 7) % 13})
        if i % 4 == 0:  # the same query again, differently spelled: de-duplicated, counts summed
            log.append({"query_id": None, "query": "  " + text.upper() + " ", "count": 2})
    log += [{"query_id": None, "query": "", "count": 1}, {"query_id": None, "query": None, "count": 3}]
    pq.write_table(
        pa.Table.from_pylist(log, schema=pa.schema([("query_id", pa.string()), ("query", pa.string()), ("count", pa.int64())])),
        paths["query_log"],
    )
    return paths


def run(argv: list[str] | None = None) -> dict[str, str]:
    return run_args(sample_parser().parse_args(argv))


def run_args(args: argparse.Namespace, beam_args: list[str] | None = None) -> dict[str, str]:
    paths = write_sample(args.out)
    for kind, path in paths.items():
        print(f"{kind:10s} {path}")
    return paths
