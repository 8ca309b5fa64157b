"""gptfast's modules form layers: no module imports, at its top or inside a function, one that imports it back
(through any chain). Read from the source with ast, nothing imported."""
import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"gptfast": os.path.join(REPO, "gptfast"), "gptfast.kernels": os.path.join(REPO, "kernels")}


def modules():
    """{dotted name: path} of every module of gptfast and gptfast.kernels (a package as its __init__)."""
    found = {}
    for package, folder in PACKAGES.items():
        for name in os.listdir(folder):
            if name.endswith(".py"):
                stem = name[:-3]
                found[package if stem == "__init__" else f"{package}.{stem}"] = os.path.join(folder, name)
    return found


def imported(path, known):
    """The gptfast modules a file imports anywhere in it: `from gptfast.x import y` names gptfast.x.y where y is a
    module, else gptfast.x."""
    targets = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module in known:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & set(known)
            targets |= submodules
            if len(submodules) < len(node.names):  # a name that node.module itself defines
                targets.add(node.module)
    return targets


def find_cycle(graph):
    """One import cycle as a list of modules (first == last), or None."""
    state = {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target, path + [target])):
                return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [module])):
            return cycle
    return None


def test_no_import_cycle():
    known = modules()
    graph = {name: imported(path, known) - {name} for name, path in known.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
