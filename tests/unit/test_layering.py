"""The package's imports run one way, top-down (read from the source with ast, nothing is imported).

    checks, files, quiet  <-  config  <-  ops  <-  parallel  <-  layers, functional  <-  models
        <-  integration, data  <-  strategies  <-  training  <-  inference  <-  train, compare (CLIs)

A module may import from its own room (package) and any room on a lower floor, never from a higher one.
`ops` is pure tensor math: it must not import torch.distributed or megatron either.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "vq_megatron"

FLOORS = [
    ("checks", "files", "quiet"),
    ("config",),
    ("ops",),
    ("parallel",),
    ("layers", "functional"),
    ("models",),
    ("integration", "data"),
    ("strategies",),
    ("training",),
    ("inference",),
    ("train", "compare"),
]
FLOOR_OF = {room: level for level, rooms in enumerate(FLOORS) for room in rooms}


def room_of(module: str) -> str | None:
    """'vq_megatron.ops.sampling.vq' -> 'ops'; None for the package root itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            if node.module == "vq_megatron":      # from vq_megatron import ops
                found += [(node.lineno, f"vq_megatron.{alias.name}") for alias in node.names]
    return found


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        yield path, ".".join(p for p in rel.parts if p != "__init__")


def test_every_room_has_a_floor():
    rooms = {room_of(name) for _, name in modules()} - {None}
    assert rooms <= set(FLOOR_OF), f"rooms without a floor in FLOORS: {sorted(rooms - set(FLOOR_OF))}"


def test_imports_only_point_down():
    wrong = []
    for path, name in modules():
        here = room_of(name)
        if here is None:
            continue
        for line, target in imports(path):
            if not target.startswith("vq_megatron."):
                continue
            there = room_of(target)
            if there != here and FLOOR_OF[there] >= FLOOR_OF[here]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({here}) imports {target} ({there})")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_ops_is_pure_tensor_math():
    wrong = []
    for path, name in modules():
        if room_of(name) != "ops":
            continue
        for line, target in imports(path):
            if target.startswith(("torch.distributed", "megatron", "deepspeed")):
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert not wrong, "ops must be pure torch:\n" + "\n".join(wrong)


def test_the_check_itself_sees_a_wrong_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from vq_megatron.training.trainer import train\nimport torch.distributed as dist\n")
    targets = [t for _, t in imports(bad)]
    assert "vq_megatron.training.trainer" in targets and "torch.distributed" in targets
    assert FLOOR_OF[room_of("vq_megatron.training.trainer")] > FLOOR_OF["ops"]


def test_test_modules_have_unique_names():
    """pytest imports test files by basename (no __init__.py packages): two with one name break collection."""
    names = [p.name for p in (PACKAGE.parent / "tests").rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []
