"""Every error a user can cause, with the line it ends a command with and its exit status.

A command (cli.as_script) turns each into one line on stderr and its status, never a traceback;
anything else is a bug and keeps its traceback. Each message names the file and line, the key or
the flag, and the fix.

  2   bad config, data, model, checkpoint, launch, flag or folder; a full or read-only disk; a
      batch that does not fit in memory; a file that does not exist
  3   non-finite loss
  75  stopped by SIGTERM/SIGINT after writing a checkpoint
"""

from __future__ import annotations


class UserError(Exception):
    """Ends a command with `error: MESSAGE` and exit status 2."""
    status = 2
    prefix = "error"


class ConfigError(UserError, ValueError):
    """A config value is wrong; the message names the key, where it came from, and the fix."""


class DataError(UserError, ValueError):
    """Bad input data; the message names file:line (or the row), the field and the fix; `kind` groups the counts."""

    def __init__(self, message: str, kind: str = "invalid"):
        super().__init__(message)
        self.kind = kind


class ModelError(UserError, ValueError):
    """The model or tokenizer cannot be used as configured; the message says which key to change."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be written or resumed; the message names the path and what to do."""


class LaunchError(UserError, ValueError):
    """The launch (number of processes, FSDP or DeepSpeed config) does not fit the run's config."""


class OutOfMemory(UserError, RuntimeError):
    """The longest batch does not fit the memory budget; the message says what to change."""


class DiskError(UserError, OSError):
    """A write the disk refused: full, read-only, not permitted. The message names the path and the free space."""


class InferenceError(UserError, ValueError):
    """The adapter, its base or the prompts cannot be used; the message names the flag or folder and the fix."""


class RewardError(UserError, RuntimeError):
    """A GRPO reward function failed or returned what is not a score; the message names it and the row."""


class NonFiniteError(UserError, RuntimeError):
    """Training stopped on a non-finite loss or gradient norm; `sample_ids` are the step's examples."""
    status = 3

    def __init__(self, message: str, sample_ids: list[int]):
        super().__init__(message)
        self.sample_ids = sample_ids


class Interrupted(UserError, RuntimeError):
    """A SIGTERM/SIGINT stopped training after the current step; a checkpoint was written first."""
    status = 75
    prefix = "interrupted"


def exit_line(error: BaseException) -> tuple[str, int] | None:
    """(the line to print, the exit status) for an error a user can cause; None for a bug."""
    if isinstance(error, UserError):
        return f"{error.prefix}: {error}", error.status
    if isinstance(error, FileNotFoundError):  # a path given on the command line
        return f"error: {error}", 2
    return None


def not_utf8(path, data: bytes, error: UnicodeDecodeError, start: int = 0) -> str:
    """`path:LINE: not UTF-8 text (byte 0xe9 at offset N); re-save the file as UTF-8`, for `data`, the
    file's bytes, whose decoding from offset `start` failed with `error`."""
    at = start + error.start
    line = data[:at].count(b"\n") + 1
    return f"{path}:{line}: not UTF-8 text (byte 0x{data[at]:02x} at offset {at}); re-save the file as UTF-8"
