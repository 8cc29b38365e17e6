"""Chat with a trained adapter on its 4-bit base (the base its adapter_config.json records, loaded
exactly as training loaded it). With --prompt / --prompts: print each reply and exit. Without:
an interactive chat; /reset clears the history, /exit (or Ctrl-D) quits."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.text import Text

from qlora_loop.model.generate import Sampling, as_messages, stream_reply
from qlora_loop.use.inference import load_for_inference, read_prompt_lines, run_config


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", help="adapter folder a run wrote, e.g. OUTPUT_DIR/best")
    parser.add_argument("--base", help="base model (hub id or folder); default: the one the adapter records")
    parser.add_argument("--no-adapter", action="store_true", help="chat with the bare base, for comparison")
    parser.add_argument("--prompt", action="append", default=[], help="ask this, print the reply, exit (repeatable)")
    parser.add_argument("--prompts", metavar="FILE", help="ask each line of FILE, print the replies, exit")
    parser.add_argument("--system", help="system prompt; default: the run's data.system_prompt, if any")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--max-rounds", type=int, default=8,
                        help="the model sees at most the last N rounds of the conversation (interactive)")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.7, help="with --sample")
    parser.add_argument("--top-p", type=float, default=0.9, help="with --sample")
    parser.add_argument("--top-k", type=int, default=50, help="with --sample")
    parser.add_argument("--trust-remote-code", action="store_true", default=None,
                        help="allow the base's own modeling code (default: as the run was configured)")
    args = parser.parse_args(argv)
    for flag in ("max_new_tokens", "max_rounds", "temperature", "top_k"):
        if not getattr(args, flag) > 0:
            parser.error(f"--{flag.replace('_', '-')} must be > 0")
    if not 0 < args.top_p <= 1:
        parser.error("--top-p must be in (0, 1]")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    console, status = Console(highlight=False, soft_wrap=True), Console(stderr=True, highlight=False, soft_wrap=True)
    prompts = args.prompt + (read_prompt_lines(args.prompts) if args.prompts else [])
    model, tokenizer = load_for_inference(args.adapter, args.base, no_adapter=args.no_adapter,
                                          trust_remote_code=args.trust_remote_code)
    what = "bare base" if args.no_adapter or args.adapter is None else f"adapter {args.adapter}"
    status.print(f"[dim]{model.name_or_path} (4-bit) + {what}, on {model.device}")
    system = args.system if args.system is not None else run_config(args.adapter).get("data", {}).get("system_prompt")
    options = dict(max_new_tokens=args.max_new_tokens,
                   sampling=Sampling(args.temperature, args.top_p, args.top_k) if args.sample else None)

    if prompts:  # scripted: each prompt on its own, no history
        for prompt in prompts:
            console.print(Text(f"> {prompt}", style="bold green"), soft_wrap=True)
            show_reply(console, stream_reply(model, tokenizer, as_messages(prompt, system), **options))
        return
    chat(console, model, tokenizer, system=system, max_rounds=args.max_rounds, options=options)


def chat(console: Console, model, tokenizer, *, system: str | None, max_rounds: int, options: dict) -> None:
    console.print("[dim]/reset clears the history, /exit quits; the model sees the last "
                  f"{max_rounds} round(s) (--max-rounds)")
    history: list[dict] = []  # user and assistant turns of the rounds kept
    while True:
        try:
            text = console.input("[bold green]you>[/] ")
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if text.strip() in ("/exit", "/quit"):
            return
        if text.strip() == "/reset":
            history = []
            console.print("[dim]history cleared")
            continue
        if not text.strip():
            continue
        keep = 2 * (max_rounds - 1)  # turns of earlier rounds the model may still see
        if len(history) > keep:
            history = history[len(history) - keep:]
            console.print(f"[dim](oldest round dropped: --max-rounds {max_rounds})")
        messages = as_messages(history + [{"role": "user", "content": text}], system)
        console.print("[bold cyan]assistant>[/] ", end="")
        try:
            reply = show_reply(console, stream_reply(model, tokenizer, messages, **options))
        except KeyboardInterrupt:  # stops this reply only; the round is not kept
            console.print("\n[dim](interrupted)")
            continue
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]


def show_reply(console: Console, pieces) -> str:
    """Print the reply piece by piece as it is generated; return it whole."""
    reply = ""
    for piece in pieces:
        console.print(Text(piece, style="cyan"), end="", soft_wrap=True)
        reply += piece
    console.print()
    return reply

