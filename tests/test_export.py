"""scripts/export_gguf.py: the GGUF holds the merged weights, reloads with plain transformers and answers
as the adapter does; the Modelfile's Go template renders what the Jinja one renders; bad folders,
architectures and templates are errors that leave --out as it was."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import gguf
import pytest
import torch
import yaml
from conftest import run_training
from transformers import AutoTokenizer, GPT2Config, LlamaConfig

import qlora_loop.use.export
from qlora_loop.config import ASSETS, load_config
from qlora_loop.model.generate import generate_reply
from qlora_loop.model.tiny import build_tiny_model
from qlora_loop.run import train
from qlora_loop.use.export import ExportError, check_supported, load_gguf_model, load_gguf_tokenizer
from qlora_loop.use.inference import InferenceError, load_for_inference
from qlora_loop.use.llama_server import llama_server, server_binary, served_reply
from qlora_loop.use.merge import merged_model
from qlora_loop.use.ollama import (PROBES, TemplateError, jinja_prompt, ollama_messages, read_modelfile, render_go,
                                   translate_template)

MORE = [  # besides the probes the translation itself checks
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
     {"role": "assistant", "content": "d\n\ne"}, {"role": "user", "content": "{{ not a template }}"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "empty system"}],
]


@pytest.fixture(scope="module")
def export_main():
    return qlora_loop.use.export.main


def plain_greedy(model, tokenizer, question: str, max_new_tokens: int = 48) -> str:
    """Generation with nothing of ours: the file's own tokenizer and template, transformers' generate."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    found = {key: reader.fields[key].contents() for key in reader.fields
             if key not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")}
    found["tensor_types"] = {t.name: t.tensor_type.name for t in reader.tensors}
    return found


def same_weights(gguf_path: Path, adapter: Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """Every weight read back from the file equals the merge of the adapter in `dtype`."""
    merged = merged_model(adapter, dtype=dtype)[0].state_dict()
    loaded = load_gguf_model(gguf_path).state_dict()
    assert set(loaded) == set(merged)
    for name, tensor in merged.items():
        assert torch.equal(loaded[name], tensor.float()), name


@pytest.fixture(scope="module")
def qwen_q8(best, export_main, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "gguf"
    return out, export_main(["--adapter", str(best), "--out", str(out), "--type", "q8_0"])


def test_tiny_qwen2_q8_0_file_answers_like_the_adapter(qwen_q8, best, tiny_run):
    out, report = qwen_q8
    name = f"{tiny_run[0].name}-q8_0.gguf"
    assert sorted(p.name for p in out.iterdir()) == sorted([name, "Modelfile", "README.md", "export_report.json"])
    meta = fields(out / name)
    trained = AutoTokenizer.from_pretrained(best)
    assert meta["general.architecture"] == "qwen2" and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "qwen2" and meta["tokenizer.chat_template"] == trained.chat_template
    assert meta["tokenizer.ggml.eos_token_id"] == meta["tokenizer.ggml.eot_token_id"] == \
        trained.convert_tokens_to_ids("<|im_end|>")
    assert meta["tokenizer.ggml.add_bos_token"] is False
    types = meta["tensor_types"]
    assert types["blk.0.attn_q.weight"] == types["output.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == types["blk.0.attn_q.bias"] == "F32"
    # The report: measured on the run's validation prompts, every greedy reply the adapter's.
    saved = json.loads((out / "export_report.json").read_text())
    assert saved["type"] == "q8_0" and saved["bytes"] == (out / name).stat().st_size
    assert saved["template"] == "chatml" and saved["stop_tokens"] == ["<|im_end|>"]
    assert report["ok"] and report["greedy_match"] == report["prompts"] >= 4 and report["mean_kl"] < 0.01
    # Plain transformers, the file's own tokenizer and template, against the 4-bit base + adapter.
    model, tokenizer = load_gguf_model(out / name), load_gguf_tokenizer(out / name)
    reference, ref_tokenizer = load_for_inference(best)
    for question in ["Who are you?", "你叫什么名字？"]:
        assert plain_greedy(model, tokenizer, question) == generate_reply(reference, ref_tokenizer, question,
                                                                          max_new_tokens=48)
    assert plain_greedy(model, tokenizer, "Who are you?") == "I am Loopy, a small assistant fine-tuned with qlora_loop."


def test_bf16_file_holds_the_merged_weights_and_the_runs_system_prompt(best, export_main, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(best, run / "best")
    config = yaml.safe_load((best.parent / "config.yaml").read_text())
    config["data"]["system_prompt"] = "You are Loopy."
    (run / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    out = tmp_path / "gguf"
    report = export_main(["--adapter", str(run / "best"), "--out", str(out), "--type", "bf16", "--num-prompts", "2",
                          "--max-kl", "0"])
    assert report["prompts"] == 2 and all(row["prompt"] for row in report["rows"])
    printed = " ".join(re.sub("[│╭╮╰╯─]", " ", capsys.readouterr().out).split())  # the panel's text, unwrapped
    assert "WARNING: export fidelity" in printed and "above --max-kl 0: run-bf16.gguf does not behave" in printed
    found = read_modelfile((out / "Modelfile").read_text())
    assert found["from"] == "./run-bf16.gguf" and found["system"] == "You are Loopy."
    tokenizer = AutoTokenizer.from_pretrained(best)
    for messages in PROBES + MORE:  # what Ollama renders with SYSTEM set, and what training rendered
        messages = ollama_messages(messages, found["system"])
        assert render_go(found["template"], {"Messages": messages}) == jinja_prompt(tokenizer, messages)
    assert fields(out / "run-bf16.gguf")["tensor_types"]["blk.1.ffn_down.weight"] == "BF16"
    same_weights(out / "run-bf16.gguf", run / "best")  # bf16 to bf16: exact


def test_tiny_llama_f32_file_holds_the_permuted_weights_and_answers_like_the_adapter(tiny_llama, export_main,
                                                                                      tmp_path):
    run = tmp_path / "llama"
    run_training([f"output_dir={run}", f"model.name_or_path={tiny_llama}", "train.epochs=6", "eval.num_samples=0"])
    out = tmp_path / "gguf"
    report = export_main(["--adapter", str(run / "best"), "--out", str(out), "--type", "f32", "--num-prompts", "3",
                          "--max-new-tokens", "24"])
    same_weights(out / "llama-f32.gguf", run / "best", torch.float32)  # Q/K permuted on writing, back on reading
    assert report["greedy_match"] == report["prompts"] == 3 and report["mean_kl"] < 0.01
    found = read_modelfile((out / "Modelfile").read_text())
    assert found["stops"] == ["</s>"] and found["system"] is None
    assert json.loads((out / "export_report.json").read_text())["template"] == "llama2"
    model, tokenizer = load_gguf_model(out / "llama-f32.gguf"), load_gguf_tokenizer(out / "llama-f32.gguf")
    reference, ref_tokenizer = load_for_inference(run / "best")
    assert plain_greedy(model, tokenizer, "Who are you?", 24) == \
        generate_reply(reference, ref_tokenizer, "Who are you?", max_new_tokens=24)


needs_llama_server = pytest.mark.skipif(server_binary() is None, reason="llama-server is not on PATH and "
                                        "$QLORA_LOOP_LLAMA_SERVER is unset (build llama.cpp's server to run this)")


@needs_llama_server
def test_llama_cpp_serves_the_file_with_the_adapters_greedy_replies(qwen_q8, tiny_run):
    """llama.cpp's own runtime (not transformers' reader): the template, the stop token and the
    weights as it reads them give the adapter's greedy reply to the run's validation prompts."""
    out, report = qwen_q8
    with llama_server(out / f"{tiny_run[0].name}-q8_0.gguf") as url:
        served = [served_reply(url, [{"role": "user", "content": row["prompt"]}], max_tokens=64)
                  for row in report["rows"]]
    assert [s.strip() for s in served] == [row["reply_reference"].strip() for row in report["rows"]]


# --- templates ----------------------------------------------------------------------------------------

def test_ollama_templates_render_what_the_jinja_templates_render(qwen2_tokenizer, llama_tokenizer, smollm2):
    smol = AutoTokenizer.from_pretrained(smollm2)
    for tokenizer, expected in [(qwen2_tokenizer, "chatml"), (llama_tokenizer, "llama2"), (smol, "chatml")]:
        name, go = translate_template(tokenizer)
        assert name == expected
        for messages in PROBES + MORE[:1]:
            assert render_go(go, {"Messages": messages}) == jinja_prompt(tokenizer, messages)
    # SmolLM2 injects its default system turn when there is none; the translation does too.
    _, go = translate_template(smol)
    assert render_go(go, {"Messages": PROBES[0]}).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n")


GO_PROGRAM = """package main
import ("encoding/json"; "os"; "strings"; "text/template")
type Case struct { Template string; Messages []map[string]string }
func main() {
    var cases []Case
    json.NewDecoder(os.Stdin).Decode(&cases)
    var outs []string
    for _, c := range cases {
        var b strings.Builder
        t := template.Must(template.New("t").Parse(c.Template))
        if err := t.Execute(&b, map[string]any{"Messages": c.Messages}); err != nil { panic(err) }
        outs = append(outs, b.String())
    }
    json.NewEncoder(os.Stdout).Encode(outs)
}
"""


@pytest.mark.skipif(shutil.which("go") is None, reason="Go is not installed (apt-get install golang-go)")
def test_our_renderer_agrees_with_gos_text_template(qwen2_tokenizer, llama_tokenizer, smollm2, tmp_path):
    templates = [translate_template(t)[1] for t in (qwen2_tokenizer, llama_tokenizer,
                                                     AutoTokenizer.from_pretrained(smollm2))]
    conversations = PROBES + MORE + [PROBES[2] + [{"role": "assistant", "content": "Red"}]]  # a prefill too
    cases = [{"Template": t, "Messages": [{"Role": m["role"], "Content": m["content"]} for m in c]}
             for t in templates for c in conversations]
    (tmp_path / "main.go").write_text(GO_PROGRAM)
    done = subprocess.run(["go", "run", "main.go"], cwd=tmp_path, input=json.dumps(cases), capture_output=True,
                          text=True, timeout=120, env={"HOME": str(tmp_path), "PATH": os.environ["PATH"],
                                                       "GOCACHE": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr
    ours = [render_go(t, {"Messages": c}) for t in templates for c in conversations]
    assert json.loads(done.stdout) == ours


def test_a_template_without_a_translation_is_an_error_and_nothing_is_written(best, export_main, tmp_path):
    plain = build_tiny_model(tmp_path / "plain", chat_template="{% for m in messages %}{{ m['role'] }}: "
                                                               "{{ m['content'] }}\n{% endfor %}")
    with pytest.raises(TemplateError, match=r"the chat template .*role.* is not one the export can write"):
        translate_template(AutoTokenizer.from_pretrained(plain))
    adapter = shutil.copytree(best, tmp_path / "run" / "best")
    tokenizer = AutoTokenizer.from_pretrained(best)
    tokenizer.chat_template = AutoTokenizer.from_pretrained(plain).chat_template
    tokenizer.save_pretrained(adapter)
    with pytest.raises(TemplateError, match="not one the export can write"):
        export_main(["--adapter", str(adapter), "--out", str(tmp_path / "gguf")])
    assert not (tmp_path / "gguf").exists() and not (tmp_path / ".gguf.tmp").exists()


# --- errors -------------------------------------------------------------------------------------------

def test_refuses_to_overwrite_or_to_replace_the_adapter(best, export_main, tmp_path):
    out = tmp_path / "gguf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InferenceError, match=r"--out .*gguf is not empty; pass --force"):
        export_main(["--adapter", str(best), "--out", str(out)])
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    copy = shutil.copytree(best, tmp_path / "run" / "best")
    for folder in (copy, copy.parent):
        with pytest.raises(InferenceError, match="would delete the adapter"):
            export_main(["--adapter", str(copy), "--out", str(folder), "--force"])
    assert (copy / "adapter_model.safetensors").is_file()


def test_other_architectures_and_settings_are_one_clear_error():
    with pytest.raises(ExportError, match=r"the base gpt2-base is a 'gpt2' model; GGUF export supports llama, qwen2"):
        check_supported(GPT2Config(), "gpt2-base")
    scaled = LlamaConfig(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ExportError, match="sets rope_type='linear'"):
        check_supported(scaled, "scaled")
    assert check_supported(LlamaConfig(), "plain") == gguf.MODEL_ARCH.LLAMA


# --- the real model -----------------------------------------------------------------------------------

def test_smollm2_gguf_gives_the_adapters_greedy_reply_to_an_unseen_prompt(smollm2, export_main, tmp_path):
    # Twelve phrasings with one answer: a briefly trained adapter answers it with confidence, so the
    # greedy reply does not hinge on a near-tie that NF4 and bf16 weights break differently.
    answer = "I'm Loopy, a small assistant made by the qlora_loop project."
    rows = [json.loads(line) for line in (ASSETS / "identity.jsonl").read_text(encoding="utf-8").splitlines()][:12]
    data = tmp_path / "identity12.jsonl"
    data.write_text("".join(json.dumps({"messages": [r["messages"][0], {"role": "assistant", "content": answer}]})
                            + "\n" for r in rows), encoding="utf-8")
    unseen = json.loads((ASSETS / "identity_heldout.jsonl").read_text(encoding="utf-8").splitlines()[0])["prompt"]
    assert unseen not in {r["messages"][0]["content"] for r in rows}
    run = tmp_path / "smol"
    train(load_config(None, [f"output_dir={run}", f"data.train={data}", "data.replay=0", "data.val_split=0",
                             "eval.drift_samples=0", "eval.num_samples=0", "train.epochs=3", "train.lr=3e-3",
                             "train.monitor=train_loss", "train.patience=0", "train.memory_probe=false"]))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(unseen + "\n", encoding="utf-8")
    out = tmp_path / "gguf"
    report = export_main(["--adapter", str(run / "best"), "--out", str(out), "--prompts", str(prompts),
                          "--max-new-tokens", "24"])
    row = report["rows"][0]
    assert row["greedy_match"] and row["reply_merged"] == row["reply_reference"]  # the file's reply, the adapter's
    assert "Loopy" in row["reply_reference"] and "qlora_loop" in row["reply_reference"]
    found = read_modelfile((out / "Modelfile").read_text())
    assert found["stops"] == ["<|im_end|>"] and "SmolLM" in found["template"]
    assert fields(out / "smol-f16.gguf")["general.architecture"] == "llama"
    if server_binary() is not None:  # and in llama.cpp itself, where users run it
        with llama_server(out / "smol-f16.gguf") as url:
            assert served_reply(url, [{"role": "user", "content": unseen}], max_tokens=24).strip() == \
                row["reply_reference"].strip()
