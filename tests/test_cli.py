"""The scripts' harness: each error a user can cause is one line and an exit status; library
notices that ask nothing of a user are kept off the terminal, real warnings are not."""

from __future__ import annotations

import errno
import os
import re
import warnings

import pytest

from qlora_loop.cli import as_script


@pytest.mark.parametrize("error, says", [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/run/curves.png"),
     r"cannot write /data/run/curves\.png: No space left on device \(.* free there\)"),
    (OSError(errno.EROFS, os.strerror(errno.EROFS), "/data/run"), r"cannot write /data/run: Read-only file system;"),
])
def test_a_script_turns_a_disk_error_anywhere_into_one_line_and_exit_2(error, says, capsys):
    with pytest.raises(SystemExit) as exited, as_script():
        raise error
    assert exited.value.code == 2
    assert re.fullmatch(f"error: {says}.*\n", capsys.readouterr().err)


def test_a_script_lets_other_os_errors_through():
    with pytest.raises(ConnectionResetError), as_script():
        raise ConnectionResetError(errno.ECONNRESET, "reset")


def test_library_deprecation_notices_are_dropped_and_real_warnings_kept():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with as_script():
            warnings.warn_explicit("`is_gradient_checkpointing` is deprecated", FutureWarning, "modeling_utils.py", 1,
                                   module="transformers.modeling_utils")
            warnings.warn_explicit("Paged optimizers are not supported on CPU. Falling back to non-paged optimizer "
                                   "behavior.", UserWarning, "optimizer.py", 1, module="bitsandbytes.optim.optimizer")
            warnings.warn_explicit("the tokenizer has no pad token", UserWarning, "model.py", 1,
                                   module="qlora_loop.model.load")
            warnings.warn_explicit("`foo` is deprecated", FutureWarning, "mine.py", 1, module="my_project.mine")
    assert [str(w.message) for w in seen] == ["the tokenizer has no pad token", "`foo` is deprecated"]
