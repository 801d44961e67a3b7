"""Dependencies point one way: launch.py -> app -> trainer. The engine never imports the UI or gradio; the app and
the CLI use only trainer's public API (the names in trainer.__all__); nothing imports in a circle; tools/ imports
neither tests/ nor the training loop."""
import ast
from pathlib import Path

import trainer

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = ("app", "gradio", "launch")
# the CLI is a consumer of the engine like the app: it may use only the public API too
CLI_FILES = [ROOT / "trainer" / "__main__.py", ROOT / "trainer" / "adapters" / "cli.py",
             ROOT / "trainer" / "caption" / "cli.py", ROOT / "trainer" / "queue" / "cli.py"]


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, level) of every import statement, module-level or inside functions."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.module or "", [alias.name for alias in node.names], node.level))
    return out


def imported_modules(path: Path) -> list[str]:
    return [module for module, _, level in imports(path) if level == 0 and module]


def private_api_uses(path: Path, allowed: tuple[str, ...] = ()) -> list[str]:
    """Every import of trainer that is not `from trainer import <public name>` (or of an `allowed` module)."""
    bad = []
    for module, names, level in imports(path):
        if module in allowed:
            continue
        if level and ROOT / "trainer" in path.parents:  # inside trainer/, a relative import is a private one
            bad.append(f"relative import from {'.' * level}{module} (import from trainer instead)")
        elif module == "trainer":
            bad += [f"trainer.{n} is not in trainer.__all__" for n in names if n not in trainer.__all__]
        elif module.startswith("trainer."):
            bad.append(f"{module} (import {', '.join(names) or 'it'} from trainer's public API instead)")
    return bad


def test_trainer_imports_neither_app_nor_gradio():
    files = sorted((ROOT / "trainer").rglob("*.py"))
    assert len(files) > 3, "the trainer package was not found"
    bad = [f"{f.relative_to(ROOT)} imports {name}" for f in files for name in imported_modules(f)
           if name.split(".")[0] in FORBIDDEN]
    assert not bad, "trainer/ must not depend on the UI:\n" + "\n".join(bad)


def test_the_checker_sees_every_import_form(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text("import gradio as gr\nfrom app.main import build_app\ndef f():\n    import app.tabs\n")
    assert [n.split(".")[0] for n in imported_modules(sample)] == ["gradio", "app", "app"]


def test_app_and_cli_use_only_the_public_api():
    files = sorted((ROOT / "app").rglob("*.py")) + CLI_FILES
    cli = ("trainer.adapters.cli", "trainer.caption.cli", "trainer.queue.cli")  # the CLI's files register each other's commands
    bad = [f"{f.relative_to(ROOT)}: {problem}" for f in files
           for problem in private_api_uses(f, cli if f in CLI_FILES else ())]
    assert not bad, "\n".join(bad)


def test_the_public_api_check_fails_on_private_names(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text("from trainer.loop import _mix\nfrom trainer import load_adapter, _secret\n"
                      "def f():\n    from trainer import runs\n")
    assert private_api_uses(sample) == ["trainer.loop (import _mix from trainer's public API instead)",
                                        "trainer._secret is not in trainer.__all__",
                                        "trainer.runs is not in trainer.__all__"]


def test_every_public_name_resolves():
    for name in trainer.__all__:
        assert getattr(trainer, name) is not None, name
    assert not set(trainer.__all__) & {p.stem for p in (ROOT / "trainer").glob("*.py")}, \
        "a public name equal to a submodule's would be shadowed by it once the module is imported"


def module_graph(package_root: Path, package: str) -> dict[str, set[str]]:
    """module -> the modules of the same package it imports, inside functions too: a lazy import hides a circle,
    it does not remove it (the engine's formats <-> models.meta <-> formats.check circle hid so)."""
    paths = {".".join(p for p in path.relative_to(package_root.parent).with_suffix("").parts if p != "__init__"): path
             for path in package_root.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                base = name.rsplit(".", node.level)[0] if node.level else ""
                if path.name == "__init__.py" and node.level:
                    base = name if node.level == 1 else name.rsplit(".", node.level - 1)[0]
                target = ".".join(x for x in (base, node.module or "") if x)
                # `from . import runs` and `from .formats import names` name modules, not the package
                deps |= {f"{target}.{a.name}" if f"{target}.{a.name}" in paths else target for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {alias.name for alias in node.names}
        # importing pkg.sub.mod runs pkg.sub's __init__ first: the importer depends on each package above the module
        # (but its own packages, already being imported)
        deps |= {parent for d in deps for parent in _parents(d) if parent in paths and not name.startswith(parent)}
        graph[name] = {d for d in deps if d.split(".")[0] == package and d != name}
    return graph


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:k]) for k in range(2, len(parts))]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path + [nxt]
            if nxt in graph and not state.get(nxt):
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if not state.get(node):
            found = visit(node, [node])
            if found:
                return found
    return None


def test_no_import_cycles():
    for package in ("app", "trainer"):
        cycle = find_cycle(module_graph(ROOT / package, package))
        assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_one():
    assert find_cycle({"app.a": {"app.b"}, "app.b": {"app.a"}}) == ["app.a", "app.b", "app.a"]


def test_the_graph_counts_a_package_init_that_a_submodule_import_runs(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import a\n")
    (pkg / "sub" / "a.py").write_text("def f():\n    from pkg import b\n")
    (pkg / "sub" / "c.py").write_text("")
    (pkg / "b.py").write_text("from pkg.sub.c import x\n")  # runs pkg/sub/__init__, which imports a
    assert find_cycle(module_graph(pkg, "pkg")) is not None


def test_the_graph_counts_imports_inside_functions(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n    return x\n")
    assert find_cycle(module_graph(pkg, "pkg")) == ["pkg.a", "pkg.b", "pkg.a"]


def test_tools_import_neither_tests_nor_the_training_loop():
    def from_tests(name: str) -> bool:  # tests/tiny.py would be imported as `tiny`
        top = name.split(".")[0]
        return top == "tests" or ((ROOT / "tests" / f"{top}.py").exists() and not (ROOT / "tools" / f"{top}.py")
                                  .exists())

    bad = [f"{f.name} imports {name}" for f in sorted((ROOT / "tools").glob("*.py")) for name in imported_modules(f)
           if from_tests(name) or name == "trainer.loop"]
    bad += [f"{f.name} puts tests/ on sys.path" for f in sorted((ROOT / "tools").glob("*.py"))
            if '"tests"' in f.read_text(encoding="utf-8")]
    assert not bad, "\n".join(bad)


def test_no_function_in_the_app_is_over_60_lines():
    long = []
    for path in sorted((ROOT / "app").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} "
                            f"({node.end_lineno - node.lineno + 1} lines)")
    assert not long, "\n".join(long)


def test_nothing_outside_the_models_names_a_family():
    """The family seam: trainer/models owns what differs; nothing else compares family names or hard-codes a
    family's text encoders (help texts and messages may mention them; code may not branch on them)."""
    import re
    names = re.compile(r"""["'](sd1|sd2|sdxl)["']|family\.name\s*[!=]=|["']lora_te[12]["']""")
    files = [p for p in sorted((ROOT / "trainer").rglob("*.py")) if "models" not in p.relative_to(ROOT).parts]
    files += sorted((ROOT / "app").rglob("*.py"))
    bad = [f"{f.relative_to(ROOT)}:{i}: {line.strip()}" for f in files
           for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1) if names.search(line)]
    assert not bad, "\n".join(bad)


def test_the_family_grep_sees_a_branch(tmp_path):
    import re
    names = re.compile(r"""["'](sd1|sd2|sdxl)["']|family\.name\s*[!=]=|["']lora_te[12]["']""")
    assert names.search('if base.family.name == "sdxl":') and names.search("prefix = 'lora_te2'")
    assert not names.search("help='SDXL has two text encoders'")
