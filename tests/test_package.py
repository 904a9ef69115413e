"""The package's face: no import circle between its modules, and a command line that starts without torch."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "trl_agent_distill"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(tree: ast.AST):
    """Import statements that run: anywhere in the module, functions included, but not under `if TYPE_CHECKING:`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (a name imported from a package is an edge to its submodule)."""
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in runtime_imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                source = ".".join(part for part in (base if node.level else "", node.module or "") if part)
                targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in files else source
                           for alias in node.names]
            graph[name] |= {target for target in targets if target in files and target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert "trl_agent_distill.agent.backends" in graph["trl_agent_distill.agent.loop"]  # from .backends import
    assert "trl_agent_distill.tasks" in graph["trl_agent_distill.envs.toy"]  # from ..tasks import
    assert "trl_agent_distill.generation" in graph["trl_agent_distill.cli"]  # inside a function
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_circle_between_the_packages_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          cwd=ROOT)


def test_help_loads_no_torch_and_prints_no_warning():
    result = run_python(
        "import sys, time\nfrom trl_agent_distill.cli import main\nstarted = time.monotonic()\n"
        "try:\n    main(['--help'])\nexcept SystemExit as exit_:\n    code = exit_.code\n"
        "print('loaded:', [name for name in ('torch', 'transformers', 'bitsandbytes') if name in sys.modules])\n"
        "print('seconds:', time.monotonic() - started)\nsys.exit(code)"
    )
    assert result.returncode == 0, result.stderr
    assert "loaded: []" in result.stdout and "usage: trl-agent-distill" in result.stdout
    assert all(name in result.stdout for name in ("train", "generate", "eval", "demo", "init-tiny", "--debug"))
    assert float(result.stdout.split("seconds:")[1]) < 1.0
    assert result.stderr == ""


@pytest.mark.parametrize("command", ["train", "cache-teacher", "generate", "eval", "demo", "init-tiny"])
def test_every_command_has_its_own_help(command):
    result = run_python(f"from trl_agent_distill.cli import main\nmain([{command!r}, '--help'])")
    assert result.returncode == 0, result.stderr
    assert f"usage: trl-agent-distill {command}" in result.stdout


def test_the_package_face_is_lazy_and_complete():
    import trl_agent_distill

    result = run_python("import sys, trl_agent_distill\nprint('torch' in sys.modules)")
    assert result.stdout.strip() == "False", result.stderr
    for name in trl_agent_distill.__all__:
        assert getattr(trl_agent_distill, name) is not None
    assert set(trl_agent_distill.__all__) <= set(dir(trl_agent_distill))
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        trl_agent_distill.nonsense  # noqa: B018 - the attribute access is the test
