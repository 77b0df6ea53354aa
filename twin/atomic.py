"""Folders written whole or not at all: build in a hidden partial folder, then swap it in."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def partial_folder(path: Path) -> Iterator[Path]:
    """Yield `.<name>.partial-<pid>` beside `path` (not created: a writer may want to create it). On
    success it replaces `path` (an existing one is moved aside first, then removed); on any
    failure or interrupt it is removed and `path` is left as it was."""
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        yield partial
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.rename(path, old)
            os.rename(partial, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(partial, path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
