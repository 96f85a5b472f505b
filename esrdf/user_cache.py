"""The per-user cache directory: compiled engines and measured parity figures that depend on this machine.

``$ESRDF_CACHE`` when set, else ``$XDG_CACHE_HOME/esrdf``, else ``~/.cache/esrdf``. Nothing in it is ever
needed: deleting it costs one recompile (and one parity measurement) on the next use. Each user of it keys
its entries by everything they depend on (library version, CPU model and flags, graph sha256, shape), so a
cache copied from another machine, or left by another library version, is never reused.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "ESRDF_CACHE"


def user_cache_dir(*parts: str) -> Path:
    """``<cache root>/<parts...>``, created if missing."""
    root = os.environ.get(ENV_VAR)
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = os.path.join(xdg, "esrdf") if xdg else os.path.join(os.path.expanduser("~"), ".cache", "esrdf")
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
