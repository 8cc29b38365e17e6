# python scripts/bench_dpo.py --epochs 1 --repeats 2
"""Our DPO against TRL's DPOTrainer + peft on the same 4-bit SmolLM2 and pairs, with our SFT on the chosen
answers as the memory baseline (qlora_loop.bench.preference says what is measured and how). Needs trl
(pip install -e ".[trl]")."""

from qlora_loop.cli import as_script  # first: it quiets bitsandbytes' import-time log line
from qlora_loop.bench.preference import main

if __name__ == "__main__":
    with as_script():
        main()
