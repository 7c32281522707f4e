"""Folder swaps that survive a kill: readers see the old folder or the complete new one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def recover(out: Path) -> None:
    """Put back the previous bundle if a writer was killed between the two renames of `replace_dir`."""
    if not out.exists():
        aside = sorted(out.parent.glob(f".{out.name}.old-*"), key=lambda p: p.stat().st_mtime)
        if aside:
            os.replace(aside[-1], out)


def replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished temp dir to `out`: readers see the old folder or the new one, never a mix."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
