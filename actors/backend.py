"""Which async backend is running in this thread, without a hard dependency on sniffio.

anyio no longer installs sniffio, so a core install of perdure may not have it. trio
does depend on it, so: if trio was never imported the backend is asyncio, and when it
was, sniffio is importable and tells the two apart.
"""

from __future__ import annotations

import sys
from typing import Literal

__all__ = ["current_backend"]


def current_backend() -> Literal["asyncio", "trio"]:
    """``"trio"`` inside a trio run, otherwise ``"asyncio"``."""
    if sys.modules.get("trio") is not None:  # None: the import was blocked
        import sniffio  # a dependency of trio, so importable whenever trio is

        if sniffio.current_async_library() == "trio":
            return "trio"
    return "asyncio"
