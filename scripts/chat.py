# python scripts/chat.py --adapter OUTPUT_DIR/best [--prompt "..."]
"""Chat with a trained adapter on its 4-bit base (qlora_loop.use.chat; --help for the flags)."""

from qlora_loop.cli import as_script  # first: it quiets bitsandbytes' import-time log line
from qlora_loop.use.chat import main

if __name__ == "__main__":
    with as_script(quiet=True):  # one `error:` line and exit 2 for a bad flag, folder or file
        main()
