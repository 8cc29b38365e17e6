"""The 4-bit base, target discovery, adapters, and the model's errors."""

from __future__ import annotations

import re

import bitsandbytes as bnb
import pytest
import torch
from conftest import peft_model
from peft import LoraConfig

from qlora_loop.config import AdapterConfig, DataConfig
from qlora_loop.data.batches import check_packing
from qlora_loop.errors import ModelError
from qlora_loop.model.adapter import add_adapter, find_linear4bit_targets, trainable_parameters
from qlora_loop.model.builtin import resolve_model_path
from qlora_loop.model.load import load_base_model, load_tokenizer
from qlora_loop.model.tiny import build_tiny_model

PROJECTIONS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_llama"])
def test_base_is_nf4_double_quant_and_prepared(request, fixture):
    model = load_base_model(str(request.getfixturevalue(fixture)), torch.device("cpu"), torch.bfloat16)
    linear4bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4bit) == 14  # 7 projections x 2 layers; lm_head stays unquantised
    state = linear4bit[0].weight.quant_state
    assert state.quant_type == "nf4" and state.nested  # nested = double quantisation
    assert linear4bit[0].compute_dtype == torch.bfloat16
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    assert model.config.use_cache is False and model.is_gradient_checkpointing
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_llama"])
def test_targets_are_every_linear4bit_but_lm_head(request, fixture):
    model = load_base_model(str(request.getfixturevalue(fixture)), torch.device("cpu"))
    assert find_linear4bit_targets(model) == PROJECTIONS
    adapted = add_adapter(model, AdapterConfig(kind="lora", r=4))
    wrapped = {n.split(".")[-1] for n, m in adapted.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(PROJECTIONS)
    assert all("lora_" in n for n, p in adapted.named_parameters() if p.requires_grad)


def test_explicit_targets_override_auto(tiny_qwen2):
    model = peft_model(tiny_qwen2, r=4, target_modules=["q_proj", "v_proj"])
    wrapped = {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"q_proj", "v_proj"}
    trainable, total = trainable_parameters(model)
    assert trainable == 2 * 2 * 4 * (128 + 128) - 2 * 4 * (128 - 64)  # v_proj's out is 2 kv heads x 32 = 64


def test_extra_peft_options_pass_through(tiny_qwen2):
    model = peft_model(tiny_qwen2, r=4, extra={"use_rslora": True, "use_dora": True})
    config = model.peft_config["default"]
    assert isinstance(config, LoraConfig) and config.use_rslora and config.use_dora
    assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())


def test_bad_adapter_options_name_the_key(tiny_qwen2):
    with pytest.raises(ModelError, match="adapter.extra: .*no_such_option"):
        peft_model(tiny_qwen2, r=4, extra={"no_such_option": 1})
    with pytest.raises(ModelError, match="adapter.target_modules"):
        peft_model(tiny_qwen2, r=4, target_modules=["nonexistent_proj"])
    with pytest.raises(ModelError, match="too few to shrink ranks"):
        peft_model(tiny_qwen2, "adalora", r=4, total_steps=10, tinit=0.6, tfinal=0.5)  # from a notebook


def test_missing_model_and_template_errors(tmp_path, tiny_qwen2):
    with pytest.raises(ModelError, match="model.name_or_path=.*nowhere.: no such folder"):
        load_tokenizer(str(tmp_path / "nowhere"))
    bare = build_tiny_model(tmp_path / "bare", chat_template="")  # a tokenizer with no template
    with pytest.raises(ModelError, match="no chat template; set data.chat_template"):
        load_tokenizer(str(bare))
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}")
    assert load_tokenizer(str(bare), chat_template=str(template)).chat_template == template.read_text()


def test_builtin_models_are_built_once_and_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = resolve_model_path("builtin:tiny-qwen2")
    assert resolve_model_path("builtin:tiny-qwen2") == path and path.startswith(str(tmp_path / "cache"))
    again = build_tiny_model(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json"):
        assert (again / name).read_bytes() == (tmp_path / "cache" / "qlora_loop" / path.split("/")[-1] / name).read_bytes()
    assert resolve_model_path("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
    with pytest.raises(ValueError, match="unknown builtin model"):
        resolve_model_path("builtin:nope")


def test_device_map_names_a_gpu_by_index_even_when_accelerate_gives_none(monkeypatch):
    from qlora_loop.model.load import device_index
    assert device_index(torch.device("cpu")) == "cpu" and device_index(torch.device("cuda", 1)) == 1
    # one process: Accelerate's device is torch.device("cuda"), index None, which from_pretrained rejects
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert device_index(torch.device("cuda")) == 3


def test_under_bf16_autocast_weights_and_residual_stream_stay_bf16_and_it_trains(tiny_qwen2, qwen2_tokenizer):
    """A GPU run trains under bf16 autocast: the frozen embeddings, lm_head and norms are then kept in
    bf16 (half the memory of peft's float32 up-cast), every layer's hidden state stays bf16 (a float32
    norm would make it float32), and steps train as the float32 preparation does.
    Checked here with CPU autocast, which takes the same path."""
    from accelerate import Accelerator

    from qlora_loop.config import ASSETS
    from qlora_loop.data.batches import collate
    from qlora_loop.data.mixtures import build_datasets
    from qlora_loop.training.loss import default_loss
    from qlora_loop.training.optim import build_optimizer, build_scheduler
    from qlora_loop.training.step import StepRunner

    plain = load_base_model(str(tiny_qwen2), torch.device("cpu"), torch.bfloat16)
    kept = load_base_model(str(tiny_qwen2), torch.device("cpu"), torch.bfloat16, autocast=True)
    assert plain.lm_head.weight.dtype == plain.model.embed_tokens.weight.dtype == torch.float32
    assert kept.lm_head.weight.dtype == kept.model.embed_tokens.weight.dtype == torch.bfloat16
    assert kept.model.norm.weight.dtype == kept.model.layers[0].input_layernorm.weight.dtype == torch.bfloat16
    rows, _, _ = build_datasets(qwen2_tokenizer, DataConfig(train=str(ASSETS / "self_cognition.jsonl"), val_split=0.0,
                                                            max_length=128))
    batch = collate(rows[:4], qwen2_tokenizer.pad_token_id)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = kept(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      output_hidden_states=True).hidden_states
        plain_hidden = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             output_hidden_states=True).hidden_states
    assert {h.dtype for h in hidden} == {torch.bfloat16}
    assert {h.dtype for h in plain_hidden[1:]} == {torch.float32}  # float32 norms: a float32 stream
    losses = {}
    for name, base, autocast in (("plain", plain, False), ("kept", kept, True)):
        torch.manual_seed(0)
        model = add_adapter(base, AdapterConfig(kind="lora", r=4, dropout=0.0))
        optimizer = build_optimizer(model, "paged_adamw_32bit", 1e-2)
        loss_fn = default_loss(model)

        def forward_under_autocast(model, batch, loss_fn=loss_fn, enabled=autocast):
            # What Accelerator(mixed_precision="bf16") wraps each forward in (one Accelerator per process,
            # so it is done by hand here); entered per forward, as its weight-cast cache must be.
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                return loss_fn(model, batch)

        runner = StepRunner(model, optimizer, build_scheduler(optimizer, "constant", 5, 0.0),
                            Accelerator(mixed_precision="no"), loss_fn=forward_under_autocast)
        losses[name] = [runner([batch]).loss for _ in range(3)]
    assert losses["kept"] == pytest.approx(losses["plain"], rel=0.02)  # bf16 logits: close, not equal
    assert losses["kept"][-1] < losses["kept"][0]  # it trains


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_llama"])
def test_preparation_is_peft_kbit_preparation_but_nothing_is_up_cast_under_bf16_autocast(request, fixture):
    """load_base_model prepares the base as peft's prepare_model_for_kbit_training does (every weight
    frozen, 16-bit ones beside the 4-bit ones in float32, checkpointing on), except under autocast:
    in bf16 nothing is up-cast (so no moment holds the embeddings twice, and the residual stream stays
    bf16); in float16 the norms and biases are, the embeddings and head not."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    path = str(request.getfixturevalue(fixture))
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    reference = prepare_model_for_kbit_training(AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quantization, device_map={"": "cpu"}, dtype=torch.bfloat16))
    expected = {name: (p.dtype, p.requires_grad) for name, p in reference.named_parameters()}
    ours = load_base_model(path, torch.device("cpu"), torch.bfloat16)
    assert {name: (p.dtype, p.requires_grad) for name, p in ours.named_parameters()} == expected
    assert ours.is_gradient_checkpointing
    up_cast = {name for name, (dtype, _) in expected.items() if dtype == torch.float32}
    head = {n for n in expected if "embed_tokens" in n or "lm_head" in n}
    assert head < up_cast  # peft up-casts norms, biases, embeddings and head
    for dtype, stays in ((torch.bfloat16, up_cast), (torch.float16, head)):  # float16: norms up-cast still
        kept = {name: (p.dtype, p.requires_grad)
                for name, p in load_base_model(path, torch.device("cpu"), dtype, autocast=True).named_parameters()}
        assert {name for name in expected if kept[name][0] != expected[name][0]} == stays
        assert all(kept[name] == (dtype, False) for name in stays)


def test_training_after_an_evaluation_computes_what_it_did_before(tiny_qwen2, qwen2_tokenizer):
    """An eval-mode forward without grad (fit's evaluate) must not change how the 4-bit layers train:
    on CPUs with AVX512-BF16 bitsandbytes would repack them for inference, after which Qwen2's biased
    q/k/v projections fail in training and the numbers differ."""
    from qlora_loop.config import ASSETS
    from qlora_loop.data.batches import collate
    from qlora_loop.data.mixtures import build_datasets
    from qlora_loop.training.loss import causal_lm_loss

    rows, _, _ = build_datasets(qwen2_tokenizer, DataConfig(train=str(ASSETS / "self_cognition.jsonl"), val_split=0.0,
                                                            max_length=128))
    batch = collate(rows[:4], qwen2_tokenizer.pad_token_id)
    model = peft_model(tiny_qwen2, r=4, dropout=0.0)
    before = causal_lm_loss(model, batch).sum()
    model.eval()
    with torch.no_grad():
        causal_lm_loss(model, batch)
    model.train()
    after = causal_lm_loss(model, batch).sum()
    after.backward()
    assert after.item() == before.item()


class MixesPackedRows(torch.nn.Module):
    """Stands in for remote model code that builds its own causal mask over the whole sequence, so
    packed rows see each other: with position_ids restarting (RoPE as in the model) or ignored."""

    def __init__(self, model, keeps_positions: bool):
        super().__init__()
        self.model, self.keeps_positions = model, keeps_positions

    def forward(self, input_ids, position_ids=None, attention_mask=None, **kwargs):
        positions = {"position_ids": position_ids} if self.keeps_positions else {}
        return self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **positions, **kwargs)


class TakesNoPositions(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_llama"])
def test_packing_check_passes_native_models_and_refuses_one_whose_rows_would_mix(request, fixture):
    from qlora_loop.config import ASSETS
    from qlora_loop.data.mixtures import build_datasets
    path = request.getfixturevalue(fixture)
    train, _, _ = build_datasets(load_tokenizer(str(path)), DataConfig(train=str(ASSETS / "self_cognition.jsonl"),
                                                                       val_split=0.0, max_length=256))
    model = peft_model(path, r=4)
    with torch.no_grad():  # a trained-looking adapter, not B = 0
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    model.train()
    assert check_packing(model, train) < 0.01  # bf16 compute on CPU: 1e-3 (Qwen2), 4e-7 (Llama)
    assert model.training  # left as it was
    assert check_packing(model, train[:1]) is None  # one row: nothing to pack
    from qlora_loop.data.batches import collate_packed
    rows = [{**e, "input_ids": e["input_ids"][:24], "labels": e["labels"][:24]} for e in train[:2]]
    model.eval()
    with torch.no_grad():  # the check's control really mixes the rows: joined, the second sees the first
        joined = model(input_ids=collate_packed(rows)["input_ids"]).logits[0]
        apart = torch.cat([model(input_ids=torch.tensor([r["input_ids"]])).logits[0] for r in rows])
    assert (joined - apart).abs().max() > 0.1 * apart.abs().max()
    model.train()
    for keeps_positions in (True, False):
        with pytest.raises(ModelError, match=r"data.packing=true: this model's attention does not keep packed rows "
                                             r"apart .*set data.packing=false"):
            check_packing(MixesPackedRows(model, keeps_positions), train)
    with pytest.raises(ModelError, match=r"data.packing=true: this model's forward cannot be given packed rows .*"
                                         r"position_ids"):
        check_packing(TakesNoPositions(model), train)


def test_a_missing_folder_a_folder_without_config_and_a_missing_template_file_are_model_errors(tmp_path, tiny_qwen2):
    import shutil

    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelError, match=re.escape(f"model.name_or_path={missing!r}: no such folder")):
        load_tokenizer(missing)
    with pytest.raises(ModelError, match=r"data.chat_template=missing.jinja: no such file"):
        load_tokenizer(str(tiny_qwen2), chat_template="missing.jinja")
    bare = tmp_path / "no-config"
    shutil.copytree(tiny_qwen2, bare)
    (bare / "config.json").unlink()
    with pytest.raises(ModelError, match=r"model.name_or_path='.*no-config': cannot load the model"):
        load_base_model(str(bare), torch.device("cpu"))
