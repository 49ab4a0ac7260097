"""The package's imports run one way: entry points -> job layer -> pipeline -> engines, with no import running
back up and no circle below the entry points; the error classes load without torch."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "simple_generation"
ENTRY_POINTS = {"__init__", "__main__", "cli", "app", "cluster", "generator", "vlm"}  # the façade is one of them
JOBS = {"jobs"}
PIPELINE = {"pipeline"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> set[str]:
    """The package's modules that ``name`` imports anywhere (function bodies included, ``TYPE_CHECKING``
    blocks left out: they never run)."""
    path = MODULES[name]
    package = name.split(".") if path.name == "__init__.py" and name != "__init__" else name.split(".")[:-1]
    tree = ast.parse(path.read_text())
    skipped = {id(node) for guard in ast.walk(tree) if isinstance(guard, ast.If)
               and "TYPE_CHECKING" in ast.unparse(guard.test) for body in guard.body for node in ast.walk(body)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
            elif (node.module or "").startswith("simple_generation"):
                base = []
            else:
                continue
            target = [*base, *(node.module or "").removeprefix("simple_generation").strip(".").split(".")]
            target = [part for part in target if part]
            candidates = [".".join(target)] + [".".join([*target, alias.name]) for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name.removeprefix("simple_generation").strip(".") for alias in node.names
                          if alias.name.startswith("simple_generation")]
        else:
            continue
        found.update(c or "__init__" for c in candidates if (c or "__init__") in MODULES)
    found.discard(name)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def _layer_violations(lower: set[str], upper: set[str]) -> list[str]:
    return sorted(f"{module} imports {target}" for module in lower for target in GRAPH[module] & upper)


def test_nothing_below_the_entry_points_imports_them():
    below = set(MODULES) - ENTRY_POINTS
    assert _layer_violations(below, ENTRY_POINTS) == []


def test_nothing_below_the_job_layer_imports_it_or_the_pipeline_upward():
    assert _layer_violations(set(MODULES) - ENTRY_POINTS - JOBS, JOBS) == []
    assert _layer_violations(set(MODULES) - ENTRY_POINTS - JOBS - PIPELINE, PIPELINE) == []


def test_engines_import_no_layer_above_them():
    engines = {name for name in MODULES if name.startswith("engines")}
    assert _layer_violations(engines, ENTRY_POINTS | JOBS | PIPELINE) == []


def test_loading_never_imports_the_generator():
    for name in ("loading", "model_options"):
        assert "generator" not in GRAPH[name]


def test_errors_import_nothing_of_the_package():
    assert GRAPH["errors"] == set()


def test_no_import_circle_below_the_entry_points():
    below = {name: GRAPH[name] - ENTRY_POINTS for name in set(MODULES) - ENTRY_POINTS}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = 1
        for target in sorted(below.get(name, ())):
            if state.get(target) == 1:
                return [*path[path.index(target):], target] if target in path else [*path, target]
            if target not in state:
                circle = visit(target, [*path, target])
                if circle:
                    return circle
        state[name] = 2
        return None

    for name in sorted(below):
        if name not in state:
            circle = visit(name, [name])
            assert circle is None, " -> ".join(circle)


def test_the_errors_load_without_torch():
    """The CLI imports its UsageError before it knows whether a model is needed."""
    code = "import sys, simple_generation.errors; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_error_classes_keep_their_built_in_bases_and_old_import_paths():
    import simple_generation
    from simple_generation import errors, loading, scheduling, store
    from simple_generation.io import InputError

    assert issubclass(errors.StoreError, ValueError) and issubclass(errors.InputError, ValueError)
    assert issubclass(errors.BatchGenerationError, RuntimeError) and issubclass(errors.ModelLoadError, OSError)
    assert issubclass(errors.DistributedGenerationError, errors.BatchGenerationError)
    assert issubclass(errors.NoEngineError, ValueError)
    for interruption in (errors.GenerationInterrupted, errors.Terminated):  # never caught by `except Exception`
        assert issubclass(interruption, KeyboardInterrupt) and not issubclass(interruption, Exception)
    for name in ("StoreError", "InputError", "BatchGenerationError", "ModelLoadError", "UsageError", "BatchFailed"):
        assert issubclass(getattr(errors, name), errors.SimpleGenerationError), name
    assert store.StoreError is errors.StoreError and InputError is errors.InputError
    assert loading.ModelLoadError is simple_generation.ModelLoadError is errors.ModelLoadError
    assert scheduling.BatchGenerationError is simple_generation.BatchGenerationError is errors.BatchGenerationError
    assert simple_generation.GenerationInterrupted is errors.GenerationInterrupted
    assert simple_generation.DistributedGenerationError is errors.DistributedGenerationError
