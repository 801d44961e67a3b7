"""Dependencies point one way: launch.py -> app -> trainer. The engine never imports the UI or gradio."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = ("app", "gradio", "launch")


def imported_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


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


def test_app_imports_only_the_public_trainer_modules():
    """app/ goes through trainer's public modules, never its private helpers (names starting with _)."""
    bad = [f"{f.relative_to(ROOT)} imports {name}" for f in sorted((ROOT / "app").rglob("*.py"))
           for name in imported_modules(f) if name.startswith("trainer") and any(
               part.startswith("_") for part in name.split("."))]
    assert not bad, "\n".join(bad)
