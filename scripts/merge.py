# python scripts/merge.py --adapter OUTPUT_DIR/best --out merged/ [--prompts FILE] [--force]
"""Merge an adapter into its bfloat16 base and report the merged model's fidelity (qlora_loop.use.merge; --help)."""

from qlora_loop.cli import as_script  # first: it quiets bitsandbytes' import-time log line
from qlora_loop.use.merge import main

if __name__ == "__main__":
    with as_script(quiet=True):  # one `error:` line and exit 2 for a bad flag, folder or file
        main()
