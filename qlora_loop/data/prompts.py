"""Prompt rows, GRPO's data: {"prompt": a string or a list of messages, and any columns the rewards read,
e.g. "answer"}, from every source a run reads (data.columns maps other names: {prompt: question}).

A prompt example holds the prompt's tokens as the chat template renders it for generation
("input_ids", labels all ignored), the prompt as given ("prompt") and the whole row ("row"), which
the reward functions receive; "messages" is the prompt, followed by the answer when the row has one, so
the samples and eval.metrics show it as the reference.
"""

from __future__ import annotations

from qlora_loop.data.examples import IGNORE
from qlora_loop.data.rows import DataError
from qlora_loop.model.generate import encode_chat


def prompt_messages(row: dict, where: str, system_prompt: str | None) -> list[dict]:
    """A row's "prompt" as messages ending with the user's turn, a system turn first when the row has
    "system" or data.system_prompt is set."""
    prompt = row.get("prompt")
    if isinstance(prompt, str) and prompt.strip():
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                      and m.get("role") in ("system", "user", "assistant")
                                                      for m in prompt):
        messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
        if messages[-1]["role"] != "user":
            raise DataError(f"{where}: the prompt ends with a {messages[-1]['role']} turn; it must end with the user's "
                            "turn the answers reply to", "format")
    elif prompt is None:
        raise DataError(f"{where}: missing field 'prompt'", "missing_field")
    else:
        raise DataError(f"{where}: field 'prompt' must be a non-empty string or a list of messages", "wrong_type")
    system = row.get("system") or (system_prompt if messages[0]["role"] != "system" else None)
    return ([{"role": "system", "content": system}] if system else []) + messages


def prompt_example(tokenizer, item: dict, max_length: int) -> dict:
    """A prompt row, tokenized as generation renders it; longer than data.max_length is a DataError."""
    ids = encode_chat(tokenizer, item["messages"])[0].tolist()
    if len(ids) > max_length:
        raise DataError(f"{item['where']}: the prompt is {len(ids)} tokens, over data.max_length={max_length}; raise "
                        "data.max_length, or drop such rows with data.on_error=skip", "too_long")
    answer = item["row"].get("answer")
    messages = item["messages"] + ([{"role": "assistant", "content": answer}] if isinstance(answer, str) else [])
    return {"input_ids": ids, "labels": [IGNORE] * len(ids), "prompt": item["row"]["prompt"], "row": item["row"],
            "where": item["where"], "messages": messages, "truncated": False}
