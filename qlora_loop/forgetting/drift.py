"""Forgetting, measured: how far the adapted model has moved from its base on general prompts that
training never sees.

drift = the mean, over reply tokens, of KL(base || adapted) between next-token distributions,
teacher-forced on the base's own greedy replies to those prompts. 0 means the adapter changed
nothing there; the base's distributions come from the same model with the adapter disabled
(peft's disable_adapter), computed once before training, so no second model is held in memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qlora_loop.model.generate import encode_chat, generation_state


class Drift:
    """`drift()` -> mean per-token KL(base || adapted) over the replies, in nats.

    model: the PeftModel being trained (unwrapped); prompts: chat messages; replies: the base's
    replies to them (replay.base_replies). The base's log-probabilities are kept on the CPU,
    [reply tokens, vocab] float32 per prompt: 12 replies of 48 tokens at a 49k vocabulary are 113 MB."""

    def __init__(self, model, tokenizer, prompts: list[list[dict]], replies: list[str], *, autocast):
        self.model, self.autocast = model, autocast
        self.rows = []
        for messages, reply in zip(prompts, replies):
            prompt_ids = encode_chat(tokenizer, messages)[0]
            reply_ids = tokenizer(reply, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
            if len(reply_ids):
                self.rows.append((torch.cat([prompt_ids, reply_ids])[None], len(prompt_ids)))
        with model.disable_adapter():
            self.base = [logp.cpu() for logp in self._log_probs()]

    def _log_probs(self) -> list[torch.Tensor]:
        """log p(next token) at each position that predicts a reply token, per row."""
        out = []
        with generation_state(self.model), self.autocast():
            for ids, start in self.rows:
                logits = self.model(input_ids=ids.to(self.model.device), use_cache=False).logits[0]
                out.append(F.log_softmax(logits[start - 1:-1].float(), dim=-1))
        return out

    def __call__(self) -> float:
        kl_sum, tokens = 0.0, 0
        for base, adapted in zip(self.base, self._log_probs()):
            base = base.to(adapted.device)
            kl_sum += float((base.exp() * (base - adapted)).sum())
            tokens += base.shape[0]
        return kl_sum / max(tokens, 1)
