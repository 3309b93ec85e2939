"""Image files for the tests: ``sparse_image(path, size, data)``."""

from __future__ import annotations

from pathlib import Path


def sparse_image(path: Path, size: int, data: bytes | None = None) -> Path:
    """A new (or emptied) file of ``size`` bytes, all a hole but ``data``, written at offset
    0 if given.  Returns ``path``."""
    with open(path, "wb") as f:
        f.truncate(size)
        if data:
            f.write(data)
    return path
