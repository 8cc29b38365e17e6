"""The scripts' harness: each error a user can cause is one line and an exit status; library
notices that ask nothing of a user are kept off the terminal, real warnings are not."""

from __future__ import annotations

import configparser
import errno
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from qlora_loop.cli import COMMANDS, as_script, command_main, main
from qlora_loop.data import inspector
from qlora_loop.errors import ConfigError, DataError, Interrupted, NonFiniteError, exit_line
from qlora_loop.eval import compare
from qlora_loop.observe import plot
from qlora_loop.use import chat, export, merge

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("number, name, says", [
    (errno.ENOSPC, "run/curves.png", r"cannot write {}: No space left on device \(.* free there\)"),
    (errno.EROFS, "run", r"cannot write {}: Read-only file system;"),
])
def test_a_script_turns_a_disk_error_anywhere_into_one_line_and_exit_2(number, name, says, capsys, tmp_path):
    path = tmp_path / name
    with pytest.raises(SystemExit) as exited, as_script():
        raise OSError(number, os.strerror(number), str(path))
    assert exited.value.code == 2
    assert re.fullmatch("error: " + says.format(re.escape(str(path))) + ".*\n", capsys.readouterr().err)


@pytest.mark.parametrize("error, line, status", [
    (ConfigError("train.lr=-1 must be > 0"), "error: train.lr=-1 must be > 0", 2),
    (DataError("d.jsonl:3: missing field 'output'", "missing_field"), "error: d.jsonl:3: missing field 'output'", 2),
    (NonFiniteError("non-finite loss (nan) at step 3", [0, 1]), "error: non-finite loss (nan) at step 3", 3),
    (Interrupted("stopped by a signal after step 4"), "interrupted: stopped by a signal after step 4", 75),
])
def test_errors_py_gives_each_error_its_line_and_status(error, line, status, capsys):
    assert exit_line(error) == (line, status)
    with pytest.raises(SystemExit) as exited, as_script():
        raise error
    assert exited.value.code == status and capsys.readouterr().err == line + "\n"


def test_a_bug_keeps_its_traceback():
    assert exit_line(KeyError("x")) is None
    with pytest.raises(KeyError), as_script():
        raise KeyError("x")


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


def test_qlora_loop_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    assert shown.startswith("usage: qlora-loop")
    assert all(re.search(rf"^  {name} +\S", shown, re.M) for name in ["train", "chat", "eval", "merge", "export", "inspect",
                                                                       "plot"])


def test_each_command_runs_its_scripts_main():
    from qlora_loop import run
    assert {name: command_main(name) for name in COMMANDS} == {
        "train": run.main, "chat": chat.main, "eval": compare.main, "merge": merge.main, "export": export.main, "inspect": inspector.main,
        "plot": plot.main}
    scripts = {"train": "train.py", "chat": "chat.py", "eval": "eval.py", "merge": "merge.py", "export": "export_gguf.py",
               "inspect": "inspect_data.py", "plot": "plot.py"}
    for name, script in scripts.items():  # the script imports that very main
        module = command_main(name).__module__
        assert f"from {module} import main" in (ROOT / "scripts" / script).read_text(encoding="utf-8"), script


def test_a_command_maps_errors_to_exit_status_as_its_script_does(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["plot", str(tmp_path / "no-run")])
    assert exited.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'no-run'}")


def test_the_console_script_is_declared():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    assert setup["options.entry_points"]["console_scripts"].strip() == "qlora-loop = qlora_loop.cli:main"


def test_a_script_runs_from_the_checkout_on_this_checkouts_package(tmp_path):
    where = subprocess.run([sys.executable, "-c", "import qlora_loop; print(qlora_loop.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True)
    assert Path(where.stdout.strip()).resolve() == ROOT / "qlora_loop" / "__init__.py", \
        "the installed qlora_loop is another copy: run `pip install -e .` in this checkout"
    done = subprocess.run([sys.executable, "scripts/train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("usage: train.py"), done.stderr[-2000:]


def test_the_package_face_is_cheap():
    code = ("import sys, qlora_loop; assert 'torch' not in sys.modules, 'import qlora_loop loaded torch'; "
            "from qlora_loop import load_config, train; from qlora_loop.run import train as run_train; "
            "from qlora_loop.config import load_config as config_load; "
            "assert (train, load_config) == (run_train, config_load)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

