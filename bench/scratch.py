"""A benchmark's scratch folder: renders and runs that must not outlive the benchmark."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path


def scratch_dir(prefix: str) -> Path:
    """A fresh temp folder, removed when the process exits (a bench renders projects of 10-300 MB)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path
