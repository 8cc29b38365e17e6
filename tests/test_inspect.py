"""scripts/inspect_data.py on a known sample: the printed statistics are the sample's numbers.

Run: python -m pytest tests/test_inspect.py -q
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import qlora_loop.data.inspector
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
ROWS = [
    {"instruction": "Who are you?", "output": "I am Loopy."},
    {"instruction": "Where do you come from?", "output": "From the qlora_loop project."},
    {"instruction": "Say hi.", "output": "Hi!"},
    {"instruction": "Tell me a long story.", "output": "Once upon a time " * 30},  # truncated at max_length
    {"instruction": "你好", "output": "你好！"},
]


@pytest.fixture(scope="module")
def script():
    return qlora_loop.data.inspector


@pytest.fixture
def config(tmp_path, tiny_qwen2):
    train = tmp_path / "train.jsonl"
    lines = [json.dumps(row, ensure_ascii=False) for row in ROWS]
    lines.insert(2, '{"instruction": "broken"')  # line 3: invalid JSON, skipped and counted
    train.write_text("\n".join(lines) + "\n", encoding="utf-8")
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps({"instruction": "Who made you?", "output": "The qlora_loop project."}) + "\n")
    path = tmp_path / "config.yaml"
    path.write_text(f"model:\n  name_or_path: {tiny_qwen2}\ndata:\n  train: {train}\n  val: {val}\n"
                    "  max_length: 48\n  on_error: skip\n  max_skip_fraction: 0.5\ntrain:\n  batch_size: 5\n",
                    encoding="utf-8")
    return path


def run(script, argv) -> tuple[dict, str]:
    console = Console(record=True, width=200, highlight=False)
    numbers = script.main(argv, console=console)
    return numbers, console.export_text()


def test_statistics_of_a_known_sample(script, config, qwen2_tokenizer):
    numbers, out = run(script, ["--config", str(config), "--n", "2"])
    assert "rows read        train 6  val 1" in out
    assert "dropped          train 1 (1 invalid_json)  val 0" in out
    assert "truncated        train 1  val 0  (at data.max_length=48)" in out
    assert "examples         train 5  val 1" in out

    # Lengths, independently: the ChatML rendering of each row, cut at max_length.
    def chat(row, answer=True):
        messages = [{"role": "user", "content": row["instruction"]}]
        messages += [{"role": "assistant", "content": row["output"]}] if answer else []
        return qwen2_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False,
                                                   add_generation_prompt=not answer)

    lengths = [min(48, len(chat(row))) for row in ROWS]
    assert sorted(lengths) == [15, 19, 20, 25, 48] and sum(lengths) == 127
    assert "tokens per row   p50 20  p90 48  p99 48  max 48  min 15  mean 25.4  (train)" in out
    # One batch of all five rows at batch_size=5: padding is 5 x 48 positions minus the 127 tokens.
    assert "padding          113 of 240 positions (47.1%) at train.batch_size=5" in out
    # Trained: each answer and its <|im_end|>; the truncated one from its first token to max_length.
    answers = [len(qwen2_tokenizer(row["output"] + "<|im_end|>", add_special_tokens=False)["input_ids"])
               for row in ROWS if len(chat(row)) <= 48]
    cut = 48 - len(chat(ROWS[3], answer=False))
    assert sum(answers) + cut == numbers["trained_tokens"] == 48
    assert "trained tokens   48 of 127 (37.8%)" in out
    assert "label-mask audit: 5 of 5 train rows checked, all pass" in out


def test_padding_is_counted_in_the_batches_training_makes(script, config):
    # Lengths 48, 25, 20, 19, 15 (see above). Grouped by length (the default), batches of 2 are
    # [48, 25], [20, 19] and [15]: 23 + 1 + 0 padding of 151 positions, whatever the shuffle.
    _, out = run(script, ["--config", str(config), "--n", "0", "train.batch_size=2"])
    assert "padding          24 of 151 positions (15.9%) at train.batch_size=2" in out
    numbers, _ = run(script, ["--config", str(config), "--n", "0", "train.batch_size=2", "data.group_by_length=false"])
    assert numbers["padding"] != 24  # the setting reaches the loader: the seeded shuffle pairs rows otherwise
    _, out = run(script, ["--config", str(config), "--n", "0", "train.batch_size=2", "data.packing=true"])
    assert "padding          0 of 127 positions (0.0%) at train.batch_size=2 (data.packing=true)" in out


def test_samples_are_rendered_with_trained_tokens_highlighted(script, config):
    console = Console(record=True, width=200, highlight=False, color_system="truecolor", force_terminal=True)
    script.main(["--config", str(config), "--n", "2"], console=console)
    text = console.export_text(styles=False, clear=False)
    assert f"{config.parent / 'train.jsonl'}:1" in text and f"{config.parent / 'train.jsonl'}:2" in text
    assert f"{config.parent / 'train.jsonl'}:4" not in text  # --n 2
    html = console.export_html(inline_styles=True)
    trained = re.findall(r'<span style="[^"]*background-color: #00d700[^"]*">([^<]*)</span>', html)
    assert trained == ["I am Loopy.&lt;|im_end|&gt;", "From the qlora_loop project.&lt;|im_end|&gt;"]


def test_first_line_is_the_command(script):
    first = (ROOT / "scripts" / "inspect_data.py").read_text().splitlines()[0]
    assert first == "# python scripts/inspect_data.py --config FILE [--n 5]"


def test_a_broken_template_shows_in_the_audit_verdict(script, tmp_path, tiny_llama):
    template = tmp_path / "pairs.jinja"  # renders each question with its answer: the prompt gets trained
    template.write_text("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ bos_token + '[INST] ' + "
                        "messages[loop.index0 - 1]['content'] + ' [/INST] ' + m['content'] + ' ' + eos_token }}"
                        "{% endif %}{% endfor %}", encoding="utf-8")
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in ROWS[:2]), encoding="utf-8")
    numbers, out = run(script, [f"model.name_or_path={tiny_llama}", f"data.chat_template={template}",
                                f"data.train={train}", "data.val_split=0", "train.monitor=train_loss", "--n", "0"])
    assert numbers["audit_problems"] == [f"{train}:1: user text ('Who are you?') is trained; only assistant turns "
                                         "and their end-of-turn token may be",
                                         f"{train}:2: user text ('Where do you come from?') is trained; only "
                                         "assistant turns and their end-of-turn token may be"]
    assert "label-mask audit: 2 problem(s) in 2 of 2 train rows:" in out


def test_a_second_start_reads_the_first_starts_tokenized_cache(script, tmp_path, tiny_qwen2, monkeypatch):
    """The command path end to end: what one start writes under the cache folder, the next start of
    the same command reads back (each source says so) and adds nothing."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    sources = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in ROWS), encoding="utf-8")
        sources.append(str(path))
    argv = ["--n", "0", f"model.name_or_path={tiny_qwen2}", f"data.train=[{','.join(sources)}]",
            "data.max_length=256"]
    _, first = run(script, argv)
    entries = sorted(p.name for p in (tmp_path / "cache" / "qlora_loop" / "data").iterdir())
    _, second = run(script, argv)
    assert len(entries) == 2 and "(tokenized cache)" not in first
    assert second.count("(tokenized cache)") == 2
    assert sorted(p.name for p in (tmp_path / "cache" / "qlora_loop" / "data").iterdir()) == entries


def test_pairs_are_shown_chosen_then_rejected_and_both_audited(script, tmp_path, tiny_qwen2):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Who are you?", "chosen": "I am Loopy.", "rejected": "An AI."}) + "\n"
                     + json.dumps({"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Hello there."}) + "\n",
                     encoding="utf-8")
    console = Console(record=True, width=200, highlight=False, color_system="truecolor", force_terminal=True)
    numbers = script.main([f"model.name_or_path={tiny_qwen2}", f"data.train={pairs}", "data.val_split=0",
                           "train.objective=dpo", "train.monitor=train_loss", "--n", "1"], console=console)
    text = console.export_text(styles=False, clear=False)
    assert f"{pairs}:1" in text and "chosen" in text and "rejected" in text
    html = console.export_html(inline_styles=True)
    trained = re.findall(r'<span style="[^"]*background-color: #00d700[^"]*">([^<]*)</span>', html)
    assert trained == ["I am Loopy.&lt;|im_end|&gt;", "An AI.&lt;|im_end|&gt;"]
    assert numbers["audit_problems"] == [] and "label-mask audit: 4 of 4 train rows checked, all pass" in text
