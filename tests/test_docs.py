"""Keep the docs honest: every file, link and ``minires.x.y`` name they mention
exists, every function a link names is defined in the linked file, and every
code block marked as runnable (```python run / ```bash run) runs."""
import ast
import contextlib
import importlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from minires import backend
from minires.assignment import _INSTRUCTOR_TESTS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
if not DOCS.is_dir():  # e.g. a student copy made without --with-docs
    pytest.skip("no docs/ folder", allow_module_level=True)

DOC_FILES = sorted(DOCS.rglob("*.md"))
PAGES = [
    "index.md", "gradient-checking.md", "gpu.md", "reproducing.md", "assignments.md", "gradient-flow.md",
    "backward/conv2d.md", "backward/batchnorm.md", "backward/relu.md", "backward/linear.md",
    "backward/pooling.md", "backward/softmax-cross-entropy.md", "backward/residual.md",
]

LINK = re.compile(r"(?<!!)\[([^\]]*)\]\(([^)\s]+)\)")
CODE_BLOCK = re.compile(r"^```([^\n]*)\n(.*?)^```", re.S | re.M)
# a repository path written out in the text (not part of a longer path such as ../../minires/...)
REPO_PATH = re.compile(r"(?<![\w/.-])((?:minires|docs|tests|demos)/[\w./-]*\w)")
DOTTED = re.compile(r"(?<![\w.])minires(?:\.[A-Za-z_]\w*)+")


def rel(doc):
    return doc.relative_to(DOCS).as_posix()


def left_out_of_this_copy(path):
    """True for what a student copy (``assignment make --with-docs``) leaves out on
    purpose: the project's .ci/ scripts and the instructor's tests. In the
    repository itself nothing is exempt."""
    if not (ROOT / "ASSIGNMENT.md").is_file():
        return False
    return Path(os.path.relpath(path, ROOT)).parts[0] == ".ci" or path.name in _INSTRUCTOR_TESTS


def prose(doc):
    """The page's text without its fenced code blocks' bodies (those are checked by running them)."""
    return CODE_BLOCK.sub(lambda m: "```" + m.group(1) + "\n```", doc.read_text())


def defined_names(path):
    """Top-level functions/classes of a Python file, plus ``Class.method`` for their methods."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names.update(f"{node.name}.{item.name}" for item in node.body
                         if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)))
        if isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def names_in_link_text(text):
    """`relu_forward` / `relu_backward` -> [relu_forward, relu_backward]; paths and file names are skipped."""
    names = []
    for span in re.findall(r"`([^`]+)`", text):
        if "/" in span or span.endswith((".py", ".md")):
            continue
        match = re.match(r"[A-Za-z_][\w.]*", span)  # set_backend("cupy") -> set_backend
        if match:
            names.append(match.group(0))
    return names


def runnable_blocks():
    for doc in DOC_FILES:
        blocks = [(m.group(1).split(), m.group(2)) for m in CODE_BLOCK.finditer(doc.read_text())]
        runnable = [(info[0], code) for info, code in blocks if len(info) == 2 and info[1] == "run"]
        for i, (language, code) in enumerate(runnable):
            yield pytest.param(language, code, id=f"{rel(doc)}#{i + 1}")


def test_every_page_exists():
    missing = [p for p in PAGES if not (DOCS / p).is_file()]
    assert not missing, missing


@pytest.mark.parametrize("doc", DOC_FILES, ids=rel)
def test_links_resolve_and_name_real_functions(doc):
    problems = []
    for text, target in LINK.findall(prose(doc)):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # web links and in-page anchors
        path = (doc.parent / target.split("#")[0]).resolve()
        if left_out_of_this_copy(path):
            continue
        if not path.exists():
            problems.append(f"link [{text}]({target}): {path} does not exist")
            continue
        if path.suffix == ".py":
            defined = defined_names(path)
            problems += [f"link [{text}]({target}): {path.name} defines no {name}"
                         for name in names_in_link_text(text) if name not in defined]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", DOC_FILES, ids=rel)
def test_repository_paths_exist(doc):
    missing = sorted({p for p in REPO_PATH.findall(prose(doc))
                      if not (ROOT / p).exists() and not left_out_of_this_copy(ROOT / p)})
    assert not missing, missing


def resolve(dotted):
    """Import the longest module prefix of ``dotted`` and getattr the rest; raises if anything is missing."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


@pytest.mark.parametrize("doc", DOC_FILES, ids=rel)
def test_dotted_minires_names_exist(doc):
    problems = []
    for dotted in sorted(set(DOTTED.findall(doc.read_text()))):
        try:
            resolve(dotted)
        except (ImportError, AttributeError) as err:
            problems.append(f"{dotted}: {err}")
    assert not problems, problems


@pytest.mark.parametrize("doc", DOC_FILES, ids=rel)
def test_display_math_is_balanced(doc):
    assert prose(doc).count("$$") % 2 == 0, "an odd number of $$ delimiters"


@pytest.mark.parametrize("page", [p for p in PAGES if p.startswith("backward/")])
def test_each_derivation_links_to_its_code(page):
    targets = [t for _, t in LINK.findall((DOCS / page).read_text())]
    assert any("minires/" in t and t.endswith(".py") for t in targets)


def test_docs_named_by_the_code_exist():
    """Docstrings point to docs/...md pages (e.g. docs/backward/batchnorm.md): those must exist."""
    missing = set()
    for path in (ROOT / "minires").rglob("*.py"):
        for name in re.findall(r"docs/[\w/.-]*\.md", path.read_text()):
            if not (ROOT / name).is_file():
                missing.add(f"{path.relative_to(ROOT)}: {name}")
    assert not missing, sorted(missing)


@pytest.mark.parametrize("language, code", list(runnable_blocks()))
def test_runnable_block(language, code, monkeypatch):
    monkeypatch.chdir(ROOT)
    if language == "python":
        previous = backend.backend_name()
        try:
            exec(compile(code, "<doc block>", "exec"), {"__name__": "__doc_block__"})
        finally:
            backend.set_backend(previous)
            backend.manual_seed(0)
    elif language == "bash":
        # `python` in the block is this interpreter, with this checkout importable
        env = {**os.environ, "PYTHONPATH": str(ROOT),
               "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    else:
        pytest.fail(f"don't know how to run a {language!r} block")


# --- the README: its links, paths and every command it shows -----------------------

README = ROOT / "README.md"
#: A student copy (``assignment make``) has a README of its own, not the project's.
project_readme = pytest.mark.skipif((ROOT / "ASSIGNMENT.md").is_file(),
                                    reason="a student copy: its README is the copy's, not the project's")

#: Each command the README shows, and the cheap version of it the suite runs
#: (same command, shortened flags). A README command missing here fails
#: test_every_readme_command_is_run, so a new one cannot go untested.
README_COMMANDS = {
    "pip install -e . && python demos/seed_block.py": "python demos/seed_block.py --size 16",
    'pip install -e ".[test]" && python -m pytest': "python -m pytest --collect-only -q tests/test_ops.py",
    "python -m minires gradcheck": "python -m minires gradcheck",
    "python demos/seed_block.py": "python demos/seed_block.py --size 16",
    "python -m minires gradflow --depths 20 56 110 --out runs/gradflow --seed 0":
        "python -m minires gradflow --depths 8 --batch 8 --out {tmp}/gradflow --seed 0",
    "python -m minires train --subset 2000 --epochs 2 --out runs/quick":
        "python -m minires train --subset 64 --epochs 1 --batch-size 32 --out {tmp}/quick --no-progress",
    "python -m minires evaluate --checkpoint runs/quick/checkpoint.npz":
        "python -m minires evaluate --checkpoint {tmp}/quick/checkpoint.npz --subset 100",
    "python -m minires assignment make --out student/": "python -m minires assignment make --out {tmp}/student",
    "python -m minires train --model resnet20 --dataset fashion-mnist --epochs 2 --out runs/fm --seed 0":
        "python -m minires train --model resnet20 --dataset fashion-mnist --epochs 1 --subset 64 --out {tmp}/fm "
        "--seed 0 --no-progress",
}


def readme_commands():
    """The command lines of the README's bash blocks (comments stripped)."""
    lines = []
    for info, code in CODE_BLOCK.findall(README.read_text()):
        if info.strip() == "bash":
            lines += [re.split(r"\s+#\s", line)[0].strip() for line in code.splitlines()
                      if line.strip() and not line.lstrip().startswith("#")]
    return lines


@project_readme
def test_readme_starts_with_the_two_setup_commands_ci_runs():
    commands = readme_commands()
    assert commands[:2] == ["pip install -e . && python demos/seed_block.py",
                            'pip install -e ".[test]" && python -m pytest']
    ci = ROOT / ".ci" / "run"
    if ci.is_file():  # (a student copy leaves .ci/ out)
        assert 'pip install -e ".[test]" && python -m pytest\n' in ci.read_text()


@project_readme
def test_every_readme_command_is_run():
    missing = [c for c in readme_commands() if c not in README_COMMANDS]
    assert not missing, f"add a cheap version of these README commands to README_COMMANDS: {missing}"


@project_readme
def test_readme_links_and_paths_exist():
    text = CODE_BLOCK.sub("", README.read_text())
    problems = [target for _, target in LINK.findall(text)
                if not re.match(r"[a-z]+:", target) and not (ROOT / target.split("#")[0]).exists()]
    problems += [p for p in REPO_PATH.findall(text) if not (ROOT / p).exists() and not left_out_of_this_copy(ROOT / p)]
    assert not problems, problems


def _have_fashion_mnist():
    from minires.data import DataError, load_dataset
    try:
        load_dataset("fashion-mnist", download=False, progress=False, verify=False)
    except (FileNotFoundError, DataError):
        return False
    return True


@pytest.mark.slow  # ~50 s of subprocesses on 2 cores; the same commands run in-process in the default suite
@project_readme
@pytest.mark.skipif(not _have_fashion_mnist(), reason="Fashion-MNIST not found (apt-get install dataset-fashion-mnist)")
def test_readme_commands_run_shortened(tmp_path):
    """Every README command, shortened, in order (evaluate reads what train wrote)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MINIRES_BACKEND": "numpy",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    done = set()
    for command in readme_commands():
        short = README_COMMANDS[command].format(tmp=tmp_path)
        if short in done:
            continue
        done.add(short)
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", short], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (short, proc.stdout[-2000:], proc.stderr[-2000:])
        if "seed_block" in short:
            assert "gradient check: PASS (worst relative error" in proc.stdout
        if " train " in short:
            assert "data: fashion-mnist, SHA-256 of each file's decompressed content matches" in proc.stdout


# --- every `python -m minires ...` the README and the docs show parses ---------------

INLINE_COMMAND = re.compile(r"`(?:[A-Z_]+=\S+ )*python -m minires ([^`]+)`")
PLACEHOLDER = re.compile(r"\.\.\.|\s/\s|\bPART\b|\bS\b")  # a pattern of commands, not one to run


def shown_commands():
    """(file, arguments) of every minires command written in the README or a doc page:
    inline in backticks, or as a line of a code block (continuation lines joined)."""
    found = []
    for path in [README] + DOC_FILES:
        text = path.read_text()
        for _, code in CODE_BLOCK.findall(text):
            for line in code.replace("\\\n", " ").splitlines():
                line = re.split(r"\s+#\s", line)[0]
                match = re.match(r"\s*(?:[A-Z_]+=\S+\s+)*python -m minires (.+)", line)
                if match:
                    found.append((path.name, match.group(1)))
        found += [(path.name, args) for args in INLINE_COMMAND.findall(CODE_BLOCK.sub("", text))]
    return [(name, args.strip()) for name, args in found if not PLACEHOLDER.search(args)]


def test_every_command_the_docs_show_parses():
    """A renamed flag or subcommand breaks the docs that show it: each command must parse."""
    import shlex
    from minires.cli import build_parser

    commands = shown_commands()
    assert len(commands) > 30  # the README's and the docs' commands were all found
    failed = []
    for name, args in commands:
        words = shlex.split(re.split(r"\s(?:\|\||&&|>|\||;)\s", args)[0])  # up to a shell operator
        if len(words) == 1:  # the command's name in a sentence: it must exist (its --help exits 0)
            words.append("--help")
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                build_parser().parse_args(words)
        except SystemExit as exit:
            if exit.code != 0 or words[-1] != "--help":
                failed.append(f"{name}: python -m minires {args}")
    assert not failed, "these commands do not parse:\n" + "\n".join(failed)
