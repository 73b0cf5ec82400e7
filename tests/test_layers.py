"""The import layers of pyproject.toml's import-linter contract hold (function-level imports included): the folders
harness/core, strategies, training and harness/driver, each importing only from itself and the folders before it."""

from __future__ import annotations

from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contracts_hold(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True) == 0


def test_a_strategy_importing_training_breaks_the_contract(tmp_path):
    """The contract can fail: a copy of the packages where a strategy imports training code is refused."""
    import os
    import shutil
    import subprocess
    import sys

    for package in ("harness", "strategies", "training"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "data"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "strategies" / "ngram.py", "a") as module:
        module.write("\n\ndef _uses_training():\n    from training import zoo\n    return zoo\n")
    result = subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports; "
         "raise SystemExit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "layers: driver > training > strategies > core BROKEN" in result.stdout
    assert "strategies.ngram -> training.zoo" in result.stdout


def test_function_level_imports_of_specsweep_modules_say_why_they_are_lazy():
    """No function-level import dodges a cycle: every one of specsweep's own modules inside a function carries a
    ``# lazy:`` comment (on its line or the line above) naming the heavy dependency it defers."""
    import ast

    offenders = []
    for package in ("harness", "strategies", "training"):
        for path in sorted((ROOT / package).rglob("*.py")):
            source = path.read_text()
            lines = source.splitlines()
            tree = ast.parse(source)
            top_level = {id(node) for node in tree.body}
            for node in ast.walk(tree):
                if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in top_level:
                    continue
                module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                if not module or module.split(".")[0] not in ("harness", "strategies", "training"):
                    continue
                nearby = lines[node.lineno - 1] + (lines[node.lineno - 2] if node.lineno > 1 else "")
                if "# lazy:" not in nearby:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_registries_import_a_method_only_when_it_is_named():
    """lm-eval's lazy registry: naming ``speculative`` imports its module and not the others; an artefact kind's
    training module is imported when the kind is named; unknown names list every choice."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from harness.core.errors import ConfigError\n"
        "from strategies import strategy_class\n"
        "from training.artifacts import artifact_kind\n"
        "assert strategy_class('speculative').name == 'speculative'\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('strategies.methods.', 'training.')))\n"
        "print(loaded)\n"
        "assert artifact_kind('bigram').name == 'bigram' and 'training.eagle' not in sys.modules\n"
        "try:\n"
        "    strategy_class('eagel')\n"
        "except ConfigError as error:\n"
        "    print(error)\n"
        "try:\n"
        "    artifact_kind('eagel')\n"
        "except ConfigError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    loaded, strategy_error, kind_error = result.stdout.strip().splitlines()
    assert "'strategies.methods.speculative'" in loaded and "hf_peers" not in loaded and "cascade" not in loaded
    assert "unknown strategy 'eagel'" in strategy_error and "did you mean 'eagle'?" in strategy_error
    assert "eagle2" in strategy_error and "hf_prompt_lookup" in strategy_error
    assert "unknown artefact kind 'eagel'" in kind_error and "did you mean 'eagle'?" in kind_error
    assert "spadec" in kind_error
