"""Store folders for tests: copies that keep Qdrant Edge's sparse files sparse."""

from __future__ import annotations

import subprocess


def copy_store(src: str, dst: str) -> None:
    """Copy an embedded store folder to ``dst`` (which must not exist), keeping its files sparse: each
    segment maps 32 MiB chunk files that are mostly holes, and ``shutil.copytree`` writes the holes out
    (580 MB a copy instead of 3 MB; the crash cases' copies once filled CI's disk)."""
    subprocess.run(["cp", "-a", "--sparse=always", src, dst], check=True)
