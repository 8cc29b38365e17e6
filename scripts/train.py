# accelerate launch scripts/train.py [--config configs/FILE.yaml] [key.path=value ...] [--overwrite] [--dry-run]
"""Train a QLoRA adapter (qlora_loop.run.main, as `qlora-loop train`; --help for the flags).

Exit status: 0 done; 2 bad config, data, model, launch, or a batch that does not fit in memory;
3 non-finite loss; 75 stopped by SIGTERM/SIGINT after writing a checkpoint (run the same command
with train.resume=auto to continue)."""

from qlora_loop.cli import as_script  # first: it quiets bitsandbytes' import-time log line
from qlora_loop.run import main

if __name__ == "__main__":
    with as_script():
        main()
