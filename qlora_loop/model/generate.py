"""Generation shared by chat, merge's fidelity report and the samples shown during training.

`generate_reply` / `stream_reply` answer one conversation; `sample_replies` answers a few prompts
on the *training* model and leaves it exactly as it found it (loading a trained adapter for
inference is use/inference.py's).
"""

from __future__ import annotations

import contextlib
import random
import threading
from dataclasses import dataclass

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from qlora_loop.config import EvalConfig


# --- one reply ----------------------------------------------------------------------------------

def as_messages(prompt: str | list[dict], system: str | None = None) -> list[dict]:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    return messages


def encode_chat(tokenizer, messages: list[dict]) -> torch.Tensor:
    """Prompt ids [1, T]: the chat template with the generation prompt, tokenized as training does
    (the template writes any BOS itself, so no special tokens are added)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS (the end-of-turn token training taught) plus the model's own stop tokens."""
    own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    own = own if isinstance(own, list) else [own]
    return list(dict.fromkeys(t for t in [tokenizer.eos_token_id, *own] if t is not None))


@dataclass(frozen=True)
class Sampling:
    """Sampled decoding (top_k 0 and top_p 1.0 turn those filters off); a reply given none is greedy."""
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50


def generation_kwargs(model, tokenizer, *, max_new_tokens: int, sampling: Sampling | None = None) -> dict:
    """Everything generate() needs, set explicitly: the model's generation_config (e.g. a hub
    model's sampling temperature or repetition penalty) must not leak into a greedy reply."""
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=sampling is not None, num_beams=1, repetition_penalty=1.0,
                  eos_token_id=stop_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id, use_cache=True)
    if sampling is not None:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


@contextlib.contextmanager
def generation_state(model):
    """Eval mode, KV cache on, activation checkpointing off and no autograd for the duration; every
    module's train/eval flag, the cache setting and each layer's checkpointing flag are put back as
    they were, so a training model leaves exactly as it came."""
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    modes = {m: m.training for m in model.modules()}
    # transformers checkpoints a layer whose `gradient_checkpointing` flag is set (an instance
    # attribute, or the class default of GradientCheckpointingLayer).
    layers = [m for m in model.modules()
              if hasattr(type(m), "gradient_checkpointing") or "gradient_checkpointing" in vars(m)]
    own_flags = {m: vars(m)["gradient_checkpointing"] for m in layers if "gradient_checkpointing" in vars(m)}
    use_cache = hf_model.config.use_cache
    try:
        model.eval()
        for m in layers:
            m.gradient_checkpointing = False
        hf_model.config.use_cache = True
        with torch.no_grad():
            yield
    finally:
        hf_model.config.use_cache = use_cache
        for m in layers:
            if m in own_flags:
                m.gradient_checkpointing = own_flags[m]
            else:
                del m.gradient_checkpointing  # back to the class default
        for m, training in modes.items():
            m.training = training


def generate_ids(model, tokenizer, input_ids: torch.Tensor, *, max_new_tokens: int = 256,
                 sampling: Sampling | None = None, streamer=None, stopping_criteria=None) -> torch.Tensor:
    """The new token ids [T'] generate() appends to `input_ids` [1, T] (the stop token included);
    greedy unless `sampling`."""
    input_ids = input_ids.to(model.device)
    options = generation_kwargs(model, tokenizer, max_new_tokens=max_new_tokens, sampling=sampling)
    with generation_state(model):
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                                stopping_criteria=stopping_criteria, **options)
    return output[0, input_ids.shape[1]:].cpu()


def generate_reply(model, tokenizer, messages: list[dict] | str, *, max_new_tokens: int = 256,
                   sampling: Sampling | None = None, streamer=None) -> str:
    """The model's reply to a conversation (greedy unless `sampling`), special tokens removed.
    `streamer` (a transformers streamer) receives the tokens as they are generated."""
    new = generate_ids(model, tokenizer, encode_chat(tokenizer, as_messages(messages)), max_new_tokens=max_new_tokens,
                       sampling=sampling, streamer=streamer)
    return tokenizer.decode(new, skip_special_tokens=True)


def generate_replies(model, tokenizer, conversations: list[list[dict]], *, max_new_tokens: int,
                     batch_size: int = 16) -> list[str]:
    """Greedy replies to many conversations, `batch_size` at a time, left-padded: on a CPU a batch of
    16 costs little more per step than one. Padding shifts the numbers by float rounding only, so a
    reply can differ from generate_reply's by a token where two were nearly tied."""
    prompts = [encode_chat(tokenizer, as_messages(c))[0] for c in conversations]
    replies = []
    options = generation_kwargs(model, tokenizer, max_new_tokens=max_new_tokens)
    for start in range(0, len(prompts), batch_size):
        new = generate_left_padded(model, prompts[start:start + batch_size], pad_id=tokenizer.pad_token_id, **options)
        replies += tokenizer.batch_decode(new, skip_special_tokens=True)
    return replies


def generate_left_padded(model, prompts: list[torch.Tensor], *, pad_id: int, **options) -> torch.Tensor:
    """The new tokens [N, T'] generate() appends to the prompts [T_i], given as one left-padded batch,
    under generation_state; `options`: generation_kwargs'."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):], attention_mask[row, width - len(ids):] = ids, 1
    with generation_state(model):
        output = model.generate(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                                **options)
    return output[:, width:]


def sample_completions(model, tokenizer, prompts: list[torch.Tensor], *, num_generations: int, max_new_tokens: int,
                       sampling: Sampling) -> tuple[list[torch.Tensor], list[bool]]:
    """(completions, whether each ended with a stop token): `num_generations` sampled completions of each
    prompt (token ids [T]), all in one batched generate() with the KV cache, left-padded, under
    generation_state (eval mode: no dropout, no gradients): the group of prompt i is completions[i * G:(i + 1) * G].
    Each completion runs to its first stop token, kept, or to max_new_tokens. Draws from torch's global RNG
    (saved in checkpoints)."""
    options = generation_kwargs(model, tokenizer, max_new_tokens=max_new_tokens, sampling=sampling)
    rows = [ids for ids in prompts for _ in range(num_generations)]
    stops = torch.tensor(options["eos_token_id"])
    completions, stopped = [], []
    for new in generate_left_padded(model, rows, pad_id=tokenizer.pad_token_id, **options).cpu():
        ends = torch.isin(new, stops).nonzero()
        completions.append(new[:int(ends[0]) + 1] if len(ends) else new)
        stopped.append(bool(len(ends)))
    return completions, stopped


class _StopWhenSet(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream_reply(model, tokenizer, messages: list[dict] | str, *, max_new_tokens: int = 256,
                 sampling: Sampling | None = None):
    """Yield the reply in pieces as it is generated (generate runs in a thread, feeding a
    TextIteratorStreamer); the pieces join to exactly what generate_reply returns. Leaving the loop
    early (e.g. Ctrl-C) stops generation at the next token."""
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    stop, failure = threading.Event(), []
    input_ids = encode_chat(tokenizer, as_messages(messages))

    def run():
        try:
            generate_ids(model, tokenizer, input_ids, max_new_tokens=max_new_tokens, streamer=streamer,
                         stopping_criteria=StoppingCriteriaList([_StopWhenSet(stop)]), sampling=sampling)
        except BaseException as e:  # re-raised in the caller's thread; end() unblocks its loop
            failure.append(e)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield from streamer
    finally:
        stop.set()
        thread.join()
    if failure:
        raise failure[0]


# --- samples during training ----------------------------------------------------------------------

@contextlib.contextmanager
def rng_preserved(device: torch.device):
    """Put back torch's (CPU and this CUDA device's), Python's and numpy's random state on exit."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def sample_replies(model, tokenizer, prompts: list[str] | list[list[dict]], *, max_new_tokens: int = 128,
                   system: str | None = None) -> list[str]:
    """Greedy replies of the model being trained, one prompt at a time, without touching what the
    next training step computes: modes, cache and checkpointing are restored (generation_state) and
    no random number is consumed (greedy uses none; the states are restored anyway).
    Pass the unwrapped model (`accelerator.unwrap_model(model)`); call it on the main process only."""
    with rng_preserved(model.device):
        return [generate_reply(model, tokenizer, as_messages(p, system),
                               max_new_tokens=max_new_tokens) for p in prompts]


def held_out_prompts(rows: list[dict], n: int) -> tuple[list[list[dict]], list[str]]:
    """(prompts, reference answers) of the first n rows with distinct prompts: each row's messages
    (data.build_examples keeps them) cut before its first assistant turn, which is the reference."""
    prompts, references = [], []
    for row in rows:
        messages = row["messages"]
        first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        if len(prompts) < n and messages[:first] not in prompts:  # a question asked twice shows nothing new
            prompts.append(messages[:first])
            references.append(messages[first]["content"])
    return prompts, references


def sampler(runner, tokenizer, log, evals: EvalConfig, *, rows: list[dict], system: str | None,
            general: tuple[str, str] | None = None, sharded_by: str | None = None):
    """fit's `sample(epoch)`: greedy replies to eval.prompts, or else to the first eval.num_samples
    held-out `rows`, and to the `general` (prompt, base's reply) whose answer should not change,
    generated on the main process; None when there is nothing to ask. The base's reply shown is the
    one sample(0) gets (before training the adapter changes nothing), so it is decoded exactly as
    the later ones; `general`'s own reply (batched, replay.base_replies) stands in on a resumed run."""
    if evals.prompts:
        asked, references = [as_messages(p, system) for p in evals.prompts], [None] * len(evals.prompts)
    else:
        asked, references = held_out_prompts(rows, evals.num_samples)
    sources = ["reference"] * len(asked)
    if general is not None:
        asked, references, sources = asked + [as_messages(general[0], system)], references + [general[1]], \
            sources + ["base"]
    if not asked:
        return None
    if sharded_by:  # one process cannot run a model whose weights are spread over all of them
        log.print(f"[yellow]no sample replies under {sharded_by}: generation would need every process")
        return None
    accelerator = runner.accelerator

    @accelerator.on_main_process
    def sample(epoch: int) -> None:
        # generate() runs the unwrapped model, outside the autocast Accelerate wraps its forward in;
        # under float16 its float32 norms would otherwise meet a float16 head
        with accelerator.autocast():
            replies = sample_replies(accelerator.unwrap_model(runner.model), tokenizer, asked,
                                     max_new_tokens=evals.max_new_tokens)
        if epoch == 0 and general is not None:
            references[-1] = replies[-1]
        log.samples(epoch, runner.step, prompts=[p[-1]["content"] for p in asked], responses=replies,
                    references=references, sources=sources)

    return sample
