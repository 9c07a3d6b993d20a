"""pyfused_po's modules import each other without cycles, and no stage imports a higher one.

The graph is read statically from the source with ``ast``: every ``import`` and
``from ... import`` statement counts, wherever it sits (a function-level import is a
dependency too, only a later one).  ``from .pkg import name`` is an edge to the submodule
``pkg.name`` when that is a module, else to ``pkg`` (its ``__init__``).  The implicit
import of a module's parent packages is not an edge: Python runs those first whatever
the order.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "pyfused_po"
KERNELS = ROOT.parent / "kernels"
PACKAGE = "pyfused_po"

# Stage ranks (docs/architecture.md, "Import order"): an edge may only go to an equal or
# lower rank.  Modules not listed here are only checked for cycles.
RANKS = {
    # shared infrastructure, importable by every stage
    "pyfused_po.kernels": 0,
    "pyfused_po.validation": 0,
    "pyfused_po._dispatch": 0,
    "pyfused_po.compiled_checks": 0,
    "pyfused_po._backend": 1,
    # the stages, one folder each (a module's stage is its folder)
    "pyfused_po.token": 1,
    "pyfused_po.sequence": 2,
    "pyfused_po.sequence.packed_columns": 3,  # the token stage's view of a packed batch, for the modules
    "pyfused_po.sequence.preference_batch": 3,
    "pyfused_po.sequence.kto_batch": 3,
    "pyfused_po.distributed": 3,
    "pyfused_po.objectives": 3,
    "pyfused_po.plans": 4,
    "pyfused_po.modules": 5,
    "pyfused_po.integrations": 6,
    "pyfused_po.testing": 7,
}


def _modules():
    """``{dotted name: path}`` for every module of the package, ``kernels/`` (installed as
    ``pyfused_po.kernels``) included."""
    found = {}
    for root, prefix in ((ROOT, (PACKAGE,)), (KERNELS, (PACKAGE, "kernels"))):
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if "__pycache__" in parts or (root == ROOT and parts[0] == "kernels"):
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(prefix + parts)] = path
    return found


def _resolve(module, level, target, is_package):
    if level == 0:
        return target
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_graph():
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, node.level, node.module, is_package)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                # `import pyfused_po.a.b` names the deepest module that exists
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in modules and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def _cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _rank(module):
    while module not in RANKS and "." in module:
        module = module.rsplit(".", 1)[0]
    return RANKS.get(module)


def test_graph_sees_the_package():
    graph = import_graph()
    assert "pyfused_po.token.token_logprobs" in graph and "pyfused_po.kernels.token_launch" in graph
    assert "pyfused_po.token.token_logprobs" in graph["pyfused_po.token.linear_token_logprobs"]
    assert "pyfused_po.distributed.vocab_parallel" in graph["pyfused_po.distributed"]


def test_no_import_cycles():
    assert _cycles(import_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_stage_imports_a_higher_one():
    upward = [(a, b) for a, edges in import_graph().items() for b in edges
              if _rank(a) is not None and _rank(b) is not None and _rank(b) > _rank(a)]
    assert upward == []


def test_every_dispatched_entry_is_registered_by_the_package():
    """The lower modules look these up by name (pyfused_po._dispatch); importing the package
    (and its integrations) must register every one of them."""
    import pyfused_po  # noqa: F401
    import pyfused_po.integrations  # noqa: F401
    from pyfused_po import _dispatch

    names = set()
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "entry"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "_dispatch"):
                names.add(node.args[0].value)
    assert names >= {"vocab_parallel_token_logprobs", "compiled_token_logprobs", "packed_sequence_sums"}
    assert names <= set(_dispatch._ENTRIES)
