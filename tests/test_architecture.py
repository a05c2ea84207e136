"""The package's shape, as ARCHITECTURE.md states it: stages import only downward, no
import circles, no module over 400 lines, and no import-time side effects."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "xferlearn"
STAGES = {"errors": 0, "_io": 0, "rundir": 0, "runlock": 0, "config": 0, "cli_run": 9,
          "data": 1, "datasets": 1, "models": 2, "evaluation": 3, "training": 4, "deploy": 5, "api": 9, "quickstart": 9,
          "cli": 9}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The xferlearn modules a file imports, lazily or not."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + [node.module] if node.module else base)
            if target.startswith("xferlearn"):
                modules = [f"{target}.{alias.name}" for alias in node.names]
                found |= {m for m in modules if _is_module(m)} or {target}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("xferlearn")}
    return found


def _is_module(name: str) -> bool:
    relative = Path(*name.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").is_file() or (PACKAGE / relative / "__init__.py").is_file()


def stage(module: str) -> int:
    parts = module.split(".")
    return STAGES.get(parts[1], 0) if len(parts) > 1 else 0


GRAPH = {module_name(path): imports(path) for path in PACKAGE.rglob("*.py")}


def test_no_module_imports_a_later_stage():
    upward = sorted((m, t) for m, targets in GRAPH.items() for t in targets if stage(t) > stage(m))
    assert upward == []


def test_no_import_circles():
    def visit(module, path):
        for target in GRAPH.get(module, ()):
            if target in path:
                pytest.fail(f"import circle: {' -> '.join(path[path.index(target):] + [target])}")
            visit(target, path + [target])

    for module in GRAPH:
        visit(module, [module])


def test_modules_stay_readable():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def test_importing_changes_nothing_global():
    """Warning filters, logging levels, PIL's pixel limit and inductor's config are left as
    the user had them after every module is imported."""
    probe = """
import logging, warnings, importlib, pkgutil
import PIL.Image
import torch._inductor.config as inductor
# The libraries' own import-time settings are theirs: import them first.
import lightning.pytorch, timm, torchvision, sklearn.metrics, scipy.special, onnxruntime.quantization, fastapi
import pytorch_grad_cam, matplotlib.figure, rich
before = (list(warnings.filters), logging.getLogger("lightning.pytorch").level, PIL.Image.MAX_IMAGE_PIXELS,
          inductor.freezing)
import xferlearn
for info in pkgutil.walk_packages(xferlearn.__path__, "xferlearn."):
    importlib.import_module(info.name)
after = (list(warnings.filters), logging.getLogger("lightning.pytorch").level, PIL.Image.MAX_IMAGE_PIXELS,
         inductor.freezing)
print(before == after)
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "True", result.stderr[-2000:]
