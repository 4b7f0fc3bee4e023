"""The course-assignment kit (minires/assignment.py): markers, `make`, `grade`, the CLI.

The acceptance cycle: the reference grades 100%; a student copy made from it
fails exactly the stubbed parts and passes the rest; pasting the reference
bodies back into the copy makes every part pass; plausible wrong answers fail.
"""
import ast
import json
import os
import re
import shutil
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


#: The copy's one install command: everything its checks and notebooks need (setup.cfg's extras).
INSTALL = 'pip install -e ".[test,notebooks]"'


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
        # (where the copy also leaves out a loop twin, the twin's stub stays)
        restored = A.replace_region(copied, region, reference[part.name])
        others = [p for p in A.PARTS if p.path == part.path and p.name != part.name]
        for other in others:
            r = next(r for r in A.find_regions(restored) if r.name == other.name)
            restored = A.replace_region(restored, r, reference[other.name])
        expected = (PACKAGE / part.path).read_text()
        for other in A.PARTS:
            for rel, function in other.left_out:
                if rel == part.path:
                    expected = A.leave_out_function(expected, function, rel, other.name)
        assert restored == expected
    # every other file of the package is an exact copy, but for what a copy leaves out
    stubbed = {p.path for p in A.PARTS} | {rel for p in A.PARTS for rel, _ in p.left_out}
    stubbed |= {"ops.py", "kernels/cuda.py"}
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
        assert text.index(INSTALL) < text.index("python -m pytest")
        assert text.index(INSTALL) < text.find("## The parts") or "## The parts" not in text


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


# --- a simple correct solution, and a handout without answers ---------------------------

# What a student writes from the TODOs and the derivation pages: plain, correct, and
# written apart from the reference bodies (no line of them needs to be in a copy).
SIMPLE_SOLUTIONS = {
    "relu_backward": """
        return dout * (cache > 0)
    """,
    "linear_backward": """
        x, w, has_bias = cache
        grad_x, grad_w = dout @ w, dout.T @ x
        return grad_x, grad_w, (dout.sum(axis=0) if has_bias else None)
    """,
    "softmax_cross_entropy_forward": """
        z = logits - logits.max(axis=1, keepdims=True)       # softmax(z) == softmax(logits)
        log_p = z - xp.log(xp.sum(xp.exp(z), axis=1, keepdims=True))
        picked = log_p[xp.arange(len(labels)), labels]
        return -picked.sum() / len(labels), (xp.exp(log_p), labels)
    """,
    "softmax_cross_entropy_backward": """
        probs, labels = cache
        xp = get_array_module(probs)
        onehot = xp.zeros_like(probs)
        onehot[xp.arange(len(labels)), labels] = 1
        return ((probs - onehot) * (dloss / len(labels))).astype(probs.dtype, copy=False)
    """,
    "batchnorm2d_backward": """
        x_hat, gamma, inv_std, training = cache
        dgamma = (dout * x_hat).sum(axis=_AXES)
        dbeta = dout.sum(axis=_AXES)
        g = dout * _per_channel(gamma)                       # dL/dx_hat
        if training:                                         # mean and var move with x
            g = g - g.mean(axis=_AXES, keepdims=True) - x_hat * (g * x_hat).mean(axis=_AXES, keepdims=True)
        return g * _per_channel(inv_std), dgamma, dbeta
    """,
    "maxpool2d_backward": """
        x_shape, argmax, (kh, kw), (sh, sw), (ph, pw) = cache
        _check_dout("maxpool2d", dout, argmax.shape)
        xp = get_array_module(dout)
        Ho, Wo = dout.shape[2:]
        grad = xp.zeros(x_shape[:2] + (x_shape[2] + 2 * ph, x_shape[3] + 2 * pw), dtype=dout.dtype)
        for i in range(kh):
            for j in range(kw):
                grad[:, :, i:i + sh * Ho:sh, j:j + sw * Wo:sw] += dout * (argmax == i * kw + j)
        return xp.ascontiguousarray(grad[:, :, ph:ph + x_shape[2], pw:pw + x_shape[3]])
    """,
    "conv2d_backward": """
        x, w, b, _, _ = cache
        g = dout.transpose(1, 0, 2, 3).reshape(F, -1)           # (F, N*Ho*Wo)
        dw = (g @ im2col(x, kh, kw, stride, padding).T).reshape(w.shape)
        db = None if b is None else dout.sum(axis=(0, 2, 3))
        dx = col2im(w.reshape(F, -1).T @ g, x.shape, kh, kw, stride, padding)
    """,
    "residual_block_backward": """
        d = self.relu.backward(dout)
        through_branch = d
        for module in self.branch[::-1]:
            through_branch = module.backward(through_branch)
        through_shortcut = d if self.downsample is None else self.downsample.backward(d)
        return through_branch + through_shortcut
    """,
}


def solve(copy_root, names=A.PART_NAMES):
    """Write SIMPLE_SOLUTIONS into the copy at ``copy_root``."""
    for name in names:
        part = next(p for p in A.PARTS if p.name == name)
        text = (Path(copy_root) / "minires" / part.path).read_text()
        indent = next(r for r in A.find_regions(text) if r.name == name).indent
        lines = [line.strip("\n") for line in SIMPLE_SOLUTIONS[name].splitlines() if line.strip()]
        strip = min(len(line) - len(line.lstrip()) for line in lines)
        set_body(copy_root, name, [indent + line[strip:] for line in lines])


def test_simple_solutions_grade_full_marks(tmp_path):
    A.make(tmp_path)
    solve(tmp_path)
    report = A.grade(tmp_path, use_torch=HAVE_TORCH)
    assert report["score"] == 1.0, [(p["part"], p["hint"]) for p in report["parts"] if not p["passed"]]


FAKE_CUPY = Path(__file__).resolve().parent / "fake_cupy" / "cupy"


def test_grade_backend_cupy_runs_the_students_code_on_the_device(tmp_path):
    """On the CuPy stand-in (strict: no implicit device-to-host conversion) the simple
    solutions get full marks; a body that turns its input into NumPy arrays fails there
    and passes with NumPy, so the student's code really ran on the device."""
    A.make(tmp_path)
    solve(tmp_path)
    with pytest.raises(RuntimeError, match="--backend cupy"):  # no CuPy: said, never a NumPy grade instead
        A.grade(tmp_path, ["relu_backward"], use_torch=False, backend="cupy")
    shutil.copytree(FAKE_CUPY, tmp_path / "cupy")  # the worker imports from the copy's folder only
    report = A.grade(tmp_path, use_torch=HAVE_TORCH, backend="cupy")
    assert report["backend"] == "cupy" and report["score"] == 1.0, \
        [(p["part"], p["error"], p["hint"]) for p in report["parts"] if not p["passed"]]
    assert "ran on the GPU" in A.format_report(report)
    set_body(tmp_path, "relu_backward", [
        "    import numpy",
        "    return numpy.asarray(dout) * (numpy.asarray(cache) > 0)"])
    assert A.grade(tmp_path, ["relu_backward"], use_torch=False)["passed"] == 1
    on_device = A.grade(tmp_path, ["relu_backward"], use_torch=False, backend="cupy")["parts"][0]
    assert not on_device["passed"] and "Implicit conversion" in on_device["error"], on_device


def normalized(line):
    return " ".join(line.split())


def given_code_lines():
    """Normalized code lines that a copy keeps on purpose: lines of the reference package
    outside every marked body, every function a copy leaves out, docstrings and comments
    (``N, C, H, W = x_shape`` is in avgpool2d_backward too, which is no part)."""
    given = set()
    left_out = {(rel, name) for part in A.PARTS for rel, name in part.left_out}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if "__pycache__" in path.parts or rel == "assignment.py":
            continue
        text = path.read_text()
        tree = ast.parse(text)
        skip = {i for r in A.find_regions(text) for i in range(r.begin, r.end + 1)}
        for node in ast.walk(tree):
            is_doc = (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                      and isinstance(node.value.value, str))
            if is_doc or (node in tree.body and isinstance(node, ast.FunctionDef) and (rel, node.name) in left_out):
                skip.update(range(node.lineno - 1, node.end_lineno))
        given |= {normalized(line) for i, line in enumerate(text.splitlines())
                  if i not in skip and not line.strip().startswith("#")}
    return given


def leaks(copy_root):
    """(part, file:line, reference line) for every line of a reference body (20 characters
    or more, whitespace normalized) found in a file of the copy, unless it is given code."""
    given, found = given_code_lines(), []
    bodies = {name: {normalized(line) for line in body if len(normalized(line)) >= 20} - given
              for name, body in reference_bodies().items()}
    for path in sorted(Path(copy_root).rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts:
            continue
        try:
            lines = path.read_text().splitlines()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(lines, 1):
            line = normalized(line)
            found += [(name, f"{path.relative_to(copy_root)}:{number}", ref)
                      for name, refs in bodies.items() for ref in refs if ref in line]
    return found


def test_a_fresh_handout_holds_no_line_of_any_answer(tmp_path):
    """Issue 21: no loop twin, engine kernel, CUDA kernel, docstring or doc code block
    of an assigned part gives its body away, in a copy made --with-docs too."""
    A.make(tmp_path, with_docs=True)
    assert leaks(tmp_path) == []
    assert leaks(ROOT / "notebooks") == []  # the notebooks' sources too (a handout's .ipynb is JSON-escaped)
    # the check itself finds a body pasted back
    solve_reference = reference_bodies()["conv2d_backward"]
    set_body(tmp_path, "conv2d_backward", solve_reference)
    assert {name for name, _, _ in leaks(tmp_path)} == {"conv2d_backward"}


def test_what_a_copy_leaves_out_raises_and_says_why(tmp_path):
    A.make(tmp_path, ["conv2d_backward", "batchnorm2d_backward", "relu_backward"])
    package = tmp_path / "minires"
    conv = (package / "functional" / "conv.py").read_text()
    assert "def conv2d_backward_naive(dout, cache):" in conv and "dx_pad[n, :" not in conv
    kernels = (package / "kernels" / "conv.py").read_text()
    assert "_backward_chunk" not in kernels.split('"""', 2)[2].replace(":func:`_backward_chunk`", "")
    cuda = (package / "kernels" / "cuda.py").read_text()
    assert "bn_backward_dx" not in cuda.split("_SOURCE")[1] and "void relu_backward(" not in cuda
    assert "void bn_stats(" in cuda  # the forward's kernels stay
    ops = (package / "ops.py").read_text()
    assert 'TEXTBOOK_ONLY = (\n    "relu_backward",\n    "batchnorm2d_backward",\n    "conv2d_backward",\n)' in ops
    code = ("from minires import ops\nfrom minires.functional import conv\n"
            "print(ops.implementation('conv2d_backward').__module__)\n"
            "try:\n    conv.conv2d_backward_naive(None, None)\nexcept NotImplementedError as e:\n    print(e)\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(tmp_path)), timeout=60)
    assert run.stdout.splitlines() == [
        "minires.functional.conv",  # the seam runs the student's code, also with the fast kernels
        "conv2d_backward_naive (minires/functional/conv.py) is left out of this student copy: "
        "it would give away the part conv2d_backward"], run.stderr


def test_make_with_docs_leaves_out_the_marked_code_blocks_only():
    text = "intro $$x$$\n<!-- answer: relu_backward -->\n```python\nsecret\n```\nafter\n"
    kept = A.strip_doc_answers(text, ["relu_backward"])
    assert "secret" not in kept and "intro $$x$$" in kept and "after" in kept
    assert "`relu_backward`: it is left out of this student copy" in kept
    assert A.strip_doc_answers(text, ["conv2d_backward"]) == text  # not assigned: kept
    with pytest.raises(ValueError, match="names no assignment part"):
        A.strip_doc_answers("<!-- answer: nope -->\n```\n```\n", A.PART_NAMES, "p.md")
    with pytest.raises(ValueError, match="right above"):
        A.strip_doc_answers("<!-- answer: relu_backward -->\ntext\n", A.PART_NAMES, "p.md")


def copy_pytest(copy_root, *args, timeout=1500):
    env = dict(os.environ, PYTHONPATH=str(copy_root), MINIRES_BACKEND="numpy")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          cwd=copy_root, env=env, capture_output=True, text=True, timeout=timeout)


def test_on_stubs_each_part_says_not_written_yet_once(tmp_path):
    """A subset of the copy's suite that meets every part: one short failure per part."""
    A.make(tmp_path)
    result = copy_pytest(tmp_path, "tests/test_ops.py", "tests/test_conv.py::test_gradient_check",
                         "tests/test_pooling.py::test_gradient_check", "tests/test_models.py::test_whole_model_gradcheck")
    out = result.stdout
    # the failures, without pytest's summary lines (which repeat each one, cut to the terminal's width)
    failures = out.split("short test summary info")[0]
    for name, path in [("relu_backward", "activation"), ("linear_backward", "linear"),
                       ("softmax_cross_entropy_forward", "loss"), ("batchnorm2d_backward", "batchnorm"),
                       ("maxpool2d_backward", "pooling"), ("conv2d_backward", "conv")]:
        line = f"{name}: not written yet -- write its body (the TODO in minires/functional/{path}.py)"
        assert failures.count(line) == 1, (name, out[-3000:])
    assert "Traceback" not in out and len(out) < 20000
    assert result.returncode == 1


def test_check_runs_one_part(tmp_path):
    A.make(tmp_path, ["relu_backward", "maxpool2d_backward"])
    lines = []
    assert A.check("relu_backward", tmp_path, use_torch=False, out=lines.append) == 1
    assert lines == ["relu_backward: not written yet (the TODO in minires/functional/activation.py)"]
    solve(tmp_path, ["maxpool2d_backward"])
    lines = []
    assert A.check("maxpool2d_backward", tmp_path, use_torch=False, out=lines.append) == 0
    assert "score: 1/1" in lines[0] and re.search(r"\d+ passed", lines[1]), lines


def test_grader_shows_the_student_frames_points_hidden_cases_and_gradescope(tmp_path):
    A.make(tmp_path, ["conv2d_backward"])
    set_body(tmp_path, "conv2d_backward", ["    cols = im2col(x, kh, kw, stride, padding)",
                                            "    return cols @ dout, None, None"])
    (tmp_path / "points.json").write_text('{"conv2d_backward": 7, "relu_backward": 3}')
    (tmp_path / "hidden.json").write_text(json.dumps({"seed": 7, "cases": {
        "relu_backward": [[3, 2, 5]], "conv2d_backward": [[[1, 2, 6, 5], [3, 2, 3, 2], [1, 2], [2, 1], True]]}}))
    report = A.grade(tmp_path, ["relu_backward", "conv2d_backward"], use_torch=False,
                     hidden=tmp_path / "hidden.json", points=tmp_path / "points.json")
    relu, conv = report["parts"]
    assert relu["passed"] and relu["points"] == 3 and any(c["name"].startswith("hidden: ") for c in relu["checks"])
    assert not conv["passed"] and conv["points"] == 0 and conv["max_points"] == 7
    assert conv["case"] == "w (4, 3, 3, 3), stride 1, padding 1"
    assert conv["frames"][-1] == {"file": "minires/functional/conv.py", "line": conv["frames"][-1]["line"],
                                  "code": "return cols @ dout, None, None"}
    text = A.format_report(report, verbose=True)
    assert "minires/functional/conv.py:" in text and "hidden: x (3, 2, 5): dx" in text
    assert "3/10 points" in text
    results = A.gradescope_results(report)
    assert (results["score"], results["max_score"]) == (3, 10)
    assert [(t["name"], t["score"], t["max_score"], t["status"]) for t in results["tests"]] == [
        ("relu_backward", 3, 3, "passed"), ("conv2d_backward", 0, 7, "failed")]
    assert "return cols @ dout" in results["tests"][1]["output"]
    json.dumps(results)
    for bad, message in [('{"cases": {"linear_backward": []}}', "no hidden cases for part"), ("[", "expected JSON")]:
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(ValueError, match=message):
            A.grade(tmp_path, ["relu_backward"], hidden=tmp_path / "bad.json")
    with pytest.raises(ValueError, match="unknown part"):
        A.load_points(tmp_path / "hidden.json")


@pytest.mark.slow
def test_simple_solutions_pass_the_copys_whole_suite(tmp_path):
    """Issue 20: a student's simple correct solution passes the copy's own tests, all of them."""
    A.make(tmp_path, with_docs=True)
    solve(tmp_path)
    result = copy_pytest(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    assert re.search(r"[1-9]\d* passed", result.stdout)


def test_simple_solutions_pass_the_copys_tests_of_their_parts(tmp_path):
    """The cheap version of the test above: the tests marked with a part."""
    A.make(tmp_path)
    solve(tmp_path)
    result = copy_pytest(tmp_path, "-m", " or ".join(A.PART_NAMES))
    assert result.returncode == 0, result.stdout[-3000:]
    assert re.search(r"[1-9]\d* passed", result.stdout)


# --- notebooks: make writes them, their check cells, a fresh handout's first check ---------

JUPYTER_MISSING = [m for m in ("jupytext", "nbformat", "nbclient", "ipykernel")
                   if __import__("importlib.util").util.find_spec(m) is None]
needs_jupyter = pytest.mark.skipif(bool(JUPYTER_MISSING), reason=f"{', '.join(JUPYTER_MISSING)} not installed "
                                   '(pip install -e ".[notebooks]")')


def test_the_install_command_installs_what_the_notebooks_need():
    import configparser

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    extras = config["options.extras_require"]
    notebooks = [re.match(r"[\w-]+", line).group(0) for line in extras["notebooks"].split("\n") if line.strip()]
    assert {"jupytext", "nbformat", "nbclient", "ipykernel", "notebook"} <= set(notebooks)
    assert not set(notebooks) & {re.match(r"[\w-]+", line).group(0)
                                 for line in config["options"]["install_requires"].split("\n") if line.strip()}
    assert INSTALL.split('"')[1] == ".[test,notebooks]" and {"test", "notebooks"} <= set(extras)
    ci = ROOT / ".ci" / "run"
    assert 'pip install -q -e ".[notebooks]"' in ci.read_text()  # so CI runs the notebook tests


def test_make_without_jupytext_writes_the_percent_files_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "jupytext", None)  # import jupytext -> ImportError
    assert A.notebook_format() == "py"
    args = __import__("argparse").Namespace(out=str(tmp_path / "h"), only=["conv2d_backward"], force=False,
                                            with_docs=False)
    assert A.run_make(args) == 0
    said = capsys.readouterr().out
    assert "jupytext is not installed" in said and "percent-format .py" in said
    # only the notebook of the assigned part, byte for byte its source
    assert [p.name for p in (tmp_path / "h" / "notebooks").iterdir()] == ["3-pool-conv.py"]
    assert (tmp_path / "h" / "notebooks" / "3-pool-conv.py").read_bytes() == \
        (ROOT / "notebooks" / "3-pool-conv.py").read_bytes()
    assignment = (tmp_path / "h" / "ASSIGNMENT.md").read_text()
    assert "| `notebooks/3-pool-conv.py` | `conv2d_backward` |" in assignment
    assert "percent-format `.py` files" in assignment


@needs_jupyter
def test_make_writes_valid_notebooks_without_outputs(tmp_path):
    import nbformat

    A.make(tmp_path)
    files = sorted(p.name for p in (tmp_path / "notebooks").iterdir())
    assert files == sorted(f"{stem}.ipynb" for stem, _ in A.NOTEBOOKS)
    for name in files:
        notebook = nbformat.read(tmp_path / "notebooks" / name, as_version=4)
        nbformat.validate(notebook)
        assert notebook.metadata.kernelspec.name == "python3" and "jupytext" not in notebook.metadata
        assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
        assert any("%autoreload 2" in cell.source for cell in notebook.cells)  # the magic, uncommented
    assignment = (tmp_path / "ASSIGNMENT.md").read_text()
    assert "| `notebooks/1-relu-linear-softmax.ipynb` | `relu_backward`, `linear_backward`," in assignment
    assert assignment.index("## The notebooks") < assignment.index("## The parts")


def test_check_parts_says_one_line_per_part_and_raises_unless_all_pass(tmp_path):
    A.make(tmp_path, ["relu_backward", "linear_backward"])
    set_body(tmp_path, "linear_backward", ["    x, w, _ = cache", "    return dout @ w, x.T @ dout, None"])
    lines = []
    with pytest.raises(A.PartsNotPassing, match=r"^relu_backward: not written yet \(the TODO in "
                                                r"minires/functional/activation.py\); linear_backward: FAIL"):
        A.check_parts("relu_backward", "linear_backward", "softmax_cross_entropy_backward", path=tmp_path,
                      use_torch=False, out=lines.append)
    assert lines[0] == "relu_backward: not written yet (the TODO in minires/functional/activation.py)"
    assert lines[1].startswith("linear_backward: FAIL [with bias: dw] dw has shape (4, 3), expected (3, 4)")
    assert re.match(r"softmax_cross_entropy_backward: PASS \(\d+ checks, worst relative error \d\.\de-\d+\)$",
                    lines[2]), lines[2]
    # default: the checkout this minires comes from (the reference here, so relu passes)
    assert A.check_parts("relu_backward", out=lines.append, use_torch=False) is None
    assert lines[-1].startswith("relu_backward: PASS")
    for bad, message in [((), "name the parts"), (("nope",), "unknown assignment part")]:
        with pytest.raises(ValueError, match=message):
            A.check_parts(*bad, out=lines.append)


def test_notebook_setup_refuses_a_minires_that_is_not_the_copy_around_it(tmp_path):
    A.make(tmp_path, ["relu_backward"])
    (tmp_path / "notebooks").mkdir(exist_ok=True)
    with pytest.raises(RuntimeError, match="pip install -e") as info:
        A.notebook_setup(cwd=tmp_path / "notebooks", out=lambda line: None)
    assert str(tmp_path.resolve()) in str(info.value) and str(PACKAGE) in str(info.value)
    said = []
    A.notebook_setup(cwd=ROOT / "notebooks", out=said.append)
    assert said == [f"minires from {PACKAGE}"]


@pytest.fixture(scope="module")
def fresh_handout(tmp_path_factory):
    out = tmp_path_factory.mktemp("handout")
    A.make(out, with_docs=True)
    return out


@needs_jupyter
@pytest.mark.parametrize("stem, parts", A.NOTEBOOKS, ids=[stem for stem, _ in A.NOTEBOOKS])
def test_a_fresh_handouts_notebook_stops_at_its_first_check_with_not_written_yet(stem, parts, fresh_handout,
                                                                                 monkeypatch):
    """The handout's .ipynb, run as a student would after installing the copy: the
    setup cell names the copy's minires; the first check cell fails with its part's
    "not written yet" (and nothing before it fails)."""
    import nbformat
    from nbclient.exceptions import CellExecutionError

    from test_notebooks import checked_parts, run_cells

    notebook = nbformat.read(fresh_handout / "notebooks" / f"{stem}.ipynb", as_version=4)
    first = next(i for i, cell in enumerate(notebook.cells) if cell.cell_type == "code" and checked_parts(cell))
    monkeypatch.setattr("test_notebooks.ROOT", fresh_handout)  # the kernel imports the copy's minires
    with pytest.raises(CellExecutionError) as info:
        run_cells(notebook, fresh_handout / "notebooks", monkeypatch, stop=first)
    not_written = A._not_written_line(parts[0])
    assert (info.value.ename, info.value.evalue) == ("PartsNotPassing", not_written)
    assert notebook.cells[first]["outputs"][0]["text"] == not_written + "\n"  # the verdict line, printed
    setup = next(cell for cell in notebook.cells if cell.cell_type == "code")
    assert setup.outputs[0]["text"] == f"minires from {fresh_handout / 'minires'}\n"


# --- docs/assignments.md: the instructor's path, run as written ----------------------------

ASSIGNMENTS_DOC = ROOT / "docs" / "assignments.md"

#: The commands of the instructor's path that the test below does not run, and why.
NOT_RUN = {
    'pip install -e ".[test,notebooks]"': "installs packages into this Python, which has them (setup.cfg's extras)",
    "jupyter notebook notebooks/": "opens a browser; tests/test_notebooks.py runs every notebook with nbclient",
    "python -m pytest -q": "the handout's whole suite (minutes): test_simple_solutions_pass_the_copys_whole_suite, "
                           "marked slow, runs it",
    "python -m minires train --subset 2000 --epochs 1": "a real training run; tests/test_train.py trains the same "
                                                         "way on smaller subsets",
}


def instructors_path():
    """The bash blocks of sections "1." to "8." of docs/assignments.md, in order."""
    blocks = []
    for section in re.split(r"^## ", ASSIGNMENTS_DOC.read_text(), flags=re.M):
        if re.match(r"[1-8]\. ", section):
            blocks += [code for info, code in re.findall(r"^```(\S*)[^\n]*\n(.*?)^```", section, re.S | re.M)
                       if info == "bash"]
    return blocks


@pytest.mark.slow  # ~40 s of subprocesses on 2 cores (CI runs it: pytest -m slow)
def test_the_instructors_path_runs_as_written(tmp_path):
    """Every command of the instructor's path, in order, in a scratch folder; between
    two blocks the test does what a person does: a student writes a correct solution
    into the handout (before the block that starts with `cd handout`), the instructor
    collects it as submissions/alice (before the first block that grades it)."""
    blocks = instructors_path()
    assert len(blocks) >= 8
    env = dict(os.environ, PYTHONPATH=str(ROOT), MINIRES_BACKEND="numpy",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    skipped, outputs = set(), []
    for block in blocks:
        kept = []
        for line in block.splitlines():
            command = re.split(r"\s+#\s", line)[0].strip()
            if command in NOT_RUN:
                skipped.add(command)
            else:
                kept.append(line)
        script = "\n".join(kept)
        if script.startswith("cd handout"):
            solve(tmp_path / "handout")
        alice = tmp_path / "submissions" / "alice"
        if "submissions/" in script and not alice.exists():
            shutil.copytree(tmp_path / "handout", alice, ignore=shutil.ignore_patterns("__pycache__"))
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, (script, proc.stdout[-3000:], proc.stderr[-3000:])
        outputs.append(proc.stdout)
    assert skipped == set(NOT_RUN), "a command in NOT_RUN is no longer in docs/assignments.md"
    everything = "\n".join(outputs)
    assert "score: 0/8 parts passed" in everything                     # the fresh handout, graded
    assert "relu_backward: PASS" in everything or re.search(r"relu_backward +PASS", everything)
    assert json.loads((tmp_path / "alice.json").read_text())["passed"] == len(A.PARTS)
    assert json.loads((tmp_path / "scores" / "alice.json").read_text())["passed"] == len(A.PARTS)
    results = json.loads((tmp_path / "results.json").read_text())     # the last grade: points, hidden cases
    table = A.load_points(tmp_path / "points.json")
    assert results["score"] == results["max_score"] == sum(table.values()) != 100
    assert len(results["tests"]) == len(A.PARTS)
    week3 = sorted(p.suffix for p in (tmp_path / "week3" / "notebooks").iterdir())
    assert week3 == [".ipynb" if A.notebook_format() == "ipynb" else ".py"]
