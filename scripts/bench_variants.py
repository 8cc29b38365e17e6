# python scripts/bench_variants.py --epochs 1
"""LoRA's variants (DoRA, rsLoRA, gaussian / LoftQ / PiSSA / EVA init, LoRA+, NEFTune) on the embedded
default against plain LoRA: step time and held-out loss (qlora_loop.bench.variants says what is measured)."""

from qlora_loop.cli import as_script  # first: it quiets bitsandbytes' import-time log line
from qlora_loop.bench.variants import main

if __name__ == "__main__":
    with as_script():
        main()
