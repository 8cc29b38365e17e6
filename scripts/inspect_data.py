# python scripts/inspect_data.py --config FILE [--n 5]
"""Look at the training data as the model will see it, before training (qlora_loop.data.inspector; --help)."""

from qlora_loop.cli import as_script  # first: it quiets bitsandbytes' import-time log line
from qlora_loop.data.inspector import main

if __name__ == "__main__":
    with as_script():  # one `error:` line and exit 2 for a bad config, data or model
        main()
