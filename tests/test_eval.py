"""Judging a fine-tune by what it answers: the metrics on hand-made replies, eval.metrics in a run's
history and as its monitor, and `qlora-loop eval` (the adapter beside its base, lm-evaluation-harness
tasks) on the tiny demo through the real 4-bit path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu

from conftest import ROOT, tiny_config

from qlora_loop.config import ASSETS, ConfigError
from qlora_loop.eval.compare import main as eval_main
from qlora_loop.eval.during import reference_prompts
from qlora_loop.eval.metrics import bleu, check_metrics, chrf, exact_match, rouge_l, row_scores, score
from qlora_loop.model.generate import generate_replies
from qlora_loop.observe.trackers import epoch_metrics
from qlora_loop.use.inference import load_for_inference


# --- the metrics, on replies written by hand ------------------------------------------------------

def test_exact_match_compares_stripped_strings_and_nothing_else():
    assert exact_match("q", "  Paris\n", {"reference": "Paris "}) == 1.0
    assert exact_match("q", "paris", {"reference": "Paris"}) == 0.0  # case counts
    assert exact_match("q", "Paris.", {"reference": "Paris"}) == 0.0  # so does punctuation
    assert exact_match("q", "New  York", {"reference": "New York"}) == 0.0  # and inner spaces


def test_rouge_l_is_the_f1_of_the_longest_common_subsequence_in_any_script():
    # 5 of 6 words in order on each side: precision = recall = 5/6
    assert rouge_l("q", "the cat sat on a mat", {"reference": "The cat sat on the mat"}) == pytest.approx(5 / 6)
    assert rouge_l("q", "the mat", {"reference": "the cat sat on the mat"}) == pytest.approx(2 * (1 * 2 / 6) / (1 + 2 / 6))
    # each CJK character is a word: 我爱 in common, 2 of 4 each side
    assert rouge_l("q", "我爱北京", {"reference": "我爱上海"}) == pytest.approx(0.5)
    assert rouge_l("q", "Привет мир", {"reference": "привет, мир!"}) == 1.0
    assert rouge_l("q", "", {"reference": "anything"}) == 0.0


def test_chrf_and_bleu_are_sacrebleus_own_scores_over_100():
    hyp, ref = "the cat is on the mat", "there is a cat on the mat"
    assert chrf("q", hyp, {"reference": ref}) == pytest.approx(sacrebleu.sentence_chrf(hyp, [ref]).score / 100)
    assert chrf("q", ref, {"reference": ref}) == 1.0
    completions, references = ["the cat is on the mat", "a dog barks"], ["there is a cat on the mat", "a dog barks"]
    assert bleu(completions, references) == pytest.approx(sacrebleu.corpus_bleu(completions, [references]).score / 100)
    assert bleu(["a b c d"], ["w x y z"]) == 0.0 and bleu(["a b c d e"], ["a b c d e"]) == pytest.approx(1.0)
    # a Chinese reference is split by sacrebleu's zh tokenizer; 13a would see one word and score 0
    assert bleu(["我爱北京天安门广场"], ["我爱北京天安门"]) > 0.5


def test_a_set_scores_row_metrics_as_their_mean_and_bleu_over_the_corpus():
    completions, references = ["Paris", "the cat sat on a mat"], ["Paris", "the cat sat on the mat"]
    scores = score(["exact_match", "rouge_l", "bleu"], ["q1", "q2"], completions, references)
    assert list(scores) == ["exact_match", "rouge_l", "bleu"]
    assert scores["exact_match"] == 0.5
    assert scores["rouge_l"] == pytest.approx((1 + 5 / 6) / 2)
    assert scores["bleu"] == pytest.approx(bleu(completions, references))
    assert row_scores(["exact_match", "bleu"], ["q1", "q2"], completions, references) == [
        {"exact_match": 1.0}, {"exact_match": 0.0}]  # BLEU has no per-row value


def test_an_unknown_or_repeated_metric_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"eval.metrics: unknown metric 'rouge'; did you mean rouge_l\?"):
        check_metrics(["exact_match", "rouge"])
    with pytest.raises(ConfigError, match="names a metric twice"):
        check_metrics(["bleu", "bleu"])


def test_the_reference_is_each_rows_last_trained_assistant_turn():
    rows = [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                          {"role": "assistant", "content": "A"}, {"role": "user", "content": "b"},
                          {"role": "assistant", "content": "B"}, {"role": "user", "content": "c"},
                          {"role": "assistant", "content": "C", "train": False}]}]
    prompts, references = reference_prompts(rows)
    assert references == ["B"]
    assert prompts == [[{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                        {"role": "assistant", "content": "A"}, {"role": "user", "content": "b"}]]


# --- config ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, says", [
    (["train.monitor=rouge_l"], "neither val_loss, train_loss nor a metric of eval.metrics=[]"),
    (["eval.metrics=[rouge_l]", "train.monitor=rouge_l"], "is a score, higher is better: set train.mode=max"),
    (["eval.metrics=[rouge_l]", "data.val_split=0", "train.monitor=train_loss"], "scores replies to validation rows"),
    (["eval.metrics=rouge_l"], "eval.metrics must be a list of strings"),
    (["eval.metrics=[rouge_l]", "eval.metrics_rows=0"], "eval.metrics_rows=0 must be > 0"),
])
def test_a_monitor_or_metrics_setting_that_cannot_work_is_refused_at_load(overrides, says):
    with pytest.raises(ConfigError, match=says.replace("[", r"\[").replace("]", r"\]")):
        tiny_config(*overrides)


def test_each_metric_goes_to_the_trackers_under_val():
    row = {"epoch": 2, "train_loss": 1.0, "tokens_per_second": 5.0, "val_loss": 0.5, "metrics": {"rouge_l": 0.25}}
    assert epoch_metrics(row)["val/rouge_l"] == 0.25


# --- eval.metrics in a run ------------------------------------------------------------------------

METRICS = ["exact_match", "rouge_l", "chrf", "bleu"]


@pytest.fixture(scope="module")
def metrics_run(tmp_path_factory, train_main) -> tuple[Path, dict]:
    """The tiny demo for 6 epochs with every metric, keeping the adapter of the best ROUGE-L."""
    out = tmp_path_factory.mktemp("metrics") / "out"
    summary = train_main([f"output_dir={out}", "train.epochs=6", "train.patience=0", f"eval.metrics=[{','.join(METRICS)}]",
                          "eval.metrics_max_new_tokens=48", "train.monitor=rouge_l", "train.mode=max"])
    return out, summary


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "history.jsonl").read_text(encoding="utf-8").splitlines()]


def test_every_metric_is_in_history_at_each_epoch_and_rises_as_the_model_learns(metrics_run):
    out, summary = metrics_run
    rows = history(out)
    assert len(rows) == 6
    for row in rows:
        assert all(0.0 <= row[m] <= 1.0 for m in METRICS)
    # from a random base: ROUGE-L 0.10 after epoch 1, 0.46-0.51 from epoch 2 when pinned
    assert rows[0]["rouge_l"] < 0.3 and max(r["rouge_l"] for r in rows[1:]) > rows[0]["rouge_l"] + 0.2
    assert max(r["exact_match"] for r in rows) > 0  # some validation answer reproduced word for word


def test_a_metric_as_monitor_keeps_the_adapter_of_its_best_evaluation(metrics_run):
    out, summary = metrics_run
    scores = [r["rouge_l"] for r in history(out)]
    assert summary["monitor"] == "rouge_l" and summary["best_metric"] == max(scores)
    assert summary["best_epoch"] == scores.index(max(scores)) + 1  # the first of equal scores


def test_eval_scores_the_best_adapter_as_the_run_did_and_the_base_through_disable_adapter(metrics_run, tmp_path):
    """qlora-loop eval on the run's own validation rows (its default) gives, for the adapter, the scores
    history recorded at the best epoch; its base replies are a separately loaded bare base's."""
    out, summary = metrics_run
    report = eval_main(["--adapter", str(out / "best"), "--max-new-tokens", "48", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "eval_report.json").read_text(encoding="utf-8")) == json.loads(json.dumps(report))
    best = history(out)[summary["best_epoch"] - 1]
    assert report["metrics"]["adapter"] == pytest.approx({m: best[m] for m in METRICS})
    assert report["metrics"]["adapter"]["rouge_l"] > report["metrics"]["base"]["rouge_l"] + 0.3
    rows = report["rows"]
    assert len(rows) == report["settings"]["rows"] == 6  # the run's validation rows
    base, tokenizer = load_for_inference(out / "best", no_adapter=True)
    prompts, references = reference_prompts([{"messages": r["messages"] + [{"role": "assistant", "content": "x"}]}
                                               for r in rows])
    assert [r["base"] for r in rows] == generate_replies(base, tokenizer, prompts, max_new_tokens=48)
    assert [r["reference"] for r in rows] != [r["base"] for r in rows]
    assert all(set(r["scores"]) == {"adapter", "base"} for r in rows)


def test_eval_takes_any_data_file_a_run_takes(best, tmp_path):
    """Rows with other field names, through --columns; --no-base scores the adapter alone."""
    lines = (ASSETS / "self_cognition.jsonl").read_text(encoding="utf-8").splitlines()[:3]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": m[0]["content"], "answer": m[1]["content"]}, ensure_ascii=False)
                            + "\n" for m in (json.loads(line)["messages"] for line in lines)), encoding="utf-8")
    report = eval_main(["--adapter", str(best), "--data", str(data), "--columns", "instruction=question,output=answer",
                        "--metrics", "exact_match", "--no-base", "--out", str(tmp_path / "out")])
    assert set(report["metrics"]) == {"adapter"} and len(report["rows"]) == 3
    assert report["rows"][0]["where"] == f"{data}:1"
    assert report["rows"][0]["reference"] == json.loads(lines[0])["messages"][1]["content"]
    # the tiny demo learned its set by heart (val loss 0.047 when pinned): the answers come back word for word
    assert report["metrics"]["adapter"]["exact_match"] >= 2 / 3


def run_eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/eval.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"}, timeout=300)


@pytest.mark.parametrize("make, args, says", [
    (None, ["--metrics", "exact_match", "rogue_l"], "--metrics: unknown metric 'rogue_l'; did you mean rouge_l?"),
    ('{"instruction": "What is 2+2?"}\n', [], "qa.jsonl:1: missing field 'output'"),
    ('{"messages": [{"role": "user", "content": "Hi"}]}\n', [], "qa.jsonl:1: the row has no assistant turn"),
])
def test_bad_input_is_one_error_line_and_exit_2(best, tmp_path, make, args, says):
    data = []
    if make is not None:
        (tmp_path / "qa.jsonl").write_text(make, encoding="utf-8")
        data = ["--data", str(tmp_path / "qa.jsonl")]
    done = run_eval("--adapter", str(best), *data, *args, "--out", str(tmp_path / "out"))
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], done.stderr[-2000:]
    if make is not None:
        assert "every row needs one" in lines[0]


def test_a_report_already_there_is_kept_unless_overwrite(best, tmp_path):
    (tmp_path / "eval_report.json").write_text("{}", encoding="utf-8")
    done = run_eval("--adapter", str(best), "--out", str(tmp_path))
    assert done.returncode == 2 and "pass --overwrite to replace it" in done.stderr
    assert (tmp_path / "eval_report.json").read_text(encoding="utf-8") == "{}"


# --- lm-evaluation-harness ------------------------------------------------------------------------

def test_tasks_without_lm_eval_installed_is_one_error_line(best, tmp_path, monkeypatch, capsys):
    from qlora_loop.cli import main as cli_main

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an environment without the extra imports
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)
    with pytest.raises(SystemExit) as stopped:
        cli_main(["eval", "--adapter", str(best), "--tasks", "hellaswag", "--out", str(tmp_path)])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: --tasks needs lm-evaluation-harness, which is not installed: "
                                               "pip install -e \".[harness]\" (or pip install lm-eval)")


TASK = """task: who_are_you
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  do_sample: false
  max_gen_toks: 48
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def test_a_local_lm_eval_task_scores_as_our_own_exact_match(best, tmp_path):
    """A task .yaml over a local file, offline: lm_eval's exact match of the adapter, and of the base
    with the adapter disabled, equal eval's own on the same rows rendered by the same chat template."""
    pytest.importorskip("lm_eval")  # the harness extra; the test extra installs it, so CI runs this
    lines = (ASSETS / "self_cognition.jsonl").read_text(encoding="utf-8").splitlines()[:8]
    data = tmp_path / "who.jsonl"
    data.write_text("".join(json.dumps({"question": m[0]["content"], "answer": m[1]["content"]}, ensure_ascii=False)
                            + "\n" for m in (json.loads(line)["messages"] for line in lines)), encoding="utf-8")
    (tmp_path / "who.yaml").write_text(TASK.format(data=data), encoding="utf-8")
    report = eval_main(["--adapter", str(best), "--data", str(data), "--columns", "instruction=question,output=answer",
                        "--metrics", "exact_match", "--max-new-tokens", "48", "--tasks", str(tmp_path / "who.yaml"),
                        "--apply-chat-template", "--out", str(tmp_path / "out")])
    harness = report["tasks"]["who_are_you"]["exact_match"]
    assert harness == {who: report["metrics"][who]["exact_match"] for who in ("adapter", "base")}
    assert harness["adapter"] >= 0.5 > harness["base"]


def test_a_task_whose_data_cannot_be_had_offline_is_one_error_line(best, tmp_path):
    pytest.importorskip("lm_eval")
    (tmp_path / "gone.yaml").write_text(TASK.format(data=tmp_path / "missing.jsonl").replace("who_are_you", "gone"),
                                        encoding="utf-8")
    done = run_eval("--adapter", str(best), "--tasks", str(tmp_path / "gone.yaml"), "--out", str(tmp_path / "out"))
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --tasks gone: the task data cannot be loaded"), lines
