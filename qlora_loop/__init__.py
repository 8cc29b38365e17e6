"""QLoRA fine-tuning of causal LMs on a hand-written training loop over HuggingFace Accelerate.

    from qlora_loop import load_config, train
    summary = train(load_config("configs/tiny-demo.yaml", ["train.epochs=2"]))

`import qlora_loop` alone loads nothing heavy: these two are imported when first used.
"""


def __getattr__(name: str):
    if name == "train":
        from qlora_loop.run import train
        return train
    if name == "load_config":
        from qlora_loop.config import load_config
        return load_config
    raise AttributeError(f"module 'qlora_loop' has no attribute {name!r}")


__all__ = ["load_config", "train"]
