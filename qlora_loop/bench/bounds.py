"""The --gpu-7b mode's yardsticks: an analytic floor under peak GPU memory and a FLOP bound on
tokens/s for QLoRA on a Qwen2-shaped model, from the shape alone.

The bytes per weight (NF4, adapter, optimizer) and the activation model are the dry run's
(qlora_loop.training.dryrun), so the floor and `train.py --dry-run` count the same things the same way. The
two differ where one is a floor and the other an estimate: the floor holds only the larger of one
layer's recompute and one chunk of float32 logits (the chunked loss's backward is done before the
layers' backward starts), and leaves out the dequantized weight of the running matmul; the dry run
adds both, and counts the loss's logits as our loss holds them (compute-dtype logits, their float32
copy, log-softmax and gradient, loss.chunk_tokens at a time).
"""

from __future__ import annotations

from qlora_loop.training.dryrun import FP32, NF4_BYTES, OPTIMIZER_BYTES, activation_bytes

# Qwen2.5-7B's config.json shape (hub id Qwen/Qwen2.5-7B); the bench's weights are random.
QWEN25_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6,
                 rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu")
BF16 = 2
# bitsandbytes' paged optimizers keep the state of tensors of at least this many elements in managed
# memory, which torch.cuda.max_memory_allocated does not see.
PAGED_MIN_ELEMENTS = 100_000


def widths(shape: dict) -> tuple[int, int, int, int, int, int]:
    """(hidden, q width, k/v width, intermediate, layers, vocab) of a Llama/Qwen2-shaped config.json."""
    H = shape["hidden_size"]
    head = shape.get("head_dim") or H // shape["num_attention_heads"]
    return (H, shape["num_attention_heads"] * head, shape["num_key_value_heads"] * head, shape["intermediate_size"],
            shape["num_hidden_layers"], shape["vocab_size"])


def linear_parameters(shape: dict) -> int:
    """Weights of the layers' seven projections: q, o (H x q width), k, v (H x kv), gate, up, down (H x I)."""
    H, Q, kv, I, L, _ = widths(shape)
    return L * (2 * H * Q + 2 * H * kv + 3 * H * I)


def model_flops_per_token(shape: dict) -> int:
    """The usual model FLOPs per trained token, 6 x (projection weights + lm_head): 2N forward, 4N backward.
    A yardstick, not what QLoRA computes: frozen weights need no weight gradient (4N without
    recomputation), checkpointing adds a forward (6N), the adapter adds a little."""
    _, _, _, _, _, V = widths(shape)
    return 6 * (linear_parameters(shape) + V * shape["hidden_size"])


def gpu_bounds(shape: dict, *, seq: int, batch: int, r: int, loss_chunk_tokens: int = 1024) -> dict:
    """Memory floor (bytes) and FLOPs per token of QLoRA with r-rank LoRA on all seven projections of
    a Qwen2-shaped model (QWEN25_7B's keys), bf16 compute, paged AdamW 32-bit, gradient checkpointing."""
    H, _, kv, I, L, V = widths(shape)
    linear = linear_parameters(shape)
    base = linear * NF4_BYTES
    base += (2 * V * H + L * (H + 2 * kv) + (2 * L + 1) * H) * BF16  # embeddings, head, q/k/v biases, norms
    shapes = [(H, H), (H, kv), (H, kv), (H, H), (H, I), (H, I), (I, H)]  # (in, out) of q, k, v, o, gate, up, down
    tensors = [n for fan_in, fan_out in shapes for n in (r * fan_in, fan_out * r)]  # A (r x in), B (out x r)
    lora = L * sum(tensors)
    moments = OPTIMIZER_BYTES["paged_adamw_32bit"]
    adapter = lora * (FP32 + FP32 + moments)  # fp32 weights, their grads, AdamW's m and v
    paged = L * sum(n for n in tensors if n >= PAGED_MIN_ELEMENTS) * moments  # here gate/up B and down A
    tokens = seq * batch

    def activations(stream_bytes: int) -> int:  # bytes per hidden-state element: 2 (bf16) or 4 (fp32)
        held, one_layer = activation_bytes(tokens, hidden=H, intermediate=I, kv_width=kv, layers=L,
                                           stream_bytes=stream_bytes)
        loss_chunk = min(loss_chunk_tokens, tokens) * V * FP32  # fp32 logits of one chunk of a chunked loss
        return held + max(one_layer, loss_chunk)

    # The floor with bf16 activations, and with a float32 residual stream, as peft-style preparation
    # makes it (its float32 norms turn the stream float32 after the first norm).
    # FLOPs per token: 2N forward + 2N recomputed forward + 2N backward to the inputs of the checkpointed
    # layers (frozen 4-bit weights get no weight gradient), and 2VH + 2VH for lm_head, outside the
    # checkpoints; N = the layers' matmul parameters. Ours applies the head only at trained positions.
    return {"floor_bytes": base + adapter + activations(BF16),
            "floor_fp32_stream_bytes": base + adapter + activations(FP32),
            "base_bytes": base, "adapter_optimizer_bytes": adapter, "paged_optimizer_bytes": paged,
            "activation_bytes": activations(BF16), "activation_fp32_stream_bytes": activations(FP32),
            "lora_parameters": lora, "n_active": linear + V * H, "flops_per_token": 6 * linear + 4 * V * H}


def gpu_report(bounds: dict, peers: dict, *, peak_tflops: float) -> dict:
    """The bounds, and each peer's median peak memory over the floors and its model FLOP utilisation."""
    peak = peak_tflops * 1e12
    return {**bounds, "peak_tflops": peak_tflops, "flop_bound_tokens_per_second": peak / bounds["flops_per_token"],
            "per_peer": {p: {"peak_over_floor": v["peak_memory_bytes"] / bounds["floor_bytes"],
                             "peak_over_floor_fp32_stream": v["peak_memory_bytes"] / bounds["floor_fp32_stream_bytes"],
                             "mfu": v["tokens_per_second"] * bounds["flops_per_token"] / peak}
                         for p, v in peers.items()}}
