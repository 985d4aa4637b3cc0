"""The import rules of docs/architecture.md, checked on the source so the layout cannot drift.

Every `import` and `from ... import` in d2vcli/ is parsed (at any depth: an import inside a
function is still a dependency), and each rule below names a part and what it must not import.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "d2vcli"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    me = _module_name(path).split(".")
    package = me if path.name == "__init__.py" else me[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            found.add(mod)
            # `from d2vcli import engine` imports the module d2vcli.engine
            found.update(f"{mod}.{alias.name}" for alias in node.names)
    return found


GRAPH = {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _edges(src_prefix: str, dst_prefixes: tuple[str, ...]) -> list[str]:
    bad = []
    for mod, deps in sorted(GRAPH.items()):
        if not _matches(mod, src_prefix):
            continue
        for dep in sorted(deps):
            if any(_matches(dep, d) for d in dst_prefixes):
                bad.append(f"{mod} imports {dep}")
    return bad


STDLIB = set(sys.stdlib_module_names)


def test_the_network_files_import_only_torch():
    """A model file is read (and reused) on its own: no config, no data, no engine."""
    offenders = []
    for mod, deps in sorted(GRAPH.items()):
        if not _matches(mod, "d2vcli.models") or mod == "d2vcli.models.loading":
            continue
        for dep in sorted(deps):
            top = dep.split(".")[0]
            if top in STDLIB or top == "torch" or top == "__future__":
                continue
            if _matches(dep, "d2vcli.models") and not _matches(dep, "d2vcli.models.loading"):
                continue  # one network file may build on another
            offenders.append(f"{mod} imports {dep}")
    assert offenders == []


def test_the_objective_core_imports_no_modality():
    forbidden = ("d2vcli.models", "d2vcli.audio", "d2vcli.data", "d2vcli.engine", "d2vcli.pretrain",
                 "d2vcli.finetune", "d2vcli.prepare", "d2vcli.decode", "d2vcli.vocab", "d2vcli.manifest")
    assert _edges("d2vcli.objective", forbidden) == []


def test_checkpoints_import_nothing_of_engine_decode_or_interop():
    forbidden = ("d2vcli.engine", "d2vcli.decode", "d2vcli.interop", "d2vcli.interop_keys", "d2vcli.interop_hf",
                 "d2vcli.interop_fairseq2", "d2vcli.interop_vision", "d2vcli.pretrain", "d2vcli.finetune",
                 "d2vcli.evaluate", "d2vcli.transcribe", "d2vcli.demo", "d2vcli.cli")
    assert _edges("d2vcli.checkpoint", forbidden) == []
    assert _edges("d2vcli.models.loading", forbidden) == []


@pytest.mark.parametrize("part", ["d2vcli.decode", "d2vcli.interop", "d2vcli.interop_keys", "d2vcli.interop_hf",
                                  "d2vcli.interop_fairseq2", "d2vcli.interop_vision", "d2vcli.transcribe",
                                  "d2vcli.scoring"])
def test_decode_and_interop_do_not_import_the_engine(part):
    assert _edges(part, ("d2vcli.engine", "d2vcli.pretrain", "d2vcli.finetune")) == []


def test_scoring_is_a_leaf_and_decode_does_not_import_evaluate():
    assert _edges("d2vcli.decode", ("d2vcli.evaluate",)) == []
    assert [d for d in sorted(GRAPH["d2vcli.scoring"]) if _matches(d, "d2vcli")
            and not _matches(d, "d2vcli.errors")] == []


def _is_cli(name: str) -> bool:
    """The CLI's files: cli.py, the root app, and the cli_*.py it is split into (sub-apps, shared options)."""
    return _matches(name, "d2vcli.cli") or name.startswith("d2vcli.cli_")


def test_nothing_imports_the_cli():
    assert [f"{mod} imports {dep}" for mod, deps in sorted(GRAPH.items()) if not _is_cli(mod)
            and mod != "d2vcli.__main__" for dep in sorted(deps) if _is_cli(dep)] == []


def test_the_cli_sub_apps_do_not_import_the_root_app():
    """cli.py imports the sub-apps to add them; a sub-app importing cli.py back would be a cycle."""
    assert [f"{mod} imports {dep}" for mod, deps in sorted(GRAPH.items()) if mod.startswith("d2vcli.cli_")
            for dep in sorted(deps) if _matches(dep, "d2vcli.cli")] == []


def test_the_config_helpers_sit_below_the_config_tree():
    """config.py imports config_io (merging, YAML, writing) and config_checks (Config.validate's checks) and
    re-exports config_io's names; either importing config.py back would be an import cycle."""
    assert _edges("d2vcli.config_io", ("d2vcli.config",)) == []
    assert [d for d in sorted(GRAPH["d2vcli.config_checks"]) if _matches(d, "d2vcli")] == []
    assert {"d2vcli.config_io", "d2vcli.config_checks"} <= GRAPH["d2vcli.config"]


@pytest.mark.parametrize("part, user", [("d2vcli.train_settings", "d2vcli.engine"),
                                        ("d2vcli.rng_state", "d2vcli.engine"),
                                        ("d2vcli.finetune_start", "d2vcli.finetune"),
                                        ("d2vcli.finetune_labels", "d2vcli.finetune")])
def test_the_split_out_helpers_sit_below_their_user(part, user):
    """engine.py imports (and re-exports) its precision/batch-unit settings and RNG state, finetune.py its
    starting-checkpoint and label rules; importing them back (or the loop) would be a cycle."""
    assert _edges(part, ("d2vcli.engine", "d2vcli.pretrain", "d2vcli.finetune")) == []
    assert part in GRAPH[user]


def test_the_rules_see_the_real_package():
    """Guards the guard: the parser finds the modules and edges the rules are about."""
    assert "d2vcli.engine" in GRAPH and "d2vcli.objective.teacher" in GRAPH
    assert any(_matches(d, "d2vcli.objective") for d in GRAPH["d2vcli.pretrain"])
    assert "torch" in GRAPH["d2vcli.models.encoder"]
    assert "d2vcli.cli_prepare" in GRAPH["d2vcli.cli"] and "d2vcli.cli_options" in GRAPH["d2vcli.cli_prepare"]
