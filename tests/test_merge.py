"""scripts/merge.py: the merged folder is a plain transformers model, and the fidelity report's
numbers are measured (they move when the two models differ)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import peft_model, tiny_config
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import qlora_loop.use.merge
from qlora_loop.config import ASSETS, DataConfig
from qlora_loop.data.batches import collate
from qlora_loop.data.cache import cache_root
from qlora_loop.data.examples import IGNORE
from qlora_loop.data.mixtures import build_datasets, held_out_conversations
from qlora_loop.model.generate import encode_chat, generate_reply
from qlora_loop.model.load import load_tokenizer
from qlora_loop.training.checkpoint import save_adapter
from qlora_loop.training.optim import build_optimizer, build_scheduler
from qlora_loop.training.step import StepRunner
from qlora_loop.use.inference import InferenceError, attach_adapter, load_for_inference, locate_base, validation_prompts
from qlora_loop.use.merge import fidelity_report, merge_adapter, merged_model, report_prompts, trained_weights

ANSWER = "I am Loopy, a small assistant fine-tuned with qlora_loop."


@pytest.fixture(scope="module")
def merge_main():
    return qlora_loop.use.merge.main


@pytest.fixture(scope="module")
def held_out(best) -> list[dict]:
    """The default run's validation examples, built as scripts/train.py builds them."""
    cfg = tiny_config()
    _, val, _ = build_datasets(load_tokenizer(str(best)), cfg.data, seed=cfg.train.seed)
    return val


@pytest.fixture(scope="module")
def merged(best, merge_main, tmp_path_factory):
    out = tmp_path_factory.mktemp("merge") / "model"
    return out, merge_main(["--adapter", str(best), "--out", str(out)])


def plain_greedy(model, tokenizer, question: str, max_new_tokens: int = 64) -> str:
    """Generation with nothing of ours: the chat template, transformers' generate, decode."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_merged_folder_is_a_plain_bf16_model_without_adapter_weights(merged, tiny_run):
    out, _ = merged
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "merge_report.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    tensors = load_file(out / "model.safetensors")
    assert not [k for k in tensors if "lora" in k] and {t.dtype for t in tensors.values()} == {torch.bfloat16}
    base = load_file(Path(json.loads((tiny_run[0] / "best" / "adapter_config.json").read_text())
                          ["base_model_name_or_path"]) / "model.safetensors")
    assert set(tensors) == set(base)
    # The update went into the adapted projections, and only there.
    assert not torch.equal(tensors["model.layers.0.self_attn.q_proj.weight"],
                           base["model.layers.0.self_attn.q_proj.weight"].bfloat16())
    assert torch.equal(tensors["model.embed_tokens.weight"], base["model.embed_tokens.weight"].bfloat16())
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [tokenizer.eos_token_id]


def test_merged_model_answers_like_the_adapter_where_top1_agrees(merged, best, held_out):
    out, report = merged
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, nothing of ours
    tokenizer = AutoTokenizer.from_pretrained(out)
    reference, ref_tokenizer = load_for_inference(best)
    assert report["prompts"] == min(8, len({prompt_ids(row) for row in held_out}))  # --num-prompts 8 of the default's validation questions
    for row in report["rows"]:  # the report's replies are the models' real greedy replies
        merged_reply = plain_greedy(model, tokenizer, row["prompt"])
        adapter_reply = generate_reply(reference, ref_tokenizer, row["prompt"], max_new_tokens=64)
        assert (merged_reply, adapter_reply) == (row["reply_merged"], row["reply_reference"])
        if row["top1_agreement"] == 1.0:  # same argmax along the whole reply: the same reply
            assert merged_reply == adapter_reply and row["greedy_match"]
    assert any(row["top1_agreement"] == 1.0 for row in report["rows"])
    assert plain_greedy(model, tokenizer, "Who are you?") == ANSWER


def test_report_is_written_and_says_the_merge_is_faithful(merged, best):
    out, report = merged
    saved = json.loads((out / "merge_report.json").read_text())
    assert saved["adapter"] == str(best) and saved["dtype"] == "bfloat16" and "validation rows" in saved["prompts_from"]
    for key in ("prompts", "positions", "mean_kl", "max_kl", "top1_agreement", "greedy_match", "ok", "rows"):
        assert saved[key] == report[key]
    # NF4 and bf16 bases differ a little, so the KL is small but not zero (about 5e-4 nats on the default run).
    assert 0 < report["mean_kl"] < 0.01 and report["mean_kl"] <= report["max_kl"] < 0.1
    # A near-tie can flip one argmax (0.976 agreement on the default run: one reply's first token);
    # a broken merge agrees on few (see the corrupted adapter below).
    assert report["ok"] and report["top1_agreement"] > 0.9
    assert report["greedy_match"] >= sum(row["top1_agreement"] == 1.0 for row in report["rows"]) >= 1
    assert report["positions"] == sum(row["positions"] for row in report["rows"])
    prompts, references, _ = report_prompts(best)  # the run's validation rows (next test)
    assert [(row["prompt"], row["reference_answer"]) for row in report["rows"]] == \
        [(messages[-1]["content"], answer) for messages, answer in zip(prompts, references)]


def prompt_ids(example: dict) -> tuple[int, ...]:
    """The tokens before the first trained one: the question a validation prompt asks."""
    return tuple(example["input_ids"][:next(i for i, label in enumerate(example["labels"]) if label != IGNORE)])


def first_turns_match(tokenizer, prompts, references, examples) -> int:
    """Check each prompt renders to its example's tokens before the first trained one, and each
    reference is the example's first trained turn; returns how many examples train later turns too.
    An example whose prompt an earlier one already asked is not among the prompts (asked once)."""
    firsts = {}
    for example in examples:
        firsts.setdefault(prompt_ids(example), example)
    examples = list(firsts.values())
    assert len(prompts) == len(examples)
    multi_turn = 0
    for messages, answer, example in zip(prompts, references, examples):
        labels = example["labels"]
        first = next(i for i, label in enumerate(labels) if label != IGNORE)
        end = next((i for i in range(first, len(labels)) if labels[i] == IGNORE), len(labels))
        assert encode_chat(tokenizer, messages)[0].tolist() == example["input_ids"][:first]
        assert tokenizer.decode(labels[first:end], skip_special_tokens=True) == answer
        multi_turn += any(label != IGNORE for label in labels[end:])
    return multi_turn


def test_report_prompts_are_the_runs_validation_rows(best, held_out):
    tokenizer = load_tokenizer(str(best))
    prompts, references, _ = report_prompts(best, n=100)
    # The default's held-out rows include conversations of several rounds: the reference is the first answer.
    assert first_turns_match(tokenizer, prompts, references, held_out) >= 1


def test_validation_prompts_skip_bad_rows_as_training_does(qwen2_tokenizer, tmp_path):
    lines = (ASSETS / "self_cognition.jsonl").read_text(encoding="utf-8").splitlines()[:20]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines[:3] + ["{not json"] + lines[3:]) + "\n", encoding="utf-8")
    run = {"data": {"train": str(path), "val_split": 0.25, "on_error": "skip"}, "train": {"seed": 3}}
    prompts, references, source = validation_prompts(run, n=100)
    _, val, _ = build_datasets(qwen2_tokenizer, DataConfig(train=str(path), val_split=0.25, max_length=512,
                                                           on_error="skip"), seed=3)
    assert len(val) == 5 and source == f"{path} (validation rows)"
    first_turns_match(qwen2_tokenizer, prompts, references, val)


def test_validation_prompts_with_the_runs_tokenizer_come_from_its_cache_without_the_rows_it_dropped(
        qwen2_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    lines = (ASSETS / "self_cognition.jsonl").read_text(encoding="utf-8").splitlines()[:20]
    long = json.dumps({"messages": [{"role": "user", "content": "why " * 400}, {"role": "assistant", "content": "ok"}]})
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join([long] * 4 + lines) + "\n", encoding="utf-8")  # too long for max_length 128: dropped
    data = {"train": str(path), "val_split": 0.5, "on_error": "skip", "max_length": 128, "max_skip_fraction": 0.5}
    _, val, _ = build_datasets(qwen2_tokenizer, DataConfig(train=str(path), val_split=0.5, max_length=128,
                                                           on_error="skip",
                                                           max_skip_fraction=0.5), seed=3, cache=cache_root())
    assert list((tmp_path / "cache" / "qlora_loop" / "data").iterdir())  # the run wrote its cache entry
    rows, _ = held_out_conversations(data, 3, qwen2_tokenizer)
    assert [row.where for row in rows] == [e["where"] for e in val]  # the very rows the run validated on
    unkeyed, _ = held_out_conversations(data, 3)  # no tokenizer: read again, without the drops it cannot know
    assert len(unkeyed) > len(rows) and any("why why" in row.messages[0]["content"] for row in unkeyed)
    prompts, _, _ = validation_prompts({"data": data, "train": {"seed": 3}}, n=100, tokenizer=qwen2_tokenizer)
    assert prompts and not any("why why" in p[-1]["content"] for p in prompts)


def test_a_corrupted_adapter_gives_a_large_kl(merged, best, tmp_path):
    out, good = merged
    bad = tmp_path / "best"
    shutil.copytree(best, bad)
    tensors = load_file(bad / "adapter_model.safetensors")
    save_file({k: t * 50 if "lora_B" in k else t for k, t in tensors.items()}, bad / "adapter_model.safetensors")
    prompts, references, _ = report_prompts(best, n=3)
    # 4-bit base + corrupted adapter against the merge of the good one.
    report = fidelity_report(bad, out, prompts, references=references, max_new_tokens=16)
    assert report["mean_kl"] > 1.0 > 1000 * good["mean_kl"]
    assert report["top1_agreement"] < 0.5 and report["greedy_match"] == 0 and not report["ok"]


def test_refuses_to_overwrite_then_force_replaces_and_warns(best, merge_main, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InferenceError, match=r"--out .*merged is not empty; pass --force"):
        merge_main(["--adapter", str(best), "--out", str(out)])
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    copy = shutil.copytree(best, tmp_path / "run" / "best")
    for folder in (copy, copy.parent):  # --force never deletes the adapter being merged
        with pytest.raises(InferenceError, match="would delete the adapter"):
            merge_main(["--adapter", str(copy), "--out", str(folder), "--force"])
    assert (copy / "adapter_model.safetensors").is_file()

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Who are you?\n", encoding="utf-8")
    report = merge_main(["--adapter", str(best), "--out", str(out), "--force", "--prompts", str(prompts),
                         "--max-kl", "0", "--max-new-tokens", "20"])
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert not (tmp_path / ".merged.old").exists() and not (tmp_path / ".merged.tmp").exists()
    assert [row["prompt"] for row in report["rows"]] == ["Who are you?"] and report["rows"][0]["greedy_match"]
    assert not report["ok"] and report["max_kl_threshold"] == 0  # any KL is above 0
    printed = " ".join(re.sub("[│╭╮╰╯─]", " ", capsys.readouterr().out).split())  # the panel's text, unwrapped
    assert "WARNING: merge fidelity" in printed and "above --max-kl 0: the merged model does not behave" in printed
    assert json.loads((out / "merge_report.json").read_text())["prompts_from"] == str(prompts)


def test_missing_adapter_is_an_error_before_any_work(merge_main, tmp_path):
    with pytest.raises(InferenceError, match="no such folder"):
        merge_main(["--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_cut_short_adapter_file_is_an_error_before_any_work(best, merge_main, tmp_path):
    moved = tmp_path / "best"
    shutil.copytree(best, moved)
    weights = moved / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(InferenceError, match=rf"^{weights} is damaged"):
        merge_main(["--adapter", str(moved), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_adalora_adapter_merges(tiny_qwen2, qwen2_tokenizer, tmp_path):
    accelerator = Accelerator(mixed_precision="no")
    train, _, _ = build_datasets(qwen2_tokenizer, DataConfig(train=str(tiny_config().data.train), val_split=0.0,
                                                             max_length=64))
    batches = [collate(train[i:i + 2], qwen2_tokenizer.pad_token_id) for i in range(0, 12, 2)]
    model = peft_model(tiny_qwen2, "adalora", r=2, init_r=4, total_steps=6, tinit=0.1, tfinal=0.2, dropout=0.0)
    optimizer = build_optimizer(model, lr=2e-2)
    runner = StepRunner(model, optimizer, build_scheduler(optimizer, "constant", 6, 0.0), accelerator)
    for batch in batches:
        runner([batch])
    save_adapter(accelerator, model, qwen2_tokenizer, tmp_path / "best")
    pattern = json.loads((tmp_path / "best" / "adapter_config.json").read_text())["rank_pattern"]
    assert sum(map(sum, pattern.values())) == 2 * len(pattern)  # the budget shrank from 4 to 2 per module

    merge_adapter(tmp_path / "best", tmp_path / "merged")
    prompts, references, source = report_prompts(tmp_path / "best")  # no run config: built-in questions
    assert "built-in" in source
    report = fidelity_report(tmp_path / "best", tmp_path / "merged", prompts, references=references, max_new_tokens=16)
    assert report["ok"] and report["mean_kl"] < 0.01
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    for row in report["rows"]:
        if row["top1_agreement"] == 1.0:
            assert plain_greedy(plain, tokenizer, row["prompt"], 16) == row["reply_reference"]
    # Each module's update is in the merged weights, as far as the final rank pattern kept any of it
    # (6 steps at lr 2e-2 move the weights well past bf16 rounding).
    merged_weights = plain.state_dict()
    base = {name: w.to(torch.bfloat16) for name, w in trained_weights(locate_base(tmp_path / "best"))[0].items()}
    kept = {key.removesuffix(".lora_E") + ".weight": sum(mask) for key, mask in pattern.items()}
    assert any(kept.values())
    for name, rank in kept.items():
        assert torch.equal(merged_weights[name], base[name]) == (rank == 0), name


# --- which weights the adapter is merged into ---------------------------------------------------

def trained_adapter(path, folder, tokenizer, seed: int = 0):
    """An adapter on the real 4-bit base whose update is far from zero (random B), saved as a run saves it,
    beside a run config that computes in float32 (bfloat16 matmuls would round far above float rounding)."""
    (folder.parent / "config.yaml").write_text("model:\n  compute_dtype: float32\n", encoding="utf-8")
    model = peft_model(path, r=4, dropout=0.0, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    save_adapter(Accelerator(mixed_precision="no"), model, tokenizer, folder)
    return folder


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_llama"])
def test_merged_into_the_trained_weights_is_base_plus_adapter(request, fixture, tmp_path):
    """Merged in float32 into the dequantized NF4 weights, the plain model computes what 4-bit base +
    adapter computes, to float rounding; merged into the original weights it does not."""
    path = request.getfixturevalue(fixture)
    adapter = trained_adapter(path, tmp_path / "best", load_tokenizer(str(path)))
    reference, tokenizer = load_for_inference(adapter, as_trained=True)
    ids = tokenizer("Who are you? Tell me about the qlora_loop project.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = reference(input_ids=ids).logits.float()
        trained = merged_model(adapter, dtype=torch.float32)[0](input_ids=ids).logits
        original = merged_model(adapter, dtype=torch.float32, weights="original")[0](input_ids=ids).logits
    scale = want.abs().max().item()
    assert (trained - want).abs().max().item() < 1e-4 * scale
    assert (original - want).abs().max().item() > 100 * (trained - want).abs().max().item()


def test_original_weights_are_todays_merge_and_the_report_names_the_weights(merge_main, best, tmp_path):
    """--weights original is the base's own weights + the update, exactly; --weights best measures
    both, keeps the closer (the trained weights) and says so in the report and the README."""
    found = locate_base(best)
    plain = AutoModelForCausalLM.from_pretrained(found.name, dtype=torch.bfloat16)
    expected = attach_adapter(plain, best, found).merge_and_unload(safe_merge=True).state_dict()
    original = merge_main(["--adapter", str(best), "--out", str(tmp_path / "original"), "--weights", "original",
                           "--num-prompts", "2", "--max-new-tokens", "12"])
    written = load_file(tmp_path / "original" / "model.safetensors")
    assert all(torch.equal(written[name], expected[name]) for name in written)
    assert original["weights"] == "original" and "original weights" in original["weights_detail"]
    assert "original weights" in (tmp_path / "original" / "README.md").read_text()

    chosen = merge_main(["--adapter", str(best), "--out", str(tmp_path / "best-of"), "--weights", "best",
                         "--num-prompts", "2", "--max-new-tokens", "12"])
    saved = json.loads((tmp_path / "best-of" / "merge_report.json").read_text())
    candidates = saved["by_weights"]
    assert candidates["trained"]["mean_kl"] < candidates["original"]["mean_kl"] == \
        pytest.approx(original["mean_kl"], rel=1e-3)
    assert saved["weights"] == chosen["weights"] == "trained" and "NF4 dequantized" in saved["weights_detail"]
    assert "trained against" in (tmp_path / "best-of" / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best-of", "original"]  # no candidate left behind
