"""The `qlora-loop` command, and how every command runs: one `error:` line and a documented exit status
for every error a user can cause, never a traceback; with `quiet`, the libraries' loading bars and
deprecation notices are kept off the terminal (chat's conversation, merge's report).

`qlora-loop COMMAND ...` runs the same main(argv) as scripts/COMMAND.py (inspect: scripts/inspect_data.py,
export: scripts/export_gguf.py).

Exit status: 0 done; otherwise the error's, as qlora_loop/errors.py lists them (2 a user's error,
3 non-finite loss, 75 stopped by a signal after writing a checkpoint)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import warnings

# bitsandbytes logs on import, on CPUs with AVX512-BF16, that an optional kernel is not installed, and
# the `kernels` package it asks for that kernel logs that offline it skips the hub's trust check;
# stderr is kept for the one `error:` line. Set before anything imports bitsandbytes.
for library in ("bitsandbytes", "kernels"):
    logging.getLogger(library).setLevel(logging.ERROR)

from transformers.utils import logging as hf_logging  # noqa: E402

from qlora_loop.errors import exit_line  # noqa: E402
from qlora_loop.training.disk import WRITE_ERRORS, as_disk_error, is_disk_error  # noqa: E402


# Library notices that ask nothing of a user: the libraries' deprecations of each other's APIs (peft and
# transformers on gradient checkpointing, ...), and bitsandbytes' note that paged optimizers page only on
# a GPU (the README says so). Warnings about the user's model, data or settings still show.
LIBRARIES = r"(transformers|peft|accelerate|bitsandbytes|torch|safetensors|datasets)(\.|$)"
NOTICES = [dict(category=FutureWarning, module=LIBRARIES), dict(category=DeprecationWarning, module=LIBRARIES),
           dict(message="Paged optimizers are not supported on CPU", category=UserWarning)]


@contextlib.contextmanager
def as_script(*, quiet: bool = False):
    """Run a script's main: each error a user can cause becomes one line on stderr and its exit status."""
    for notice in NOTICES:
        warnings.filterwarnings("ignore", **notice)
    if quiet:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        yield
    except Exception as e:  # exit_line tells a user's error from a bug, which keeps its traceback
        if isinstance(e, WRITE_ERRORS) and is_disk_error(e):  # a full or read-only disk anywhere a run writes
            e = as_disk_error(e)
        ending = exit_line(e)
        if ending is None:
            raise
        line, status = ending
        print(line, file=sys.stderr)
        sys.exit(status)


# command -> (quiet, what it does); each runs the main(argv) that command_main imports
COMMANDS = {
    "train": (False, "train an adapter: --config FILE [key.path=value ...] [--overwrite] [--dry-run]"),
    "chat": (True, "chat with a trained adapter: --adapter OUTPUT_DIR/best [--prompt ...]"),
    "eval": (True, "score an adapter beside its base: --adapter OUTPUT_DIR/best [--data FILE] [--tasks ...]"),
    "merge": (True, "merge an adapter into its bf16 base, with a fidelity report"),
    "export": (True, "export adapter + base as one GGUF file with an Ollama Modelfile"),
    "inspect": (False, "look at the training data as the model will see it"),
    "plot": (False, "draw OUTPUT_DIR/curves.png from a run's logs"),
}


def main(argv: list[str] | None = None):
    """`qlora-loop COMMAND [ARGS ...]`; `qlora-loop COMMAND --help` for a command's flags."""
    parser = argparse.ArgumentParser(
        prog="qlora-loop", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="QLoRA fine-tuning on a hand-written loop. `qlora-loop COMMAND --help` for a command's flags.",
        epilog="commands:\n" + "\n".join(f"  {name:<9}{what}" for name, (_, what) in COMMANDS.items()))
    parser.add_argument("command", choices=COMMANDS, metavar="{" + ",".join(COMMANDS) + "}")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's own arguments")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    quiet, _ = COMMANDS[args.command]
    with as_script(quiet=quiet):
        return command_main(args.command)(args.args)


def command_main(command: str):
    """The main(argv) that scripts/COMMAND.py runs, imported only for its command (each loads its own libraries)."""
    if command == "train":
        from qlora_loop.run import main
    elif command == "chat":
        from qlora_loop.use.chat import main
    elif command == "eval":
        from qlora_loop.eval.compare import main
    elif command == "merge":
        from qlora_loop.use.merge import main
    elif command == "export":
        from qlora_loop.use.export import main
    elif command == "inspect":
        from qlora_loop.data.inspector import main
    else:
        from qlora_loop.observe.plot import main
    return main
