# python scripts/eval.py --adapter OUTPUT_DIR/best [--data FILE] [--metrics exact_match rouge_l ...] [--no-base]
"""Score an adapter beside its base on rows with answers (qlora_loop.eval.compare; --help for the flags)."""

from qlora_loop.cli import as_script  # first: it quiets bitsandbytes' import-time log line
from qlora_loop.eval.compare import main

if __name__ == "__main__":
    with as_script(quiet=True):  # one `error:` line and exit 2 for a bad flag, folder, file or metric
        main()
