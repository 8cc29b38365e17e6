"""How the scripts run: one `error:` line and a documented exit status for every error a user
can cause, never a traceback; with `quiet`, the libraries' loading bars and deprecation notices
are kept off the terminal (chat's conversation, merge's report).

Exit status: 0 done; 2 bad config, data, model, checkpoint, launch, flag or folder, a full or
read-only disk, or a batch that does not fit in memory; 3 non-finite loss; 75 stopped by SIGTERM/SIGINT after writing a checkpoint."""

from __future__ import annotations

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

from qlora_loop.config import ConfigError  # noqa: E402
from qlora_loop.data.rows import DataError  # noqa: E402
from qlora_loop.errors import ModelError  # noqa: E402
from qlora_loop.training.checkpoint import CheckpointError  # noqa: E402
from qlora_loop.training.disk import WRITE_ERRORS, DiskError, as_disk_error, is_disk_error  # noqa: E402
from qlora_loop.training.distributed import LaunchError  # noqa: E402
from qlora_loop.training.fit import Interrupted, NonFiniteError  # noqa: E402
from qlora_loop.training.memory import OutOfMemory  # noqa: E402
from qlora_loop.use.inference import InferenceError  # noqa: E402

USER_ERRORS = (ConfigError, DataError, ModelError, CheckpointError, LaunchError, OutOfMemory, InferenceError,
               DiskError, FileNotFoundError)


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
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except WRITE_ERRORS as e:  # a full or read-only disk anywhere a run writes (logs, curves, the summary)
        if not is_disk_error(e):
            raise
        print(f"error: {as_disk_error(e)}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(75)
