"""The README and docs/ say only what runs: every command parses as written, the Python example
runs, and the file tree lists the package's files.

Commands are read from the fenced shell blocks (a line ending in a backslash continues on the
next) and from inline code that starts `python -m picogpt_lightning`. Each is parsed with
`--print_config`, which LightningCLI and jsonargparse answer by printing the resolved config and
exiting 0 before anything runs; `--help` lines run as written. One worker process parses them
all, each exactly as `python -m picogpt_lightning ARGS` would (runpy on the package's
`__main__`), so the suite pays Lightning's import once instead of once per command.
"""

import json
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"`((?:python -m picogpt_lightning|picogpt)(?: [^`]*)?)`")
NOT_SHELL = {"python", "yaml", "json"}
HELP = {"--help", "-h"}
# placeholders the docs use for a file of the reader's, each mapped to a real file (a fixture writes them)
PLACEHOLDERS = ("CKPT", "A", "B", "merge.yaml", "prompts.txt", "pairs.jsonl", "my_text.txt")
RECIPE_PLACEHOLDER = "configs/<name>.yaml"


def command_args(line: str) -> list[str] | None:
    """The arguments after `python -m picogpt_lightning` (or `picogpt`) in a shell line, if it runs one."""
    if "picogpt" not in line:
        return None
    tokens = shlex.split(line, comments=True)
    for i, token in enumerate(tokens):
        if token == "picogpt_lightning" and i > 0 and tokens[i - 1] == "-m":
            return tokens[i + 1 :]
    if tokens[:1] == ["picogpt"]:
        return tokens[1:]
    return None


def documented_commands() -> list[tuple[str, list[str]]]:
    commands = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for block in FENCE.finditer(text):
            if block.group(1) in NOT_SHELL:
                continue
            first_line = text[: block.start()].count("\n") + 2
            for offset, line in enumerate(re.sub(r"\\\n", " ", block.group(2)).splitlines()):
                args = command_args(line)
                if args is not None:
                    commands.append((f"{page.name}:{first_line + offset}", args))
        for span in INLINE.finditer(FENCE.sub("", text)):
            commands.append((f"{page.name}:inline", command_args(span.group(1))))
    expanded = []
    for where, args in commands:
        if RECIPE_PLACEHOLDER in args:  # "every recipe": parse each one
            for recipe in recipes():
                expanded.append((f"{where}:{recipe.name}", [str(recipe.relative_to(ROOT)) if a == RECIPE_PLACEHOLDER else a for a in args]))
        else:
            expanded.append((where, args))
    return expanded


def recipes() -> list[Path]:
    # fsdp.yaml is added to a recipe, not run alone
    return [path for path in sorted((ROOT / "configs").glob("*.yaml")) if path.name != "fsdp.yaml"]


def yaml_block_after(page: Path, marker: str) -> str:
    text = page.read_text(encoding="utf-8")
    block = FENCE.search(text, text.index(marker))
    assert block and block.group(1) == "yaml", f"{page.name}: no YAML block after {marker!r}"
    return block.group(2)


COMMANDS = documented_commands()

WORKER = textwrap.dedent(
    """
    import contextlib, io, json, runpy, sys, warnings
    warnings.simplefilter("ignore")
    jobs_file, results_file = sys.argv[1:3]
    jobs, results = json.load(open(jobs_file)), []
    for args in jobs:
        out, err, code = io.StringIO(), io.StringIO(), 0
        sys.argv = ["python -m picogpt_lightning", *args]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_module("picogpt_lightning", run_name="__main__", alter_sys=True)
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
                if isinstance(exit.code, str):
                    err.write(exit.code)
            except BaseException as error:
                code = 1
                err.write(f"{type(error).__name__}: {error}")
        results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()[-3000:]})
    json.dump(results, open(results_file, "w"))
    """
)


@pytest.fixture(scope="module")
def placeholder_files(tmp_path_factory) -> dict[str, str]:
    from picogpt_lightning import PicoGPT, PicoGPTConfig, checkpoints
    from picogpt_lightning.tokenizer import build_tokenizer

    folder = tmp_path_factory.mktemp("placeholders")
    text = "ROMEO:\nBut soft, what light through yonder window breaks?\n\nJULIET:\nAy me!\n"
    tokenizer = build_tokenizer("char", text)
    model = PicoGPT(PicoGPTConfig(vocab_size=tokenizer.vocab_size, block_size=128, n_layer=1, n_head=2, n_embd=16))
    checkpoints.save(folder / "tiny.ckpt", model, tokenizer)
    (folder / "merge.yaml").write_text(yaml_block_after(ROOT / "docs" / "merging.md", "`merge.yaml`"), encoding="utf-8")
    (folder / "prompts.txt").write_text("ROMEO:\nJULIET:\n", encoding="utf-8")
    (folder / "pairs.jsonl").write_text(json.dumps({"prompt": "ROMEO:", "chosen": " Ay", "rejected": " No"}) + "\n")
    (folder / "my_text.txt").write_text(text, encoding="utf-8")
    files = {name: folder / name for name in ("merge.yaml", "prompts.txt", "pairs.jsonl", "my_text.txt")}
    files.update({name: folder / "tiny.ckpt" for name in ("CKPT", "A", "B")})
    assert set(files) == set(PLACEHOLDERS)
    return {name: str(path) for name, path in files.items()}


def parse_args(args: list[str]) -> list[str]:
    """What the test runs for a documented command: help as written, anything else with --print_config."""
    if not args or HELP & set(args) or "--print_config" in args:
        return args
    return [*args, "--print_config"]


@pytest.fixture(scope="module")
def parsed(placeholder_files, tmp_path_factory) -> dict[tuple[str, ...], dict]:
    jobs = sorted({tuple(parse_args([placeholder_files.get(a, a) for a in args])) for _, args in COMMANDS})
    folder = tmp_path_factory.mktemp("parsed")
    (folder / "jobs.json").write_text(json.dumps(jobs))
    worker = subprocess.run(
        [sys.executable, "-c", WORKER, str(folder / "jobs.json"), str(folder / "results.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert worker.returncode == 0, worker.stderr[-3000:]
    return dict(zip(jobs, json.loads((folder / "results.json").read_text())))


def test_the_docs_have_commands_of_every_kind():
    kinds = {args[0] for _, args in COMMANDS if args and not args[0].startswith("-")}
    assert {"fit", "generate", "export", "quantize", "merge", "pipeline", "serve", "prepare"} <= kinds
    assert not kinds - {"fit", "validate", "test", "predict", "generate", "export", "quantize", "merge", "pipeline", "serve",
                        "prepare"}


@pytest.mark.parametrize("where, args", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_documented_command_parses(where, args, parsed, placeholder_files):
    args = [placeholder_files.get(a, a) for a in args]
    result = parsed[tuple(parse_args(args))]
    assert result["code"] == 0, f"{where}: python -m picogpt_lightning {shlex.join(args)}\n{result['stderr']}"
    assert result["stdout"].strip(), where
    if not args or HELP & set(args):  # help: nothing more to check
        return
    config = yaml.safe_load(result["stdout"])
    flags = [a[2:].split("=")[0] for a in args[1:] if a.startswith("--") and a not in ("--config", "--print_config")]
    for flag in flags:  # each flag the docs use names a key of the resolved config
        node = config
        for key in flag.split("."):
            assert isinstance(node, dict) and key in node, f"{where}: --{flag} is not in the resolved config"
            node = node[key]


def test_the_readme_python_example_runs(placeholder_files, capsys):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    examples = [block.group(2) for block in FENCE.finditer(text) if block.group(1) == "python"]
    assert len(examples) == 1 and len(examples[0].splitlines()) <= 12
    path = re.search(r'checkpoints\.load\("([^"]+)"\)', examples[0]).group(1)
    namespace = {}
    exec(examples[0].replace(path, placeholder_files["CKPT"]), namespace)  # noqa: S102 - the README's own code
    assert namespace["out"].shape == (1, len("ROMEO:\n") + 100)
    assert capsys.readouterr().out.startswith("ROMEO:\n")
    assert type(namespace["llama"]).__name__ == "LlamaForCausalLM"


def readme_tree_files() -> set[str]:
    """The package's files as the README's tree lists them: one line each, folders by indentation."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    tree = next(block.group(2) for block in FENCE.finditer(text) if block.group(2).startswith("picogpt_lightning/"))
    files, folders = set(), []
    for line in tree.splitlines()[1:]:
        depth = (len(line) - len(line.lstrip())) // 2
        if depth == 0:  # configs/, docs/, ...: outside the package
            break
        name = line.split()[0]
        folders = folders[: depth - 1]
        if name.endswith("/"):
            folders.append(name.rstrip("/"))
        else:
            files.add("/".join(["picogpt_lightning", *folders, name]))
    return files


def test_the_readme_tree_lists_every_package_file():
    package = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "picogpt_lightning").rglob("*.py")
        if "__pycache__" not in path.parts
    }
    listed = readme_tree_files()
    assert not package - listed, f"files missing from README.md's tree: {sorted(package - listed)}"
    assert not listed - package, f"README.md's tree lists files that do not exist: {sorted(listed - package)}"
