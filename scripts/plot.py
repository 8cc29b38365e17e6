# python scripts/plot.py OUTPUT_DIR
"""Draw OUTPUT_DIR/curves.png from a run's logs, finished or still going (qlora_loop.observe.plot; --help)."""

from qlora_loop.cli import as_script
from qlora_loop.observe.plot import main

if __name__ == "__main__":
    with as_script():  # a missing run is one `error:` line and exit 2
        main()
