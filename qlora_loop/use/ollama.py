"""The trained chat template in Ollama's template syntax (Go's text/template), and the Modelfile.

Ollama renders its TEMPLATE over `.Messages` (each with `.Role` and `.Content`; a Modelfile's SYSTEM
comes first as a system message when the request has none) and appends the model's reply. The
trained template is Jinja. We do not parse Jinja: for each chat format we know (ChatML as Qwen2 and
SmolLM2 write it, with or without a default system turn; Llama-2's [INST]) we write the Go template
and keep the one that renders exactly what the Jinja template renders, with the generation prompt,
on every probe conversation. None that does is an error naming the template.

`render_go` is a renderer of the part of Go's text/template these templates use, so the check runs
here without Go or Ollama: text; `{{ }}` actions with `{{-`/`-}}` trimming; `if`/`else if`/`else`/
`end`; `range $i, $m := PIPE`; `$x := PIPE` and `$x = PIPE`; operands `.Field`, `$`, `$x`, `$x.Field`,
`$.Field`, "strings", integers and `( )`; the functions eq, ne, and, or, not, len and slice.
"""

from __future__ import annotations

import json
import re

from qlora_loop.use.inference import InferenceError


class TemplateError(InferenceError):
    """The trained chat template has no Ollama translation, or the translation renders other text."""


# --- the templates we write ---------------------------------------------------------------------

def chatml_template(default_system: str | None) -> str:
    """ChatML; a conversation that does not open with a system turn gets `default_system` first, as
    SmolLM2's template does. A last assistant turn is left open (Ollama continues it)."""
    head = "" if default_system is None else (
        '{{- if and (eq $i 0) (ne $m.Role "system") }}<|im_start|>system\n'
        f"{_go_text(default_system)}<|im_end|>\n{{{{ end }}}}\n")
    return ("{{- range $i, $m := .Messages }}\n" + head +
            "{{- $last := eq (len (slice $.Messages $i)) 1 }}<|im_start|>{{ $m.Role }}\n"
            "{{ $m.Content }}\n"
            '{{- if not (and $last (eq $m.Role "assistant")) }}<|im_end|>\n{{ end }}\n'
            '{{- if and $last (ne $m.Role "assistant") }}<|im_start|>assistant\n{{ end }}\n'
            "{{- end }}")


def llama2_template(bos: str, eos: str) -> str:
    """Llama-2-chat: the system turn folded into the first [INST], each answer closed by EOS."""
    return ('{{- $system := "" }}\n'
            "{{- range $i, $m := .Messages }}\n"
            '{{- if eq $m.Role "system" }}{{ $system = $m.Content }}\n'
            f'{{{{- else if eq $m.Role "user" }}}}{_go_text(bos)}[INST] '
            '{{ if $system }}<<SYS>>\n{{ $system }}\n<</SYS>>\n\n{{ $system = "" }}{{ end }}{{ $m.Content }} [/INST]\n'
            f"{{{{- else }}}} {{{{ $m.Content }}}} {_go_text(eos)}\n"
            "{{- end }}\n"
            "{{- end }}")


def _go_text(text: str) -> str:
    """`text` as literal template text: a `{{` in it is written as an action printing it."""
    return text.replace("{{", '{{ "{{" }}')


# --- translation ----------------------------------------------------------------------------------

PROBES = [  # multi-turn, with and without a system turn, with newlines, unicode and padding spaces
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another\none, please."}],
    [{"role": "system", "content": "Answer in French.\nBe brief."}, {"role": "user", "content": "Bonjour"},
     {"role": "assistant", "content": "Salut ! 你好"}, {"role": "user", "content": " 2 + 2 ? "},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "Merci"}],
]


def jinja_prompt(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def translate_template(tokenizer, conversations: list[list[dict]] = ()) -> tuple[str, str]:
    """(format name, Go template) that renders what the tokenizer's Jinja template renders, with the
    generation prompt, on PROBES and on `conversations` (each ending in a user turn)."""
    jinja = tokenizer.chat_template
    if not jinja:
        raise TemplateError("the adapter's tokenizer has no chat template; train with data.chat_template set")
    checks = [*PROBES, *conversations]
    expected = []
    for messages in checks:
        try:
            expected.append(jinja_prompt(tokenizer, messages))
        except Exception as e:  # a template may raise_exception() on a conversation it does not allow
            raise TemplateError(f"the chat template cannot render a {'/'.join(m['role'] for m in messages)} "
                                f"conversation ({str(e).splitlines()[0]}); {_unsupported(jinja)}") from None
    for name, go in candidates(tokenizer, expected[0]):
        if all(render_go(go, {"Messages": m}) == text for m, text in zip(checks, expected)):
            return name, go
    raise TemplateError(_unsupported(jinja))


def candidates(tokenizer, first: str):
    """The formats worth trying; `first` is the Jinja rendering of PROBES[0], which tells a default system turn."""
    system = re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n<\|im_start\|>user\n", first, re.S)
    yield "chatml", chatml_template(system.group(1) if system else None)
    if tokenizer.bos_token and tokenizer.eos_token:
        yield "llama2", llama2_template(tokenizer.bos_token, tokenizer.eos_token)


def _unsupported(jinja: str) -> str:
    head = jinja.strip().replace("\n", " ")
    head = head if len(head) <= 80 else head[:79] + "…"
    return (f"the chat template {head!r} is not one the export can write in Ollama's template syntax "
            "(supported: ChatML as Qwen2 and SmolLM2 write it, Llama-2 [INST]); export the GGUF for llama.cpp, "
            "which reads the Jinja template, or train with a supported data.chat_template")


# --- the Modelfile --------------------------------------------------------------------------------

def modelfile(gguf_name: str, template: str, stops: list[str], system: str | None) -> str:
    for what, text in (("chat template", template), ("system prompt", system or "")):
        if '"""' in text:
            raise TemplateError(f'the {what} holds """, which a Modelfile cannot quote')
    lines = ["# ollama create NAME -f Modelfile   (run in this folder; then: ollama run NAME)",
             f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in stops]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def read_modelfile(text: str) -> dict:
    """{'from', 'template', 'stops', 'system'} of a Modelfile written by `modelfile`."""
    found = {"from": re.search(r"^FROM (.*)$", text, re.M).group(1),
             "template": re.search(r'^TEMPLATE """(.*?)"""$', text, re.M | re.S).group(1),
             "stops": [json.loads(s) for s in re.findall(r"^PARAMETER stop (.*)$", text, re.M)]}
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.M | re.S)
    found["system"] = system.group(1) if system else None
    return found


def ollama_messages(messages: list[dict], system: str | None) -> list[dict]:
    """What Ollama renders: the Modelfile's SYSTEM first when the conversation has no system turn."""
    if system and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": system}, *messages]
    return list(messages)


# --- a renderer of the Go template subset above ---------------------------------------------------

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'\s*(?:("(?:[^"\\]|\\.)*")|(\()|(\))|([^\s()]+))')


def render_go(template: str, data: dict) -> str:
    """Render `template` (the subset named in the module docstring) with `data` as dot."""
    nodes, i = _parse(_lex(template), 0, ())
    out: list[str] = []
    _run(nodes, [{"$": data}], data, out)
    return "".join(out)


def _lex(template: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", body)], with the trim markers applied to the neighbouring text."""
    items, pos = [], 0
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        items.append(("text", text))
        items.append(("action", m.group(2).strip(), bool(m.group(3))))
        pos = m.end()
    items.append(("text", template[pos:]))
    for k, item in enumerate(items):  # a right trim marker eats the whitespace that follows
        if item[0] == "action" and item[2]:
            items[k + 1] = ("text", items[k + 1][1].lstrip(" \t\r\n"))
    return [(kind, body) for kind, body, *_ in items]


def _parse(items, i, stop: tuple[str, ...]):
    """Nodes up to a keyword in `stop` (returned with its position): ("text", s), ("out", pipe),
    ("set", name, pipe, declare), ("if", [(pipe, nodes), ...], else_nodes), ("range", vars, pipe, nodes)."""
    nodes = []
    while i < len(items):
        kind, body = items[i]
        word = body.split(" ", 1)[0] if kind == "action" else None
        if word in stop:
            return nodes, i
        i += 1
        if kind == "text":
            nodes.append(("text", body))
        elif word == "if":
            branches, rest = [], None
            pipe = body[2:].strip()
            while True:
                block, i = _parse(items, i, ("else", "end"))
                branches.append((pipe, block))
                keyword = items[i][1]
                i += 1
                if keyword.startswith("else if "):
                    pipe = keyword[len("else if "):]
                    continue
                if keyword == "else":
                    rest, i = _parse(items, i, ("end",))
                    i += 1
                break
            nodes.append(("if", branches, rest or []))
        elif word == "range":
            spec = body[len("range"):].strip()
            names, pipe = ([], spec) if ":=" not in spec else \
                ([n.strip() for n in spec.split(":=")[0].split(",")], spec.split(":=", 1)[1])
            block, i = _parse(items, i, ("end",))
            i += 1
            nodes.append(("range", names, pipe.strip(), block))
        elif re.match(r"^\$\w*\s*:?=", body):
            name, op, pipe = re.match(r"^(\$\w*)\s*(:?=)\s*(.*)$", body, re.S).groups()
            nodes.append(("set", name, pipe, op == ":="))
        else:
            nodes.append(("out", body))
    if stop:
        raise ValueError(f"template ends before {{{{ {'/'.join(stop)} }}}}")
    return nodes, i


def _run(nodes, scopes: list[dict], dot, out: list[str]) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "out":
            value = _eval(node[1], scopes, dot)
            out.append(value if isinstance(value, str) else str(value))
        elif node[0] == "set":
            _, name, pipe, declare = node
            value = _eval(pipe, scopes, dot)
            if declare:
                scopes[-1][name] = value
            else:
                next(s for s in reversed(scopes) if name in s)[name] = value
        elif node[0] == "if":
            for pipe, block in node[1]:
                if _truth(_eval(pipe, scopes, dot)):
                    _run(block, scopes + [{}], dot, out)
                    break
            else:
                _run(node[2], scopes + [{}], dot, out)
        else:  # range
            _, names, pipe, block = node
            for index, item in enumerate(_eval(pipe, scopes, dot)):
                scope = dict(zip(names, (index, item))) if len(names) == 2 else dict(zip(names, (item,)))
                _run(block, scopes + [scope], item, out)


def _eval(pipe: str, scopes, dot):
    return _call(_tokens(pipe), scopes, dot)


def _tokens(text: str) -> list:
    """Nested lists for parentheses; each leaf a string token."""
    stack: list[list] = [[]]
    for m in _TOKEN.finditer(text):
        string, open_, close, word = m.groups()
        if open_:
            stack.append([])
        elif close:
            inner = stack.pop()
            stack[-1].append(inner)
        elif string or word:
            stack[-1].append(string or word)
    return stack[0]


FUNCTIONS = {
    "eq": lambda a, *b: any(a == x for x in b), "ne": lambda a, b: a != b, "not": lambda a: not _truth(a),
    "len": len, "slice": lambda a, *ix: a[ix[0]:ix[1]] if len(ix) == 2 else a[ix[0]:] if ix else a,
}


def _call(tokens: list, scopes, dot):
    head, args = tokens[0], tokens[1:]
    if head in ("and", "or"):  # short-circuit; the value of the deciding argument, as in Go
        value = None
        for arg in args:
            value = _operand(arg, scopes, dot)
            if _truth(value) != (head == "and"):
                break
        return value
    if head in FUNCTIONS:
        return FUNCTIONS[head](*(_operand(a, scopes, dot) for a in args))
    if args:
        raise ValueError(f"unknown function {head!r}")
    return _operand(head, scopes, dot)


def _operand(token, scopes, dot):
    if isinstance(token, list):
        return _call(token, scopes, dot)
    if token.startswith('"'):
        return json.loads(token)
    if re.fullmatch(r"-?\d+", token):
        return int(token)
    if token.startswith("$"):
        name, _, path = token.partition(".")
        value = next(s[name] for s in reversed(scopes) if name in s)
    elif token.startswith("."):
        value, path = dot, token[1:]
    else:
        raise ValueError(f"unknown operand {token!r}")
    for field in filter(None, path.split(".")):
        value = value[field[0].lower() + field[1:]] if isinstance(value, dict) and field not in value \
            else value[field]
    return value


def _truth(value) -> bool:
    return bool(value)  # Go: false, 0, "", nil and empty collections are false; so are Python's
