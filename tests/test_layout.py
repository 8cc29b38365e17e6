"""The package's layout, read from the real source with `ast` (imports inside functions included): one
concern per folder, no import circle, floors that import only downward, and modules short enough to read;
scripts that are thin shells over the installed package."""

from __future__ import annotations

import ast
from pathlib import Path

import qlora_loop

PACKAGE = Path(qlora_loop.__file__).resolve().parent
ROOT = Path(__file__).resolve().parents[1]
# Lower floors never import higher ones; concerns on one floor never import each other. Modules at the
# top of the package not named here (run, cli) put the concerns together and may import any of them.
FLOORS = [{"qlora_loop.errors", "qlora_loop.paths", "qlora_loop.files", "qlora_loop.cpu", "qlora_loop.config",
           "qlora_loop.manifest"},
          {"qlora_loop.model"}, {"qlora_loop.data"}, {"qlora_loop.training"},
          {"qlora_loop.observe", "qlora_loop.forgetting", "qlora_loop.use"}, {"qlora_loop.eval"}]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """The qlora_loop modules `path` imports anywhere in it; `from package import module` names the module."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known}
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path, set(found)) for name, path in found.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def owner(module: str) -> str:
    """The concern a module belongs to: its subpackage (qlora_loop.data), or itself at the top."""
    parts = module.split(".")
    return ".".join(parts[:2])


def floor(module: str) -> int | None:
    return next((i for i, names in enumerate(FLOORS) if owner(module) in names), None)


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_import_reader_sees_lazy_and_module_imports():
    edges = graph()
    assert "qlora_loop.data.cache" in edges["qlora_loop.data.mixtures"]  # import qlora_loop.data.cache
    assert "qlora_loop.run" in edges["qlora_loop.bench.ours"]
    assert len(edges) > 40 and all(name.startswith("qlora_loop") for name in edges)


def test_no_import_circle():
    assert find_cycle(graph()) is None, f"import circle: {' -> '.join(find_cycle(graph()))}"


def test_floors_import_only_downward():
    wrong = [f"{a} imports {b}" for a, targets in graph().items() for b in sorted(targets)
             if floor(a) is not None and floor(b) is not None and owner(a) != owner(b)
             and (floor(b) > floor(a) or floor(b) == floor(a) > 0)]  # the floor's own modules may use each other
    assert wrong == []


def test_train_use_and_forgetting_import_none_of_each_other():
    separate = {"qlora_loop.training", "qlora_loop.use", "qlora_loop.forgetting"}
    crossing = [f"{a} imports {b}" for a, targets in graph().items() for b in sorted(targets)
                if owner(a) in separate and owner(b) in separate and owner(a) != owner(b)]
    assert crossing == []


def test_a_small_top_and_folders_by_concern():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 12, top
    folders = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py") if p.parent.name != "bench")
    assert len(folders) >= 4, folders
    loose = sorted({p.parent.name for p in PACKAGE.glob("*/*.py")} - set(folders) - {"bench"})
    assert loose == []  # every folder of modules is a package


def test_no_module_over_400_lines():
    long = {name: n for name, path in modules().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > 400}
    assert long == {}


def parameters(function: ast.FunctionDef) -> list[str]:
    """A function's parameters as a caller gives them (self and cls are not given)."""
    a = function.args
    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
    return names[1:] if names[:1] in (["self"], ["cls"]) else names


def test_no_public_function_takes_more_than_8_parameters():
    """Builders take their config section (build_datasets(tokenizer, cfg.data, ...)) rather than its
    fields one by one: a call with a dozen keywords is where two swapped values go unnoticed."""
    long = [f"{name}.{node.name}({len(parameters(node))})" for name, path in modules().items()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_")
            and len(parameters(node)) > 8]
    assert long == []


def test_the_parameter_counter_counts_keywords_and_skips_self():
    method = ast.parse("class A:\n    def f(self, a, /, b, *, c, d=1): pass").body[0].body[0]
    assert parameters(method) == ["a", "b", "c", "d"]


def test_scripts_run_on_the_installed_package_without_touching_sys_path():
    """`pip install -e .` puts this checkout's package on the path; a script that edits sys.path would
    import another copy than the one installed, and tests would not see it."""
    assert (ROOT / "scripts" / "train.py").is_file()
    editing = [str(path.relative_to(ROOT)) for path in sorted([*ROOT.glob("scripts/*.py"), *ROOT.glob("tests/*.py")])
               for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
               if isinstance(node, ast.Attribute) and ast.unparse(node) in ("sys.path.insert", "sys.path.append")]
    assert editing == []
