"""Where qlora_loop keeps what it builds once per machine: $XDG_CACHE_HOME/qlora_loop (default ~/.cache).

  builtin models (model/builtin.py)   the base's replies (forgetting/replay.py)   tokenized data (data/cache.py)
  the CPU's bfloat16 check (cpu.py)
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qlora_loop"
