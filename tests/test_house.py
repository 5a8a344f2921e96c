"""The package's tiers: imports only go down, Lightning stays above the pure code, no cycle, small files.

Tier of each module (DESIGN.md):
  0  the model and the quantized layers (torch only)
  1  generation, losses, merge math
  2  files: checkpoints, Hugging Face conversion, tokenizers
  3  Lightning: data modules, LightningModules, callbacks, the LightningCLI wiring
  4  commands and the command line
"""

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, Optional, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "picogpt_lightning"

# module-name prefix -> tier; the longest matching prefix decides
TIERS = {
    "picogpt_lightning": 0,  # the package's face: PicoGPT and PicoGPTConfig
    "picogpt_lightning.errors": 0,
    "picogpt_lightning.textfiles": 0,
    "picogpt_lightning.atomic": 0,
    "picogpt_lightning.stop_signals": 0,
    "picogpt_lightning.model": 0,
    "picogpt_lightning.quant": 0,
    "picogpt_lightning.generation": 1,
    "picogpt_lightning.losses": 1,
    "picogpt_lightning.merge": 1,
    "picogpt_lightning.lora": 1,
    "picogpt_lightning.checkpoints": 2,
    "picogpt_lightning.hf": 2,
    "picogpt_lightning.hf_config": 2,
    "picogpt_lightning.hf_folder": 2,
    "picogpt_lightning.tokenizer_format": 2,
    "picogpt_lightning.hf_adapter": 2,
    "picogpt_lightning.gguf_export": 2,
    "picogpt_lightning.tokenizer": 2,
    "picogpt_lightning.corpus": 2,
    "picogpt_lightning.data": 3,
    "picogpt_lightning.modules": 3,
    "picogpt_lightning.callbacks": 3,
    "picogpt_lightning.checkpoint_io": 3,
    "picogpt_lightning.lightning_cli": 3,
    "picogpt_lightning.trainer_checks": 3,
    "picogpt_lightning.resume": 3,
    "picogpt_lightning.commands": 4,
    "picogpt_lightning.cli": 4,
    "picogpt_lightning.__main__": 4,
}
# The public API puts decoding and file loading on tier 0's class (DESIGN.md: model.generate,
# PicoGPT.from_checkpoint); these methods import their tier when called, and the cycle check
# below proves that nothing they reach imports the model back.
DOORS = {
    ("picogpt_lightning.model.gpt", "picogpt_lightning.generation"),
    ("picogpt_lightning.model.gpt", "picogpt_lightning.checkpoints"),
}
LIGHTNING_TIER = 3
MAX_FILE_LINES = 350
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: Dict[str, Path] = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def tier_of(module: str) -> int:
    # the face is tier 0 by itself; any other module belongs to the folder or file it lives in
    prefixes = [p for p in TIERS if module == p or (p != "picogpt_lightning" and module.startswith(p + "."))]
    assert prefixes, f"{module} has no tier: add it to TIERS in {Path(__file__).name}"
    return TIERS[max(prefixes, key=len)]


def resolve(module: str, name: str, level: int, imported: Optional[str]) -> str:
    """The module an import statement loads: `from a import b` is a.b when that is a module of its own."""
    if level:
        package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(package[: len(package) - level + 1] + ([name] if name else []))
    else:
        base = name
    if imported and f"{base}.{imported}" in MODULES:
        return f"{base}.{imported}"
    return base


def imports(module: str) -> Iterator[Tuple[str, int]]:
    """(imported module, line) for every import in the file, inside functions too."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                yield resolve(module, node.module or "", node.level, alias.name), node.lineno


def project_edges() -> Dict[str, Set[str]]:
    edges: Dict[str, Set[str]] = {module: set() for module in MODULES}
    for module in MODULES:
        for target, _ in imports(module):
            while target and target not in MODULES and target.startswith("picogpt_lightning"):
                target = target.rpartition(".")[0]  # `from pkg.mod import name`: the module pkg.mod
            if target in MODULES and target != module:
                edges[module].add(target)
    return edges


def test_every_import_goes_down_a_tier_or_stays_on_its_own():
    upward = []
    for module, targets in project_edges().items():
        for target in targets:
            if tier_of(target) > tier_of(module) and (module, target) not in DOORS:
                upward.append(f"{module} (tier {tier_of(module)}) imports {target} (tier {tier_of(target)})")
    assert not upward, "\n".join(sorted(upward))


def test_no_module_below_tier_3_names_lightning_even_inside_a_function():
    found = [
        f"{module}:{line} imports {target}"
        for module in MODULES
        if tier_of(module) < LIGHTNING_TIER
        for target, line in imports(module)
        if target.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric", "torchmetrics")
    ]
    assert not found, "\n".join(found)


def test_no_import_cycle_counting_imports_inside_functions():
    edges = project_edges()
    state: Dict[str, int] = {}  # 1 = on the current path, 2 = done
    path = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(MODULES):
        if module not in state:
            visit(module)


LOADED = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(sys.modules)))
"""


@pytest.mark.parametrize("tier", [0, 1, 2, 3])
def test_a_tier_imported_in_a_fresh_interpreter_loads_nothing_above_it(tier):
    names = [module for module in MODULES if tier_of(module) == tier]
    result = subprocess.run(
        [sys.executable, "-c", LOADED, *names], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True
    )
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    higher = [name for name in loaded if name.startswith("picogpt_lightning") and tier_of(name) > tier]
    assert not higher, f"importing tier {tier} loaded {higher}"
    if tier < LIGHTNING_TIER:
        lightning = [name for name in loaded if name.split(".")[0] in ("lightning", "pytorch_lightning")]
        assert not lightning, f"importing tier {tier} loaded Lightning: {lightning[:5]}"


def test_no_file_of_the_package_is_over_350_lines():
    long_files = {
        str(path.relative_to(ROOT)): lines
        for path in MODULES.values()
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_FILE_LINES
    }
    assert not long_files, long_files


def test_no_function_of_the_package_is_over_60_lines():
    long_functions = {}
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [decorator.lineno for decorator in node.decorator_list])
                if node.end_lineno - start + 1 > MAX_FUNCTION_LINES:
                    long_functions[f"{path.relative_to(ROOT)}:{node.name}"] = node.end_lineno - start + 1
    assert not long_functions, long_functions
