"""The package layout keeps its promises: no import cycles, the toy world outside the core, private transformers API
in one module, and the draft's modeling file free of backend code.

The import graph is read from the source (every `import` statement, function-level ones included, `if
TYPE_CHECKING:` blocks excluded), at module granularity."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import specvlm_hf

PACKAGE = Path(specvlm_hf.__file__).parent
ROOT = "specvlm_hf"


def _module_name(path: Path) -> str:
    parts = [ROOT, *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            yield from (
                n for child in node.orelse for n in _imports(ast.Module(body=[child], type_ignores=[]))
            )
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _imports(node)


def _edges(name: str, path: Path) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in _imports(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names
            ]
        out |= {t for t in targets if t in MODULES and t != name}
    return out


GRAPH = {name: _edges(name, path) for name, path in MODULES.items()}


def test_the_graph_sees_the_edges_it_must():
    assert (
        "specvlm_hf.generation.routing" in GRAPH["specvlm_hf.draft.modeling_specvlm"]
    )  # bind() routes generate
    assert "specvlm_hf.backends" in GRAPH["specvlm_hf.generation.prefill"]


def test_no_import_cycles():
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycle.extend(stack[stack.index(nxt) :] + [node, nxt] if nxt in stack else [node, nxt])
                return True
            if nxt not in state and visit(nxt, stack + [node]):
                return True
        state[node] = 2
        return False

    for module in sorted(GRAPH):
        if module not in state and visit(module, []):
            break
    assert not cycle, " -> ".join(cycle)


def test_the_core_never_imports_the_toy_world():
    outside = [m for m in GRAPH if not m.startswith(f"{ROOT}.toy") and m != f"{ROOT}.cli"]
    offenders = {m: sorted(t for t in GRAPH[m] if t.startswith(f"{ROOT}.toy")) for m in outside}
    assert not {m: t for m, t in offenders.items() if t}


# private transformers API the project relies on (see hf_private's docstring)
PRIVATE_API = re.compile(
    r"_get_candidate_generator|_assisted_decoding|activate_past_recording|cumulative_length|"
    r"register_forward_pre_hook\(hook, with_kwargs|layer\.keys\s*=|from transformers[.\w]* import _"
)


def test_private_transformers_api_lives_in_one_module():
    users = sorted(name for name, path in MODULES.items() if PRIVATE_API.search(path.read_text()))
    assert users == [f"{ROOT}.hf_private"]


def test_the_modeling_file_holds_the_math_only():
    source = MODULES[f"{ROOT}.draft.modeling_specvlm"].read_text()
    for backend_code in ("packed", "is_grad_enabled", "mkldnn", "few_rows"):
        assert backend_code not in source, backend_code
    assert not any(t.startswith(f"{ROOT}.backends") for t in GRAPH[f"{ROOT}.draft.modeling_specvlm"])


def test_the_readme_code_map_matches_the_tree():
    readme = (PACKAGE.parents[1] / "README.md").read_text()
    section = readme.split("## Code map", 1)[1].split("\n## ", 1)[0]
    mapped = set()
    for cell in re.findall(r"^\| (`[^|]+) \|", section, flags=re.M):
        mapped |= set(re.findall(r"`([\w/]+\.py)`", cell))
    files = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")}
    unmapped = files - mapped - {"_version.py"} - {f for f in files if f.endswith("/__init__.py")}
    assert not unmapped and mapped <= files, (sorted(unmapped), sorted(mapped - files))
