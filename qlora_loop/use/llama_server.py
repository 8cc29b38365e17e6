"""Ask an exported GGUF through llama.cpp's own server, and compare its greedy replies with the adapter's.

python -m qlora_loop.use.llama_server --adapter outputs/self-cognition/best --gguf outputs/gguf/self-cognition-f16.gguf

transformers' GGUF reader (export's fidelity report) checks the weights and the tokenizer in the
file; users run the file in llama.cpp or Ollama, whose runtime reads the template, the stop tokens
and the tensors on its own. This starts `llama-server --jinja` (on PATH, or $QLORA_LOOP_LLAMA_SERVER)
on 127.0.0.1 over the file, asks it through /v1/chat/completions at temperature 0 and counts how
often its reply is the one chat.py gives (4-bit base + adapter, greedy): on the run's validation
prompts and on general prompts the run never trained (eval.drift_prompts).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from qlora_loop.config import EvalConfig
from qlora_loop.errors import ModelError


def server_binary() -> str | None:
    """$QLORA_LOOP_LLAMA_SERVER, else llama-server on PATH, else None."""
    return os.environ.get("QLORA_LOOP_LLAMA_SERVER") or shutil.which("llama-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def llama_server(gguf: str | Path, *, context: int = 2048, threads: int | None = None, timeout: float = 180):
    """The base URL of `llama-server --jinja` serving `gguf` on 127.0.0.1, ready (its /health answers
    200); stopped on exit. A server that exits or is not ready in `timeout` s is a ModelError with
    the end of its log."""
    binary = server_binary()
    if binary is None:
        raise ModelError("llama-server is neither on PATH nor named by $QLORA_LOOP_LLAMA_SERVER: build it from "
                         "llama.cpp (cmake --build build --target llama-server) or point the variable at it")
    port = free_port()
    log = tempfile.TemporaryFile()
    command = [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--jinja", "-c", str(context),
               "-np", "1", "-t", str(threads or os.cpu_count() or 1), "--no-webui"]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                tail = log.read().decode(errors="replace").strip().splitlines()[-8:]
                why = "it exited" if process.poll() is not None else f"not ready in {timeout:g} s"
                raise ModelError(f"llama-server did not come up on {gguf} ({why}): " + " | ".join(tail))
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def served_reply(url: str, messages: list[dict], *, max_tokens: int = 64) -> str:
    """The server's greedy reply (temperature 0, top_k 1) to a conversation, as its chat API returns it."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "top_k": 1, "seed": 0,
            "cache_prompt": False}
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())["choices"][0]["message"]["content"]


def agreement(adapter: str | Path, gguf: str | Path, prompts: dict[str, list[list[dict]]], *,
              max_new_tokens: int = 48) -> dict:
    """For each named set of `prompts`: the adapter's greedy reply (chat.py's: 4-bit base + adapter) and
    the server's, and how many are the same (compared with surrounding whitespace stripped)."""
    from qlora_loop.model.generate import generate_reply
    from qlora_loop.use.inference import load_for_inference

    model, tokenizer = load_for_inference(adapter)
    ours = {name: [generate_reply(model, tokenizer, p, max_new_tokens=max_new_tokens) for p in asked]
            for name, asked in prompts.items()}
    del model
    with llama_server(gguf) as url:
        served = {name: [served_reply(url, p, max_tokens=max_new_tokens) for p in asked]
                  for name, asked in prompts.items()}
    result = {}
    for name, asked in prompts.items():
        rows = [{"prompt": p[-1]["content"], "chat_py": a, "llama_cpp": b, "same": a.strip() == b.strip()}
                for p, a, b in zip(asked, ours[name], served[name])]
        result[name] = {"same": sum(r["same"] for r in rows), "prompts": len(rows), "rows": rows}
    return result


def main(argv: list[str] | None = None) -> dict:
    from rich.console import Console

    from qlora_loop.model.generate import as_messages
    from qlora_loop.use.inference import run_config
    from qlora_loop.use.merge import report_prompts

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="the adapter folder the GGUF was exported from")
    parser.add_argument("--gguf", required=True, help="the exported file")
    parser.add_argument("--num-prompts", type=int, default=6, help="validation rows to ask")
    parser.add_argument("--general", type=int, default=6, help="general prompts (eval.drift_prompts) to ask")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", help="write the replies and counts to this JSON file")
    args = parser.parse_args(argv)
    console = Console(highlight=False, soft_wrap=True)
    system = run_config(args.adapter).get("data", {}).get("system_prompt")
    validation, _, source = report_prompts(args.adapter, n=args.num_prompts)
    drift_file = run_config(args.adapter).get("eval", {}).get("drift_prompts", EvalConfig.drift_prompts)
    general = [json.loads(line)["prompt"] for line in Path(drift_file).read_text(encoding="utf-8").splitlines()
               if line.strip()][:args.general]
    result = agreement(args.adapter, args.gguf, {"validation": validation,
                                                 "general": [as_messages(p, system) for p in general]},
                       max_new_tokens=args.max_new_tokens)
    for name, part in result.items():
        console.print(f"[bold]{name}[/] ({source if name == 'validation' else drift_file}): llama.cpp's greedy reply "
                      f"is chat.py's on {part['same']}/{part['prompts']}")
        for row in part["rows"]:
            mark = "same" if row["same"] else "[red]differs"
            console.print(f"  {mark}: {row['prompt']!r}\n    chat.py:   {row['chat_py']!r}\n    llama.cpp: "
                          f"{row['llama_cpp']!r}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
