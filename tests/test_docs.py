"""The README's promises: its two set-up commands, CI running the test one, every key documented,
every script and config opening with the command that runs it."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from qlora_loop.config import Config, key_paths, to_dict

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def setup_commands() -> list[str]:
    quick_start = README.split("## Quick start")[1].split("\n## ")[0]
    return re.findall(r"```bash\n(.+?)\n```", quick_start)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    train, test = setup_commands()
    assert train.endswith("accelerate launch scripts/train.py") and "pip install" in train
    assert test.endswith("python -m pytest -q") and ".[test]" in test
    assert test in (ROOT / ".ci" / "run").read_text()


def test_every_config_key_is_in_the_reference():
    reference = README.split("## Config reference")[1]
    missing = [key for key in key_paths() if f"| `{key}` |" not in reference]
    assert not missing


def test_scripts_and_configs_start_with_their_command():
    for path in [*ROOT.glob("scripts/*.py"), *ROOT.glob("configs/*.yaml")]:
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("# ") and str(path.relative_to(ROOT)) in first, path


def test_reference_defaults_are_the_dataclass_defaults():
    """Defaults live in config/sections.py; the README's default column must say the same (where it shows a value)."""
    reference, defaults = README.split("## Config reference")[1], to_dict(Config())
    wrong = {}
    for key in key_paths():
        row = next(line for line in reference.splitlines() if line.startswith(f"| `{key}` |"))
        shown = row.split("|")[2].strip()
        if not (shown.startswith("`") and shown.endswith("`")):
            continue  # described in words, e.g. "bundled self-cognition set"
        value = defaults
        for part in key.split("."):
            value = value[part]
        parsed = yaml.safe_load(shown.strip("`"))
        if (float(parsed) if isinstance(value, float) else parsed) != value:
            wrong[key] = (shown, value)
    assert not wrong
