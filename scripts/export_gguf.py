# python scripts/export_gguf.py --adapter OUTPUT_DIR/best --out gguf/ [--type f16|bf16|q8_0|f32] [--force]
"""Export an adapter and its base as one GGUF file for llama.cpp and Ollama, with a Modelfile and a
fidelity report (qlora_loop.use.export; --help)."""

from qlora_loop.cli import as_script  # first: it quiets bitsandbytes' import-time log line
from qlora_loop.use.export import main

if __name__ == "__main__":
    with as_script(quiet=True):  # one `error:` line and exit 2 for a bad flag, folder, model or template
        main()
