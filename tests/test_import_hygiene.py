"""elite_core never loads UI code; the UI never loads torch at start-up (checked in fresh interpreters)."""

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import elite_core

REPO_ROOT = Path(__file__).resolve().parents[1]

UI_MODULES = ("textual", "plotext", "textual_plotext", "rich", "elite_tui")
HEAVY_MODULES = ("torch", "transformers", "peft")


def _loaded_after_import(module: str) -> set[str]:
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_no_core_module_imports_ui_code():
    names = [f"elite_core.{m.name}" for m in pkgutil.iter_modules(elite_core.__path__)]
    assert len(names) >= 8
    code = ("import importlib, json, sys\n"
            f"for name in {names!r}: importlib.import_module(name)\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(json.loads(out.splitlines()[-1]))
    leaked = {m for m in loaded if m.split(".")[0] in UI_MODULES}
    assert not leaked, f"elite_core pulled in UI modules: {sorted(leaked)[:5]}"


def test_ui_start_up_does_not_import_torch():
    for module in ("elite_tui.cli", "elite_tui.app"):
        loaded = _loaded_after_import(module)
        heavy = {m for m in loaded if m.split(".")[0] in HEAVY_MODULES}
        assert not heavy, f"{module} imports {sorted(heavy)[:5]} at start-up"


def test_import_linter_contract_holds():
    # Through this interpreter, not the `lint-imports` script: wheels installed with --target have no scripts on PATH.
    code = "from importlinter.cli import lint_imports_command; lint_imports_command()"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout
