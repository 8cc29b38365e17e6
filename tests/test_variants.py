"""LoRA's variants on the real 4-bit path: DoRA, rsLoRA, the initialisations (gaussian, loftq, pissa,
eva), LoRA+ and NEFTune each train the tiny chat set, and each adapter reloads with plain peft on the
unmodified base and gives the run's validation loss; what each variant does, checked on its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from peft import PeftModel
from safetensors.torch import load_file

from conftest import CPU_DTYPE, peft_model, tiny_config

from qlora_loop.config import ConfigError, DataConfig, load_config
from qlora_loop.data.batches import build_dataloaders
from qlora_loop.data.mixtures import build_datasets
from qlora_loop.model.adapter import add_neftune
from qlora_loop.model.builtin import resolve_model_path
from qlora_loop.model.generate import generate_reply
from qlora_loop.model.init import SafetensorsWeights, dequantized, lora_layers
from qlora_loop.model.load import load_base_model, load_tokenizer
from qlora_loop.training.fit import evaluate
from qlora_loop.training.loss import chunked_lm_loss
from qlora_loop.training.optim import build_optimizer

VARIANTS = {
    "dora": ["adapter.use_dora=true"],
    "rslora": ["adapter.use_rslora=true"],
    "gaussian": ["adapter.init=gaussian"],
    "loftq": ["adapter.init=loftq"],
    "pissa": ["adapter.init=pissa"],
    "eva": ["adapter.init=eva"],
    "loraplus": ["train.loraplus_lr_ratio=4"],
    "neftune": ["train.neftune_alpha=1"],  # the tiny model's random embeddings are small (std 0.02): 5 drowns them
}


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("name", VARIANTS)
def test_each_variant_trains_and_reloads_with_plain_peft(name, train_main, tmp_path):
    """The tiny demo for 4 epochs with the variant: the loss falls, and the best adapter, loaded by
    plain peft onto the unmodified 4-bit base, gives the run's best validation loss (for NEFTune this
    also shows the evaluation saw no noise; for PiSSA, that the converted adapter is the trained one)."""
    out = tmp_path / "out"
    overrides = [f"output_dir={out}", "train.epochs=4", "train.patience=0", *VARIANTS[name]]
    summary = train_main(overrides)
    history = rows(out / "history.jsonl")
    assert history[-1]["val_loss"] < history[0]["val_loss"] - 0.5
    assert history[-1]["train_loss"] < history[0]["train_loss"] / 2

    cfg = tiny_config(*overrides)
    tokenizer = load_tokenizer(str(out / "best"))
    _, val_rows, _ = build_datasets(tokenizer, cfg.data, seed=cfg.train.seed)
    _, val_dl = build_dataloaders(val_rows, val_rows, DataConfig(group_by_length=False),
                                  batch_size=cfg.train.batch_size, pad_id=tokenizer.pad_token_id)
    base = load_base_model(resolve_model_path(cfg.model.name_or_path), torch.device("cpu"), CPU_DTYPE)  # the run's
    model = PeftModel.from_pretrained(base, out / "best")
    assert evaluate(model, val_dl, Accelerator(mixed_precision="no")) == pytest.approx(summary["best_metric"],
                                                                                      rel=1e-4)
    saved = json.loads((out / "best" / "adapter_config.json").read_text(encoding="utf-8"))
    assert saved["use_dora"] == (name == "dora") and saved["use_rslora"] == (name == "rslora")
    if name == "pissa":  # converted for the unmodified base: rank 2r, alpha doubled
        assert (saved["r"], saved["lora_alpha"]) == (2 * cfg.adapter.r, 2 * cfg.adapter.alpha)
    if name == "dora":
        assert any("lora_magnitude_vector" in k for k in load_file(out / "best" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def tiny_base() -> str:
    return resolve_model_path(tiny_config().model.name_or_path)


def test_loftq_starts_nearer_the_unquantized_weights(tiny_base):
    model = peft_model(tiny_base, init="loftq")
    original = SafetensorsWeights(Path(tiny_base))
    for name, layer in lora_layers(model).items():
        weight = original.get(name.removeprefix("base_model.model.") + ".weight").float()
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        quantized = dequantized(layer)
        fitted = quantized + layer.scaling["default"] * (b @ a)
        assert (weight - fitted).norm() < 0.9 * (weight - quantized).norm(), name


def test_pissa_starts_at_the_base_in_the_principal_directions(tiny_base):
    model = peft_model(tiny_base, init="pissa", dropout=0.0)
    layer = next(iter(lora_layers(model).values()))
    b, a = layer.lora_B["default"].weight, layer.lora_A["default"].weight
    assert b.abs().sum() > 0  # unlike the default init, B is not zero ...
    r = a.shape[0]
    with torch.no_grad():  # ... B A holds the weight's top r singular values
        top = torch.linalg.svdvals(dequantized(layer))[:r]
        held = torch.linalg.svdvals(layer.scaling["default"] * b @ a)[:r]
    assert held.tolist() == pytest.approx(top.tolist(), rel=2e-2)
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():  # ... and the frozen copy makes the start the base itself
        on = model(input_ids=ids).logits
        with model.disable_adapter():
            off = model(input_ids=ids).logits
    assert torch.allclose(on, off, atol=1e-3)


def test_eva_sets_a_from_the_inputs_principal_directions(tiny_base):
    from qlora_loop.model.init import eva_init
    from qlora_loop.run import eva_batches

    cfg = tiny_config()
    tokenizer = load_tokenizer(tiny_base)
    rows, _, _ = build_datasets(tokenizer, cfg.data, seed=cfg.train.seed)
    model = peft_model(tiny_base, init="eva")
    eva_init(model, eva_batches(rows, batch_size=4, pad_id=tokenizer.pad_token_id, device=torch.device("cpu")))
    for name, layer in lora_layers(model).items():
        a = layer.lora_A["default"].weight
        assert a.dtype == torch.float32, name  # trained in float32, as peft saves and reloads it
        # the rows of A are singular vectors of the layer's inputs: orthonormal, unlike Kaiming-uniform rows
        assert torch.allclose(a @ a.T, torch.eye(a.shape[0]), atol=1e-2), name


def test_loraplus_puts_the_b_matrices_at_ratio_times_the_lr(tiny_base):
    model = peft_model(tiny_base)
    optimizer = build_optimizer(model, "paged_adamw_32bit", 1e-3, loraplus_lr_ratio=16)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert group["lr"] == pytest.approx(16e-3 if "lora_B" in names[id(p)] else 1e-3), names[id(p)]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == \
        sum(p.requires_grad for p in model.parameters())


def test_a_loraplus_run_resumes_exactly(rows44, tiny_qwen2, train_main, tmp_path):
    args = [f"model.name_or_path={tiny_qwen2}", f"data.train={rows44}", "train.epochs=2", "train.batch_size=4",
            "train.grad_accum=2", "train.save_every=2", "train.keep_last=0", "adapter.dropout=0.2",
            "train.patience=0", "train.loraplus_lr_ratio=8", "train.neftune_alpha=5"]
    train_main(args + [f"output_dir={tmp_path / 'full'}"])
    calls = [0]

    def crashing(model, batch):  # call 1 is the memory probe; killed inside step 7's accumulation window
        calls[0] += 1
        if calls[0] == 17:
            raise KeyboardInterrupt
        return chunked_lm_loss(model, batch)

    with pytest.raises(KeyboardInterrupt):
        train_main(args + [f"output_dir={tmp_path / 'out'}"], loss_fn=crashing)
    train_main(args + [f"output_dir={tmp_path / 'out'}", "train.resume=auto"])
    want = rows(tmp_path / "full" / "steps.jsonl")
    assert len(want) == 10 and rows(tmp_path / "out" / "steps.jsonl") == want


def test_neftune_noises_training_forwards_only(tiny_base):
    model = peft_model(tiny_base)
    tokenizer = load_tokenizer(tiny_base)
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    embeddings = model.get_input_embeddings()
    clean = embeddings(ids).detach()
    model.eval()
    quiet = generate_reply(model, tokenizer, "Who are you?", max_new_tokens=12)
    add_neftune(model, 5.0)
    model.train()
    noisy = embeddings(ids).detach()
    bound = 5.0 / (ids.shape[1] * clean.shape[-1]) ** 0.5
    assert 0 < (noisy - clean).abs().max() <= bound * (1 + 1e-5)  # uniform in +-alpha / sqrt(length x hidden)
    model.eval()
    assert torch.equal(embeddings(ids), clean)
    assert generate_reply(model, tokenizer, "Who are you?", max_new_tokens=12) == quiet
    assert model.training is False


@pytest.mark.parametrize("overrides, says", [
    (["adapter.kind=adalora", "adapter.use_dora=true"], "adapter.kind=adalora cannot take adapter.use_dora"),
    (["adapter.kind=adalora", "train.loraplus_lr_ratio=16"], "cannot take train.loraplus_lr_ratio"),
    (["adapter.kind=adalora", "adapter.init=pissa"], "cannot take adapter.init=pissa"),
    (["adapter.init=loftq", "adapter.init_from=some/dir"], "adapter.init=loftq with adapter.init_from"),
    (["adapter.use_dora=true", "adapter.init=pissa"], "adapter.use_dora with adapter.init=pissa"),
    (["adapter.init=olora"], "adapter.init"),
    (["train.neftune_alpha=0"], "train.neftune_alpha=0.0 must be > 0"),
])
def test_combinations_a_variant_cannot_take_are_one_line(overrides, says):
    with pytest.raises(ConfigError, match=says.replace("+", r"\+")):
        load_config(None, overrides)


def test_the_dry_run_reports_the_variants(capsys):
    from qlora_loop.run import main

    main(["--config", "configs/tiny-demo.yaml", "--dry-run", "adapter.use_dora=true", "adapter.init=gaussian",
          "train.loraplus_lr_ratio=16", "train.neftune_alpha=5"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "adapter variants: DoRA, init gaussian, LoRA+ (B at 16x lr), NEFTune (alpha 5)" in shown
