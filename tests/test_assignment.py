"""The course-assignment kit (minires/assignment.py): markers, `make`, `grade`, the CLI.

The acceptance cycle: the reference grades 100%; a student copy made from it
fails exactly the stubbed parts and passes the rest; pasting the reference
bodies back into the copy makes every part pass; plausible wrong answers fail.
"""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minires import assignment as A

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "minires"
try:
    import torch  # noqa: F401  (only to know whether parity checks will run)
    HAVE_TORCH = True
except ImportError:
    HAVE_TORCH = False


def reference_bodies():
    """dict part name -> the reference lines between its markers."""
    bodies = {}
    for name, (path, region) in A.package_regions(PACKAGE).items():
        bodies[name] = A.region_body((PACKAGE / path).read_text(), region)
    return bodies


def set_body(copy_root, name, lines):
    """Replace the body of part ``name`` in the copy at ``copy_root`` (markers stay)."""
    part = next(p for p in A.PARTS if p.name == name)
    target = Path(copy_root) / "minires" / part.path
    text = target.read_text()
    region = next(r for r in A.find_regions(text) if r.name == name)
    target.write_text(A.replace_region(text, region, lines))


def by_part(report):
    return {p["part"]: p for p in report["parts"]}


# --- markers and the registry ---------------------------------------------------------

def qualified_functions(tree):
    """dict qualified name -> FunctionDef for top-level functions and methods."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            out[node.name] = node
        elif isinstance(node, ast.ClassDef):
            out.update({f"{node.name}.{f.name}": f for f in node.body if isinstance(f, ast.FunctionDef)})
    return out


def test_every_part_is_marked_once_inside_its_function():
    regions = A.package_regions(PACKAGE)
    assert sorted(regions) == sorted(A.PART_NAMES)
    for part in A.PARTS:
        path, region = regions[part.name]
        assert path == part.path
        module, _, qualname = part.function.partition(f".{Path(part.path).stem}.")
        assert module == "minires." + str(Path(part.path).parent).replace("/", ".")
        function = qualified_functions(ast.parse((PACKAGE / path).read_text()))[qualname]
        # the markers sit inside the function, around whole statements after the docstring
        begin_line, end_line = region.begin + 1, region.end + 1  # 1-based, as ast counts
        marked = [s for s in function.body if begin_line < s.lineno < end_line]
        assert marked and marked[0].lineno == begin_line + 1  # BEGIN right before a statement
        assert marked[-1].end_lineno == end_line - 1          # END right after one
        assert end_line <= function.end_lineno + 1
        assert (ROOT / part.doc).is_file(), part.doc


@pytest.mark.parametrize("text, message", [
    ("# BEGIN ASSIGNMENT a\n", "has no END"),
    ("# END ASSIGNMENT a\n", "expected a BEGIN"),
    ("# BEGIN ASSIGNMENT a\n# END ASSIGNMENT b\n", "expected END ASSIGNMENT a"),
    ("# BEGIN ASSIGNMENT a\n# BEGIN ASSIGNMENT b\n", "do not nest"),
    ("    # BEGIN ASSIGNMENT a\n# END ASSIGNMENT a\n", "indented differently"),
    ("# BEGIN ASSIGNMENT a-b\n", "malformed"),
])
def test_bad_markers_are_reported_with_file_and_line(text, message):
    with pytest.raises(ValueError, match=message) as info:
        A.find_regions(text, "f.py")
    assert str(info.value).startswith("f.py:")


# --- make -----------------------------------------------------------------------------

def test_make_stubs_only_the_marked_bodies(tmp_path):
    out = tmp_path / "handout"
    assert A.make(out) == list(A.PART_NAMES)
    reference = reference_bodies()
    for part in A.PARTS:
        copied = (out / "minires" / part.path).read_text()
        region = next(r for r in A.find_regions(copied) if r.name == part.name)
        body = "\n".join(A.region_body(copied, region))
        assert "raise NotImplementedError" in body and f"TODO({part.name})" in body
        assert "Inputs:" in body and "Returns:" in body
        assert f"{part.doc} in the course repository" in body  # the copy has no docs/
        # putting the reference body back gives the reference file, byte for byte
        restored = A.replace_region(copied, region, reference[part.name])
        others = [p for p in A.PARTS if p.path == part.path and p.name != part.name]
        for other in others:
            r = next(r for r in A.find_regions(restored) if r.name == other.name)
            restored = A.replace_region(restored, r, reference[other.name])
        assert restored == (PACKAGE / part.path).read_text()
    # every other file of the package is an exact copy
    stubbed = {p.path for p in A.PARTS}
    for source in PACKAGE.rglob("*.py"):
        rel = source.relative_to(PACKAGE).as_posix()
        if "__pycache__" not in rel and rel not in stubbed:
            assert (out / "minires" / rel).read_bytes() == source.read_bytes(), rel
    assert (out / "tests" / "test_ops.py").is_file()
    assert not (out / "tests" / "test_assignment.py").exists()  # tests this kit, not the student's code
    assert not (out / "docs").exists()
    assignment = (out / "ASSIGNMENT.md").read_text()
    assert all(f"`{name}`" in assignment for name in A.PART_NAMES)
    assert "docs/` folder of the course repository" in assignment
    readme = (out / "README.md").read_text()
    assert "ResidualBlock" not in readme
    # the first step, in both: install the copy itself, and run the tests with `python -m pytest`
    for text in (assignment, readme):
        assert text.index("pip install -e .") < text.index("python -m pytest")
        assert text.index("pip install -e .") < text.find("## The parts") or "## The parts" not in text


def test_make_only_and_with_docs(tmp_path):
    names = A.make(tmp_path / "c", ["conv2d_backward,relu_backward"], with_docs=True)
    assert names == ["relu_backward", "conv2d_backward"]  # in PARTS order
    assert (tmp_path / "c" / "docs" / "backward" / "conv2d.md").is_file()
    conv = (tmp_path / "c" / "minires" / "functional" / "conv.py").read_text()
    assert "The math: docs/backward/conv2d.md\n" in conv  # the page is in the copy: its path alone
    assert "course repository" not in (tmp_path / "c" / "ASSIGNMENT.md").read_text()
    loss = (tmp_path / "c" / "minires" / "functional" / "loss.py").read_text()
    assert loss == (PACKAGE / "functional" / "loss.py").read_text()


def test_make_refuses_unsafe_or_unknown_requests(tmp_path):
    with pytest.raises(ValueError, match="unknown assignment part"):
        A.make(tmp_path / "a", ["relu_backward", "nope"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        A.make(tmp_path / "full")
    A.make(tmp_path / "full", ["relu_backward"], force=True)
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"  # --force replaces only its folders
    with pytest.raises(ValueError, match="reference checkout"):
        A.make(ROOT, force=True)
    with pytest.raises(ValueError, match="inside the reference package"):
        A.make(PACKAGE / "handout")


# --- grade ----------------------------------------------------------------------------

def test_reference_grades_100_percent():
    report = A.grade(ROOT)
    assert report["passed"] == report["total"] == len(A.PARTS) and report["score"] == 1.0
    assert Path(report["imported"]) == PACKAGE
    assert report["torch"] == HAVE_TORCH
    for part in report["parts"]:
        assert part["passed"] and part["error"] is None and part["hint"] == ""
        assert part["checks"] and 0 <= part["worst_rel_error"] < A.TOLERANCE
        if HAVE_TORCH and part["part"] != "residual_block_backward":
            assert any("vs torch" in c["name"] for c in part["checks"]), part["part"]


def test_student_copy_fails_the_stubbed_parts_and_passes_after_pasting_back(tmp_path):
    stubbed = ["relu_backward", "softmax_cross_entropy_backward", "batchnorm2d_backward",
               "conv2d_backward", "residual_block_backward"]
    A.make(tmp_path, stubbed)
    report = A.grade(tmp_path, use_torch=False)
    assert Path(report["imported"]) == tmp_path.resolve() / "minires"  # the copy, not the reference
    results = by_part(report)
    for name in A.PART_NAMES:
        if name in stubbed:
            assert not results[name]["passed"], name
            assert results[name]["error"].startswith("NotImplementedError")
            assert "not written yet" in results[name]["hint"]
            assert "in the course repository (not in this copy)" in results[name]["hint"]
        else:
            assert results[name]["passed"], results[name]
    assert report["passed"] == len(A.PARTS) - len(stubbed)

    for name, body in reference_bodies().items():
        if name in stubbed:
            set_body(tmp_path, name, body)
    report = A.grade(tmp_path, use_torch=HAVE_TORCH)
    assert report["score"] == 1.0, [(p["part"], p["hint"]) for p in report["parts"] if not p["passed"]]


def test_full_student_copy_fails_every_part(tmp_path):
    A.make(tmp_path)
    report = A.grade(tmp_path, use_torch=False)
    assert report["passed"] == 0
    assert all(p["error"].startswith("NotImplementedError") for p in report["parts"])


def edited(body, old, new):
    text = "\n".join(body)
    assert old in text, f"reference body changed: {old!r} not found"
    return text.replace(old, new).splitlines()


def test_plausible_wrong_answers_fail_with_a_useful_hint(tmp_path):
    ref = reference_bodies()
    wrong = {
        # ReLU mask from >= 0 on the output: true everywhere, so nothing is blocked
        "relu_backward": edited(ref["relu_backward"], "(out > 0)", "(out >= 0)"),
        # dw transposed: (D, M) instead of (M, D)
        "linear_backward": edited(ref["linear_backward"], "dout.T @ x", "x.T @ dout"),
        # the eval-mode formula used in training mode too
        "batchnorm2d_backward": edited(ref["batchnorm2d_backward"], "if not training:", "if True:"),
        # forgot the 1/N of the batch mean
        "softmax_cross_entropy_backward": edited(ref["softmax_cross_entropy_backward"], "dloss / n", "dloss"),
        # no max subtraction: overflows for large logits
        "softmax_cross_entropy_forward": edited(
            ref["softmax_cross_entropy_forward"], "logits - logits.max(axis=1, keepdims=True)", "logits"),
        # padding not cropped off dx
        "maxpool2d_backward": edited(ref["maxpool2d_backward"], "_crop(dx_pad, padding, x_shape)", "dx_pad"),
        # dw averaged over the batch instead of summed
        "conv2d_backward": edited(ref["conv2d_backward"], ".T.reshape(w.shape)",
                                  ".T.reshape(w.shape) / dout.shape[0]"),
        # forgot the shortcut's gradient
        "residual_block_backward": edited(ref["residual_block_backward"],
                                          "return d_branch + d_shortcut", "return d_branch"),
    }
    A.make(tmp_path)
    for name, body in wrong.items():
        set_body(tmp_path, name, body)
    results = by_part(A.grade(tmp_path, use_torch=False))
    for name in A.PART_NAMES:
        result = results[name]
        assert not result["passed"], name
        assert result["error"] is None, (name, result["error"])  # it ran; a check caught it
        failed = [c for c in result["checks"] if not c["passed"]]
        assert failed and result["hint"].startswith(f"[{failed[0]['name']}]"), (name, result["hint"])
    assert "has shape" in results["linear_backward"]["hint"]
    assert "NaN or inf" in results["softmax_cross_entropy_forward"]["hint"]
    assert "training" in results["batchnorm2d_backward"]["hint"]
    assert results["residual_block_backward"]["worst_rel_error"] > 1e-2


def test_doc_reference_says_where_the_page_is(tmp_path):
    part = A.PARTS[0]
    assert A.doc_reference(part, ROOT) == part.doc
    assert A.doc_reference(part, tmp_path) == f"{part.doc} in the course repository (not in this copy)"
    assert A._hint(part, {"error": "NotImplementedError: x", "checks": []}, ROOT).endswith(f"see {part.doc}")


def test_grade_defaults_to_the_copy_in_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert A.default_grade_path() == A.source_root()  # no minires/ here
    (tmp_path / "minires").mkdir()
    (tmp_path / "minires" / "__init__.py").write_text("")
    assert A.default_grade_path() == tmp_path.resolve()


def shadowed_copy(folder):
    """A folder whose minires/ hands over to the reference on import: what the grading
    process sees when an installed minires comes before the copy on its path."""
    (folder / "minires").mkdir(parents=True)
    (folder / "minires" / "__init__.py").write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT)!r})\ndel sys.modules['minires']\nimport minires  # noqa\n")
    return folder


def test_grade_refuses_a_minires_imported_from_elsewhere(tmp_path):
    copy = shadowed_copy(tmp_path / "alice")
    with pytest.raises(RuntimeError, match="refusing to grade") as info:
        A.grade(copy, ["relu_backward"], use_torch=False)
    message = str(info.value)
    assert str(PACKAGE) in message and str(copy / "minires") in message and "pip install -e" in message
    assert A.import_mismatch(ROOT, PACKAGE) is None


def test_an_endless_loop_fails_by_timeout_not_forever(tmp_path):
    A.make(tmp_path, ["relu_backward"])
    set_body(tmp_path, "relu_backward", ["    while True:", "        pass"])
    report = A.grade(tmp_path, ["relu_backward", "linear_backward"], use_torch=False, timeout=5)
    assert report["passed"] == 0
    assert all("--timeout 5" in p["error"] for p in report["parts"])


# --- command line ---------------------------------------------------------------------

def cli(*args, cwd=ROOT, installed=False):
    """``python -m minires assignment ARGS`` in ``cwd``; ``installed``: as the ``minires``
    console script runs it, importing this repository's minires wherever ``cwd`` is."""
    python = [sys.executable, "-P"] if installed else [sys.executable]
    env = dict(os.environ, PYTHONPATH=str(ROOT)) if installed else None
    return subprocess.run([*python, "-m", "minires", "assignment", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_make_grade_list_and_errors(tmp_path):
    made = cli("make", "--out", str(tmp_path / "h"), "--only", "linear_backward")
    assert made.returncode == 0 and "1 part(s) stubbed: linear_backward" in made.stdout
    graded = cli("grade", "--path", str(tmp_path / "h"), "--only", "linear_backward", "relu_backward",
                 "--no-torch", "--json")
    assert graded.returncode == 1
    report = json.loads(graded.stdout)
    assert [(p["part"], p["passed"]) for p in report["parts"]] == [("relu_backward", True), ("linear_backward", False)]
    # run from inside the copy, grade grades the copy by default
    inside = cli("grade", "--only", "relu_backward", "--no-torch", cwd=tmp_path / "h")
    assert inside.returncode == 0 and "score: 1/1" in inside.stdout
    # ... also when the minires that runs the grader is installed from elsewhere (the reference)
    inside = cli("grade", "--only", "linear_backward", "--no-torch", cwd=tmp_path / "h", installed=True)
    assert inside.returncode == 1 and f"grading {(tmp_path / 'h').resolve()}" in inside.stdout
    assert "docs/backward/linear.md in the course repository" in inside.stdout
    # elsewhere, it grades the installed one, and says so
    (tmp_path / "elsewhere").mkdir()
    outside = cli("grade", "--only", "relu_backward", "--no-torch", cwd=tmp_path / "elsewhere", installed=True)
    assert outside.returncode == 0 and f"grading {ROOT}" in outside.stdout
    assert f"no minires/ in the current folder: grading the installed one, in {ROOT}" in outside.stderr
    shadowed = cli("grade", "--path", str(shadowed_copy(tmp_path / "bob")), "--no-torch")
    assert shadowed.returncode == 2 and "refusing to grade" in shadowed.stderr
    assert len(shadowed.stderr.strip().splitlines()) == 1

    listed = cli("list")
    assert listed.returncode == 0 and all(name in listed.stdout for name in A.PART_NAMES)
    for args, message in [(("make", "--out", str(tmp_path / "x"), "--only", "bogus"), "unknown assignment part"),
                          (("grade", "--path", str(tmp_path / "empty")), "no minires package")]:
        bad = cli(*args)
        assert bad.returncode == 2 and message in bad.stderr
        assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_tests_stop_when_they_would_import_another_minires(tmp_path):
    """tests/conftest.py: plain `pytest` in a copy imports the installed minires (here
    the reference, via PYTHONPATH); the run must stop, naming both folders, and go on
    when the copy's own minires is the one imported."""
    copy = tmp_path / "copy"
    A.make(copy, ["relu_backward"])

    def pytest_in(cwd, pythonpath):
        env = dict(os.environ, PYTHONPATH=str(pythonpath))
        return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q",
                               str(copy / "tests" / "test_nn.py")],
                              cwd=cwd, env=env, capture_output=True, text=True, timeout=120)

    wrong = pytest_in(tmp_path, ROOT)  # cwd outside the copy, as with plain `pytest`
    assert wrong.returncode == pytest.ExitCode.USAGE_ERROR, wrong.stdout + wrong.stderr
    assert f"import minires from {PACKAGE}, not {copy / 'minires'}" in wrong.stderr
    assert "pip install -e ." in wrong.stderr and "python -m pytest" in wrong.stderr
    assert "Traceback" not in wrong.stderr
    right = pytest_in(copy, ROOT)  # python -m pytest in the copy: the copy comes first
    assert right.returncode == 0, right.stdout[-2000:] + right.stderr[-2000:]


@pytest.mark.slow
def test_a_finished_student_copy_passes_the_tests_that_see_its_layout(tmp_path):
    """A copy with every part pasted back must pass its own test suite; the tests
    that depend on what the copy holds (docs and their links, the demo, the
    CuPy stand-in runs) are the ones that can break there and not here."""
    A.make(tmp_path, with_docs=True)
    for name, body in reference_bodies().items():
        set_body(tmp_path, name, body)
    env = dict(os.environ, PYTHONPATH=str(tmp_path), MINIRES_BACKEND="numpy")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_docs.py",
         "tests/test_models.py::test_seed_block_demo_runs", "tests/test_fake_cupy.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
