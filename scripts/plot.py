# python scripts/plot.py OUTPUT_DIR
"""Draw OUTPUT_DIR/curves.png from a run's logs, finished or still going (qlora_loop.observe.plot; --help)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from qlora_loop.cli import as_script  # noqa: E402
from qlora_loop.observe.plot import main  # noqa: E402

if __name__ == "__main__":
    with as_script():  # a missing run is one `error:` line and exit 2
        main()
