"""The code's structure, read from its own source: imports point down (no circle among module-level imports),
a small top level, run paths in one module, and one shape for every stage."""

from __future__ import annotations

import ast
import importlib
import inspect
import typing
from pathlib import Path

import almost_ray

PACKAGE = Path(almost_ray.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_level_imports(path: Path, known: set[str]) -> set[str]:
    """The almost_ray modules `path` imports when it is imported: statements at module level (a function's
    imports run later and cannot close a circle at import time). `from pkg import mod` names the module."""
    found: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("almost_ray"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return {m for m in found if m in known}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    graph = {name: module_level_imports(path, known) for name, path in files.items()}
    for name in list(graph):  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
        parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        graph[name] |= {p for p in parents if p in known and p != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of two or more modules (Tarjan), or one that imports itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == node:
                    break
            if len(group) > 1 or node in graph.get(node, ()):
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_module_level_imports_have_no_circle():
    graph = import_graph()
    assert len(graph) > 60 and "almost_ray.config" in graph["almost_ray.cli"]
    assert circles(graph) == []


def test_stages_never_import_the_pipeline_or_the_report():
    graph = import_graph()
    stages = [m for m in graph if m.count(".") and m.split(".")[1] in ("synth", "train", "rmsp", "rl", "eval", "generate", "serve")]
    assert stages
    wrong = {m: sorted(d for d in graph[m] if d.startswith(("almost_ray.pipeline", "almost_ray.cli"))) for m in stages}
    assert {m: d for m, d in wrong.items() if d} == {}


def test_few_modules_at_the_top():
    top = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert top == ["cli.py", "config.py", "config_base.py"]


RUN_FOLDERS = {"rm", "sft", "ppo", "rmsp", "eval_rm", "queries", "compare", "report", "response_tuning",
               "single_task", "rmsp-compare", "rmsp-plain", "ppo_openrlhf", "dpo", "ppo_grpo", "rm_score"}


def run_path_literals(path: Path) -> list[str]:
    """`<folder> / "model"` and `run_dir / "<stage folder>"` spelled out: a run path that is not paths.py's."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            right = node.right.value if isinstance(node.right, ast.Constant) else None
            left = node.left.right.value if isinstance(node.left, ast.BinOp) and isinstance(
                node.left.right, ast.Constant) else None
            if right == "model" and left in RUN_FOLDERS:
                found.append(f"{path.name}:{node.lineno}: {left}/model")
            elif right in RUN_FOLDERS and "run_dir" in ast.unparse(node.left):
                found.append(f"{path.name}:{node.lineno}: run_dir / {right!r}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if any(f"{f}/model" in node.value for f in ("rm", "sft", "ppo")) and " " not in node.value:
                found.append(f"{path.name}:{node.lineno}: {node.value!r}")
    return found


def test_the_path_finder_finds_a_spelled_out_run_path(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('x = cfg.run_dir / "rm" / "model"\ny = run_dir / "ppo"\nz = "runs/demo/sft/model"\n')
    assert len(run_path_literals(bad)) == 4  # rm/model counted as both forms


def test_run_paths_live_in_the_paths_module_only():
    home = PACKAGE / "runs" / "paths.py"
    found = [f for p in sorted(PACKAGE.rglob("*.py")) if p != home for f in run_path_literals(p)]
    assert found == []


def stage_modules() -> list:
    from almost_ray.cli import COMMANDS
    from almost_ray.pipeline.loop import EVERY

    modules = {importlib.import_module(m) for m in COMMANDS.values()}
    modules |= {inspect.getmodule(s.work) for s in EVERY}
    return sorted(modules, key=lambda m: m.__name__)


def test_every_stage_has_the_one_shape():
    from almost_ray.config import Config
    from almost_ray.runs.stage import Stage

    modules = stage_modules()
    assert len(modules) >= 12
    for module in modules:
        assert isinstance(module.STAGE, Stage), module.__name__
        assert module.STAGE.work.__module__ == module.__name__  # the module's STAGE is the one that does its work
        hints = typing.get_type_hints(module.run)
        assert list(inspect.signature(module.run).parameters) == ["cfg"], module.__name__
        assert hints == {"cfg": Config, "return": Path}, module.__name__


def test_the_pipeline_runs_the_stages_in_the_data_flow_order():
    from almost_ray.pipeline.loop import PIPELINE, pipeline

    almost = ["queries", "compare", "train_rm", "eval_rm", "rmsp", "train_sft", "ppo", "eval", "report"]
    assert [s.name for s in PIPELINE] == [s.name for s in pipeline()] == almost
    # the optional stages in their place: after what they read, before what reads them
    assert [s.name for s in pipeline(["rm_score", "ppo_grpo", "train_dpo"])] == [
        "queries", "compare", "train_rm", "eval_rm", "rmsp", "train_sft", "train_dpo", "ppo", "ppo_grpo", "eval",
        "rm_score", "report"]
