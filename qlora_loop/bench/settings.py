"""The bench's settings: the command line's values, and what --quick and --gpu-7b set."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from qlora_loop.errors import UserError

# hf_grouped: the HF baseline with its own length-grouped sampler (train_sampling_strategy=group_by_length),
# which tutorials rarely set; run on request, to see how much of our lead is batching alone.
PEERS = ("ours", "hf", "torchkeras", "hf_grouped")
DEFAULT_PEERS = "ours,hf,torchkeras"
REAL_MODEL = "builtin:smollm2-135m-instruct"  # --real's model: a pretrained chat model that loads offline
# Every Linear4bit of a Qwen2/Llama block: what our target_modules=auto finds, given to every peer.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class BenchError(UserError, ValueError):
    """A setting or the machine does not allow the bench; the message names the flag and what to do."""


@dataclass
class Settings:
    """One bench, as scripts/bench.py's flags give it (same names); the defaults are the flags' defaults."""
    model: str | None = None  # a local model folder or builtin:NAME; None: a tiny Qwen2 built on the fly
    vocab: int | None = None  # vocab_size of the tiny model; its tokenizer stays small
    hidden: int = 128
    layers: int = 2
    data: str | None = None  # a chat/alpaca JSON or JSONL file; None: generated rows
    generate: int | None = None  # rows to generate (256 when neither this nor data is given)
    val_split: float = 0.1
    seq: int = 512
    batch_size: int = 8
    epochs: int = 3
    lr: float = 1e-3
    warmup_ratio: float = 0.05
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    repeats: int | None = None  # runs per peer; None: 3 (--real: 1)
    peers: str | None = None  # comma-separated; None: DEFAULT_PEERS (--quick: ours,hf)
    seed: int = 42  # training: adapter init, data order, dropout
    data_seed: int | None = None  # the base model, the generated rows and the split; None: seed
    ours_set: list[str] = field(default_factory=list)  # extra key.path=value for our run
    threads: int | None = None  # torch CPU threads in every run; None: torch's own choice
    run_timeout: float | None = None  # seconds before a run is killed and recorded as failed
    quick: bool = False
    real: bool = False
    gpu_7b: bool = False
    peak_tflops: float = 989.0  # the GPU's peak dense bf16 TFLOP/s, for the FLOP bound
    workdir: str = "outputs/bench"
    report: str = "outputs/bench/bench_report.json"

    def resolved(self) -> Settings:
        """The settings a run uses. --quick: a few steps of ours and hf on a tiny set (well under a
        minute). --real: the builtin SmolLM2-135M-Instruct, batch 8, seq 384, one epoch, one repeat,
        72 generated rows with an empty system turn (lengths about 20 to 365 tokens), all four peers:
        65 training rows, so that HF's length grouping sorts mega-batches of 2 batches. --gpu-7b: seq
        2048, r 16, batch 1, one epoch, one repeat, 64 generated rows."""
        s = dataclasses.replace(self, ours_set=list(self.ours_set))
        if s.quick:
            s.generate, s.seq, s.batch_size = s.generate or 24, min(s.seq, 128), min(s.batch_size, 4)
            s.epochs, s.repeats, s.val_split = 1, 1, 0.25
            s.peers = s.peers or "ours,hf"
        if s.real:
            s.model = s.model or REAL_MODEL
            s.generate, s.seq, s.batch_size, s.epochs, s.repeats = s.generate or 72, 384, 8, 1, s.repeats or 1
            s.peers = s.peers or "ours,hf,hf_grouped,torchkeras"
        if s.gpu_7b:
            s.seq, s.batch_size, s.r = 2048, 1, 16
            s.generate = s.generate or 64
            s.epochs, s.repeats = min(s.epochs, 1), 1
        if not s.data and not s.generate:
            s.generate = 256
        s.repeats = s.repeats or 3
        s.data_seed = s.seed if s.data_seed is None else s.data_seed
        s.peers = s.peers or DEFAULT_PEERS
        return s

    def peer_list(self) -> list[str]:
        peers = [p for p in (self.peers or DEFAULT_PEERS).split(",") if p]
        if unknown := set(peers) - set(PEERS):
            raise BenchError(f"--peers {self.peers}: unknown {', '.join(sorted(unknown))}; "
                             f"choose from {', '.join(PEERS)}")
        return peers
