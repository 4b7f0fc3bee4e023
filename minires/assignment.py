"""Course-assignment kit: student copies with stubbed backward passes, and an autograder.

The teachable parts of the source are marked with comment lines around a body::

    def some_backward(dout, cache):
        \"\"\"...\"\"\"
        check_some_dout(dout, cache)   # outside the markers: stays in the copy
        # BEGIN ASSIGNMENT some_backward
        ...                            # the body a student writes
        # END ASSIGNMENT some_backward

``python -m minires assignment make --out DIR [--only NAMES]`` copies the
package (and its tests) to DIR and replaces each selected body by a TODO that
states the inputs, outputs and shapes, and a ``raise NotImplementedError``.
Everything else stays as it is, so students can run the tests, the gradient
checks and the training loop on their own code.

``python -m minires assignment grade [--path DIR] [--json]`` grades the copy at
DIR (default: the current folder if it holds a ``minires/`` package), part by
part: numerical gradient checks (centered differences, float64, random
upstream gradient) and, where PyTorch is installed, parity with
``torch.autograd``. The checks run in a separate Python process whose
``PYTHONPATH`` is DIR, so the student's ``minires`` is the one imported, never
the grader's own (if an installed ``minires`` still comes first, grading stops
with an error naming both); they use their own numerical gradient code, not
the student's ``minires.gradcheck``. Exit status 0 only if every part passes.

This file is also the grading worker: the grader runs it as a script
(``python -P assignment.py --worker ...``), so its top level imports only the
standard library; ``numpy`` and the student's ``minires`` are imported in the
worker functions.

``make`` also writes the notebooks (``notebooks/*.py`` in the course repository,
jupytext percent format) into the copy as ``.ipynb``; each notebook's check
cells call :func:`check_parts`.

How to run a course with it: docs/assignments.md.
"""
import argparse
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

#: A marker line: ``# BEGIN ASSIGNMENT name`` or ``# END ASSIGNMENT name``.
MARKER = re.compile(r"^(?P<indent>[ \t]*)# (?P<kind>BEGIN|END) ASSIGNMENT (?P<name>\w+)[ \t]*$")

#: Both kinds of check must agree with the analytic gradient this well (float64).
TOLERANCE = 1e-7


@dataclass(frozen=True)
class Part:
    """One assignment part: a marked body and what the student is told about it."""

    name: str      # the marker name, also what --only accepts
    path: str      # the file inside the package that holds the marked body
    function: str  # what the body implements (module path + qualified name)
    doc: str       # the derivation page
    todo: str      # inputs, outputs and shapes, written into the stub
    hint: str      # shown by `grade` when the part fails
    # What else a student copy leaves out, because it would give the body away:
    # ("file in the package", "top-level function") pairs -- the loop twin and the
    # engine's version -- each replaced there by a function that raises, and the
    # CUDA kernels (names in kernels/cuda.py's source) of the same op.
    left_out: tuple = ()
    cuda_kernels: tuple = ()
    points: int = 10  # default points; `grade --points FILE` overrides them


PARTS = (
    Part(
        "relu_backward", "functional/activation.py", "minires.functional.activation.relu_backward",
        "docs/backward/relu.md",
        """Backward of out = max(0, x).
Inputs:  dout  -- upstream gradient dL/dout, any shape
         cache -- what relu_forward saved: out, the forward's output (same shape as dout)
Returns: dx    -- dL/dx, same shape as dout; do not modify dout in place.""",
        "the cache is the forward's output: the gradient passes where the unit was active",
        left_out=(("kernels/activation.py", "relu_backward"), ("kernels/cuda.py", "relu_backward")),
        cuda_kernels=("relu_backward",), points=5,
    ),
    Part(
        "linear_backward", "functional/linear.py", "minires.functional.linear.linear_backward",
        "docs/backward/linear.md",
        """Backward of out = x @ w.T + b.
Inputs:  dout  -- (N, M) upstream gradient
         cache -- (x, w, has_bias): x (N, D), w (M, D), has_bias a bool
Returns: (dx, dw, db) -- dx (N, D), dw (M, D) summed over the batch,
         db (M,) or None when has_bias is False.""",
        "each gradient has the shape of what it is the gradient of (dx like x, dw like w); "
        "db is None without a bias",
    ),
    Part(
        "softmax_cross_entropy_forward", "functional/loss.py",
        "minires.functional.loss.softmax_cross_entropy_forward", "docs/backward/softmax-cross-entropy.md",
        """Softmax cross-entropy averaged over the batch.
Inputs:  logits -- (N, K) floats; labels -- (N,) integers in [0, K) (already checked)
         xp     -- the array module (numpy or cupy), set above
Returns: (loss, cache) -- loss a 0-d array: -(1/N) sum_n log p[n, labels[n]];
         cache = (probs, labels) with probs (N, K) the softmax of the logits
         (softmax_cross_entropy_backward reads exactly this tuple).
Must stay finite for logits of any size (think log-sum-exp).""",
        "subtract each row's maximum before exp so nothing overflows; average over the batch; "
        "cache = (probs, labels)",
        left_out=(("functional/loss.py", "softmax_cross_entropy_forward_naive"),
                  ("kernels/loss.py", "softmax_cross_entropy_forward"),
                  ("kernels/cuda.py", "softmax_cross_entropy_forward")),
        cuda_kernels=("softmax_xent_forward",),
    ),
    Part(
        "softmax_cross_entropy_backward", "functional/loss.py",
        "minires.functional.loss.softmax_cross_entropy_backward", "docs/backward/softmax-cross-entropy.md",
        """Gradient of the batch-mean softmax cross-entropy w.r.t. the logits.
Inputs:  dloss -- scalar upstream gradient dL_total/dloss (1.0 at the start of backward)
         cache -- (probs, labels): probs (N, K) softmax probabilities, labels (N,) ints
Returns: dlogits -- (N, K); do not modify probs in place (copy first).""",
        "mind the one-hot of the labels, the 1/N of the batch mean, and the factor dloss",
        left_out=(("kernels/loss.py", "softmax_cross_entropy_backward"),
                  ("kernels/cuda.py", "softmax_cross_entropy_backward")),
        cuda_kernels=("softmax_xent_backward",),
    ),
    Part(
        "batchnorm2d_backward", "functional/batchnorm.py",
        "minires.functional.batchnorm.batchnorm2d_backward", "docs/backward/batchnorm.md",
        """Backward of per-channel batch normalization, training and eval mode.
Inputs:  dout  -- (N, C, H, W) upstream gradient
         cache -- (x_hat, gamma, inv_std, training): x_hat (N, C, H, W),
                  gamma (C,), inv_std (C,) = 1/sqrt(var + eps), training a bool
Returns: (dx, dgamma, dbeta) -- dx (N, C, H, W), dgamma (C,), dbeta (C,).
Training: mean and var depend on x (M = N*H*W values per channel).
Eval: mean and var are constants (the running statistics).
Helpers in this file: _AXES = (0, 2, 3); _per_channel(v) reshapes (C,) to (1, C, 1, 1).""",
        "reduce over batch and space (axes 0, 2, 3), per channel; in training mode dx also "
        "flows through the batch mean and variance",
        left_out=(("functional/batchnorm.py", "batchnorm2d_backward_naive"),
                  ("kernels/batchnorm.py", "batchnorm2d_backward"), ("kernels/cuda.py", "batchnorm_backward")),
        cuda_kernels=("bn_backward_sums", "bn_backward_dx"), points=15,
    ),
    Part(
        "maxpool2d_backward", "functional/pooling.py",
        "minires.functional.pooling.maxpool2d_backward", "docs/backward/pooling.md",
        """Backward of max pooling.
Inputs:  dout  -- (N, C, Ho, Wo) upstream gradient
         cache -- (x_shape, argmax, (kh, kw), (sh, sw), (ph, pw)):
                  x_shape = (N, C, H, W); argmax (N, C, Ho, Wo) holds, for every
                  output, the winning kernel offset k = i*kw + j in its window
Returns: dx -- (N, C, H, W): each dout entry goes to the pixel that won its window.
First check dout: _check_dout("maxpool2d", dout, expected) raises ValueError unless dout has
the shape `expected` (that of argmax).
Helpers in this file: _offset_view(a, i, j, stride, out_hw), _crop(dx_pad, padding, x_shape).""",
        "route each gradient to its window's arg-max; windows overlap when stride < kernel, so "
        "contributions must add; crop the padding at the end",
        left_out=(("functional/pooling.py", "maxpool2d_backward_naive"),),
    ),
    Part(
        "conv2d_backward", "functional/conv.py", "minires.functional.conv.conv2d_backward",
        "docs/backward/conv2d.md",
        """Backward of the 2-D convolution (cross-correlation) of conv2d_forward.
Inputs:  dout  -- (N, F, Ho, Wo) upstream gradient
         cache -- (x, w, b, (sh, sw), (ph, pw)): x (N, C, H, W), w (F, C, kh, kw),
                  b (F,) or None
Returns: nothing itself: set dx (N, C, H, W), dw (F, C, kh, kw) and db (F,),
         or db = None without bias; the line after this body returns them.
Already set above: F, kh, kw, and stride = (sh, sw), padding = (ph, pw) as pairs; dout is checked.
Helpers in this file: im2col(x, kh, kw, stride, padding) -> cols (C*kh*kw, N*Ho*Wo),
and col2im(cols, x.shape, kh, kw, stride, padding) -> (N, C, H, W), its adjoint.""",
        "dw and db sum over the batch and all output positions; every input pixel collects "
        "(adds) one contribution per window it belongs to; cut the padding off dx",
        left_out=(("functional/conv.py", "conv2d_backward_naive"), ("kernels/conv.py", "conv2d_backward")),
        points=20,
    ),
    Part(
        "residual_block_backward", "models/blocks.py", "minires.models.blocks.ResidualBlock.backward",
        "docs/backward/residual.md",
        """Backward of out = relu(branch(x) + shortcut(x)).
Inputs:  dout -- (N, C_out, H_out, W_out) upstream gradient
Uses:    self.relu (the final ReLU module), self.branch (list of layers, in forward order),
         self.downsample (None for the identity shortcut, else a module); every
         module's .backward(d) returns the gradient of its input and stores its
         parameter gradients itself. add_backward(d) -> (d_branch, d_shortcut).
Returns: dx -- (N, C_in, H, W), the gradient of the block's input x.""",
        "x feeds both the branch and the shortcut, so its gradient is the sum of both paths; "
        "go back through the final ReLU first and through the branch in reverse order",
    ),
)

PART_NAMES = tuple(p.name for p in PARTS)
_PART_BY_NAME = {p.name: p for p in PARTS}

#: The notebooks, in the order students work through them: ``notebooks/STEM.py`` in the
#: course repository (jupytext percent format), and the parts whose checks each runs.
NOTEBOOKS = (
    ("1-relu-linear-softmax", ("relu_backward", "linear_backward", "softmax_cross_entropy_forward",
                               "softmax_cross_entropy_backward")),
    ("2-batchnorm", ("batchnorm2d_backward",)),
    ("3-pool-conv", ("maxpool2d_backward", "conv2d_backward")),
    ("4-residual-block", ("residual_block_backward",)),
)
assert [n for _, parts in NOTEBOOKS for n in parts] == list(PART_NAMES)  # every part once, in PARTS order


# ======================================================================================
# markers
# ======================================================================================

@dataclass(frozen=True)
class Region:
    """A marked body: lines ``begin`` (the BEGIN marker) to ``end`` (the END marker), 0-based."""

    name: str
    begin: int
    end: int
    indent: str


def find_regions(text, filename="<text>"):
    """Every marked region of a source text, in order. Raises ValueError on unbalanced markers."""
    regions, open_region = [], None
    for number, line in enumerate(text.splitlines()):
        match = MARKER.match(line)
        if match is None:
            if "ASSIGNMENT" in line and re.match(r"\s*#\s*(BEGIN|END)\b", line):
                raise ValueError(f"{filename}:{number + 1}: malformed assignment marker {line.strip()!r}")
            continue
        kind, name, indent = match["kind"], match["name"], match["indent"]
        if kind == "BEGIN":
            if open_region is not None:
                raise ValueError(f"{filename}:{number + 1}: BEGIN ASSIGNMENT {name} inside "
                                 f"{open_region[0]} (markers do not nest)")
            open_region = (name, number, indent)
        else:
            if open_region is None or open_region[0] != name:
                expected = f"END ASSIGNMENT {open_region[0]}" if open_region else "a BEGIN marker first"
                raise ValueError(f"{filename}:{number + 1}: END ASSIGNMENT {name}, expected {expected}")
            if indent != open_region[2]:
                raise ValueError(f"{filename}:{number + 1}: END ASSIGNMENT {name} is indented "
                                 "differently from its BEGIN marker")
            regions.append(Region(name, open_region[1], number, indent))
            open_region = None
    if open_region is not None:
        raise ValueError(f"{filename}:{open_region[1] + 1}: BEGIN ASSIGNMENT {open_region[0]} "
                         "has no END marker")
    return regions


def package_regions(package_dir):
    """dict name -> (relative path, Region) for every marked body under ``package_dir``.

    Raises ValueError for a name marked twice or a marker the registry does not know.
    """
    found = {}
    for path in sorted(Path(package_dir).rglob("*.py")):
        rel = path.relative_to(package_dir).as_posix()
        if "__pycache__" in path.parts or rel == "assignment.py":  # this file shows markers as examples
            continue
        for region in find_regions(path.read_text(), rel):
            if region.name not in _PART_BY_NAME:
                raise ValueError(f"{rel}:{region.begin + 1}: unknown assignment part {region.name!r} "
                                 f"(known: {', '.join(PART_NAMES)})")
            if region.name in found:
                raise ValueError(f"assignment part {region.name!r} is marked twice "
                                 f"({found[region.name][0]} and {rel})")
            found[region.name] = (rel, region)
    return found


def doc_reference(part, root=None):
    """Where the part's derivation page is, as told to a student: ``part.doc`` when
    the folder ``root`` holds it, else the same path said to be in the course
    repository (a student copy has no docs/ unless made ``--with-docs``)."""
    if root is not None and (Path(root) / part.doc).is_file():
        return part.doc
    return f"{part.doc} in the course repository (not in this copy)"


def stub_lines(part, indent, doc=None):
    """The lines that replace a marked body in the student copy (markers not included).

    ``doc`` is what the TODO says about the derivation page (default: ``part.doc``).
    """
    lines = [f"{indent}# TODO({part.name}): write this body.", f"{indent}# The math: {doc or part.doc}"]
    lines += [f"{indent}#   {line}".rstrip() for line in part.todo.splitlines()]
    lines.append(f'{indent}raise NotImplementedError("{part.name}: not written yet, see the TODO above")')
    return lines


def replace_region(text, region, body_lines):
    """``text`` with the lines strictly between the region's markers replaced by ``body_lines``."""
    lines = text.splitlines()
    new = lines[:region.begin + 1] + list(body_lines) + lines[region.end:]
    return "\n".join(new) + ("\n" if text.endswith("\n") else "")


def region_body(text, region):
    """The lines strictly between a region's markers."""
    return text.splitlines()[region.begin + 1:region.end]


def parse_names(values):
    """``--only`` values (space- or comma-separated) -> a tuple of part names, in PARTS order."""
    if not values:
        return PART_NAMES
    names = {n.strip() for v in values for n in v.split(",") if n.strip()}
    unknown = sorted(names - set(PART_NAMES))
    if unknown:
        raise ValueError(f"unknown assignment part(s) {', '.join(unknown)}; known: {', '.join(PART_NAMES)}")
    return tuple(n for n in PART_NAMES if n in names)


# ======================================================================================
# what else a copy leaves out: loop twins, engine versions, CUDA kernels, doc code
# ======================================================================================

#: What the functions a copy leaves out raise (tests/conftest.py skips a test that meets it).
LEFT_OUT = "left out of this student copy"

#: A doc line that marks the fenced code block right below it as the body of a part.
DOC_ANSWER = re.compile(r"^<!-- answer: (?P<name>\w+) -->[ \t]*$")


def _top_level_function(tree, name, rel):
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise ValueError(f"{rel}: no top-level function {name}() to leave out (the PARTS table is stale)")


def leave_out_function(text, name, rel, part):
    """``text`` with function ``name`` replaced by one that raises NotImplementedError.

    The name and signature stay (imports and tests that name it keep working);
    the docstring and body go: they would give away the body of ``part``.
    """
    node = _top_level_function(ast.parse(text), name, rel)
    first = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
    lines = text.splitlines()
    stub = [f"def {name}({ast.unparse(node.args)}):",
            f'    """{LEFT_OUT[0].upper()}{LEFT_OUT[1:]}: it would give away the part {part}."""',
            f'    raise NotImplementedError("{name} (minires/{rel}) is {LEFT_OUT}: '
            f'it would give away the part {part}")']
    return "\n".join(lines[:first] + stub + lines[node.end_lineno:]) + "\n"


def _names_used(tree, skip=None):
    """Every name the code of ``tree`` reads (names, attributes, imports), outside node ``skip``."""
    used, stack = set(), [tree]
    while stack:
        node = stack.pop()
        if node is skip:
            continue
        if isinstance(node, ast.Name):
            used.add(node.id)
        elif isinstance(node, ast.Attribute):
            used.add(node.attr)
        elif isinstance(node, ast.alias):
            used.add(node.name)
        stack.extend(ast.iter_child_nodes(node))
    return used


def drop_unused_private_functions(package_dir, rel):
    """Delete the private top-level functions (``_name``) of file ``rel`` that no code
    in the package calls any more (helpers only a left-out function called)."""
    package_dir = Path(package_dir)
    target = package_dir / rel
    elsewhere = set()
    for path in sorted(package_dir.rglob("*.py")):
        if path != target:
            elsewhere |= _names_used(ast.parse(path.read_text()))
    while True:
        text = target.read_text()
        tree = ast.parse(text)
        unused = next((node for node in tree.body
                       if isinstance(node, ast.FunctionDef) and node.name.startswith("_")
                       and node.name not in elsewhere | _names_used(tree, skip=node)), None)
        if unused is None:
            return
        lines = text.splitlines()
        first = min([unused.lineno] + [d.lineno for d in unused.decorator_list]) - 1
        end = unused.end_lineno
        while end < len(lines) and not lines[end].strip():
            end += 1  # and the blank lines after it
        target.write_text("\n".join(lines[:first] + lines[end:]) + "\n")


def drop_cuda_kernels(text, kernels):
    """kernels/cuda.py's text without the named kernels: each is a section of its
    ``_SOURCE`` string that starts at a ``// ---- `` comment line."""
    head, sep, rest = text.partition('_SOURCE = r"""\n')
    source, sep2, tail = rest.partition('"""\n')
    if not sep or not sep2:
        raise ValueError("kernels/cuda.py: no _SOURCE string to leave kernels out of")
    sections, current = [], []
    for line in source.splitlines(keepends=True):
        if line.startswith("// ---- ") and current:
            sections.append(current)
            current = []
        current.append(line)
    sections.append(current)
    kept = []
    for kernel in kernels:
        if not any(f"__global__ void {kernel}(" in "".join(sec) for sec in sections):
            raise ValueError(f"kernels/cuda.py: no CUDA kernel {kernel} to leave out")
    for section in sections:
        if not any(f"__global__ void {kernel}(" in "".join(section) for kernel in kernels):
            kept.append("".join(section))
    return head + sep + "".join(kept).rstrip("\n") + "\n" + sep2 + tail


def set_textbook_only(text, ops):
    """ops.py's text with TEXTBOOK_ONLY naming ``ops``: the seam runs the textbook's
    (the student's) code for them, also with the fast kernels."""
    line = re.compile(r"^TEXTBOOK_ONLY = \(\)$", re.M)
    if not line.search(text):
        raise ValueError("ops.py: no `TEXTBOOK_ONLY = ()` line to fill in")
    names = "".join(f'\n    "{op}",' for op in ops)
    return line.sub(f"TEXTBOOK_ONLY = ({names}\n)  # this copy's assigned parts", text, count=1)


def strip_doc_answers(text, names, filename="<doc>"):
    """A docs page without the fenced code blocks marked ``<!-- answer: NAME -->``
    for the parts in ``names``; the prose and the math around them stay."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        match = DOC_ANSWER.match(lines[i])
        out.append(lines[i])
        i += 1
        if match is None:
            continue
        name = match["name"]
        if name not in _PART_BY_NAME:
            raise ValueError(f"{filename}:{i}: answer marker names no assignment part: {name!r}")
        if i >= len(lines) or not lines[i].startswith("```"):
            raise ValueError(f"{filename}:{i}: an answer marker must sit right above a ``` code block")
        if name not in names:
            continue
        end = next((k for k in range(i + 1, len(lines)) if lines[k].startswith("```")), None)
        if end is None:
            raise ValueError(f"{filename}:{i + 1}: code block never closed")
        out.append(f"*(This code block is the body of the assignment part `{name}`: it is {LEFT_OUT}.)*")
        i = end + 1
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def op_names(package_dir):
    """The op names of the seam (``OPS`` in ops.py), read without importing it."""
    for node in ast.parse((Path(package_dir) / "ops.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "OPS" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise ValueError(f"{package_dir}/ops.py: no OPS tuple")


def leave_out(out, names):
    """Rewrite the copy at ``out`` so that nothing but the stub is left of each part in
    ``names``: twins and engine versions raise, their CUDA kernels go, and the seam runs the textbook (the student's code) for the assigned ops."""
    package = Path(out) / "minires"
    touched = set()
    for name in names:
        part = _PART_BY_NAME[name]
        for rel, function in part.left_out:
            target = package / rel
            target.write_text(leave_out_function(target.read_text(), function, rel, name))
            touched.add(rel)
    for rel in sorted(touched):
        drop_unused_private_functions(package, rel)
    kernels = [k for name in names for k in _PART_BY_NAME[name].cuda_kernels]
    cuda = package / "kernels" / "cuda.py"
    if kernels and cuda.is_file():
        cuda.write_text(drop_cuda_kernels(cuda.read_text(), kernels))
    # The ENGINE table keeps its entries (now functions that raise): the seam never
    # takes them, since TEXTBOOK_ONLY names every assigned op.
    ops = [name for name in names if name in op_names(package)]
    (package / "ops.py").write_text(set_textbook_only((package / "ops.py").read_text(), ops))
    for rel in sorted(touched | {"ops.py", "kernels/cuda.py"}):
        compile((package / rel).read_text(), str(package / rel), "exec")  # a bug in this file otherwise
    docs = Path(out) / "docs"
    for page in sorted(docs.rglob("*.md")) if docs.is_dir() else ():
        page.write_text(strip_doc_answers(page.read_text(), names, str(page)))


# ======================================================================================
# make
# ======================================================================================

def source_root():
    """The folder that holds this ``minires`` package (the repository root for a checkout)."""
    return Path(__file__).resolve().parents[1]


_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".pytest_cache")
# Tests of the instructor's tooling itself, not of the student's code.
_INSTRUCTOR_TESTS = ("test_assignment.py",)


def make(out, only=None, force=False, with_docs=False, root=None):
    """Write a student copy of the package to ``out``; returns the stubbed part names.

    out/minires/  the package, every selected body replaced by a TODO stub
    out/tests/    the test suite (minus the instructor's tests of this kit)
    out/demos/    the demo scripts (a test runs them)
    out/docs/     only with ``with_docs`` (the derivations state every formula)
    out/notebooks/  the notebooks of the selected parts (:func:`write_notebooks`)
    out/ASSIGNMENT.md  the parts, their TODOs and how to check them
    out/pyproject.toml, setup.cfg, README.md  so that `pip install -e .` works there

    ``only`` is an iterable of part names (default: all). ``out`` must not exist
    or be empty, unless ``force`` (then only the folders above are replaced).
    """
    root = Path(root) if root is not None else source_root()
    package = root / "minires"
    names = parse_names(only)
    out = Path(out).resolve()
    if out == root.resolve() or out in root.resolve().parents:
        raise ValueError(f"--out {out} would hold the reference checkout {root} itself: choose a new folder")
    if package.resolve() in (out, *out.parents):
        raise ValueError(f"--out {out} is inside the reference package {package}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise ValueError(f"--out {out} exists and is not empty (use --force to replace its "
                         "minires/, tests/, demos/, docs/ and notebooks/)")
    if (root / "ASSIGNMENT.md").is_file():
        raise ValueError(f"{root} is a student copy: make handouts from the course repository")
    regions = package_regions(package)
    missing = [n for n in names if n not in regions]
    if missing:
        raise ValueError(f"no markers for part(s) {', '.join(missing)} in {package}")

    out.mkdir(parents=True, exist_ok=True)
    copies = [("minires", _IGNORE)]
    if (root / "tests").is_dir():
        copies.append(("tests", shutil.ignore_patterns(*_INSTRUCTOR_TESTS, "__pycache__", "*.pyc")))
    if (root / "demos").is_dir():
        copies.append(("demos", _IGNORE))
    if with_docs and (root / "docs").is_dir():
        copies.append(("docs", _IGNORE))
    for folder, ignore in copies:
        if (out / folder).exists():
            shutil.rmtree(out / folder)
        shutil.copytree(root / folder, out / folder, ignore=ignore)
    for extra in ("pyproject.toml", "setup.cfg"):  # so `pip install -e .` works in the copy
        if (root / extra).is_file():
            shutil.copy2(root / extra, out / extra)
    # not the project's README: it quotes ResidualBlock.backward (setup.cfg reads a README.md)
    (out / "README.md").write_text("# minires, student copy\n\n" + "\n".join(_SETUP) + "\n\n"
                                   "Then read ASSIGNMENT.md: the parts to write and how to check them.\n")

    by_file = {}
    for name in names:
        rel, region = regions[name]
        by_file.setdefault(rel, []).append(region)
    for rel, file_regions in by_file.items():
        target = out / "minires" / rel
        text = target.read_text()
        for region in sorted(file_regions, key=lambda r: r.begin, reverse=True):  # bottom up: lines stay valid
            part = _PART_BY_NAME[region.name]
            text = replace_region(text, region, stub_lines(part, region.indent, doc_reference(part, out)))
        compile(text, str(target), "exec")  # a stub that does not parse is a bug in this file
        target.write_text(text)
    leave_out(out, names)
    write_notebooks(root, out, names)
    (out / "ASSIGNMENT.md").write_text(_assignment_readme(names, out))
    return list(names)


def notebook_format():
    """What ``make`` writes the notebooks as: "ipynb" where jupytext is installed
    (``pip install -e ".[notebooks]"``), else "py" (the percent-format sources)."""
    try:
        import jupytext  # noqa: F401
    except ImportError:
        return "py"
    return "ipynb"


def write_notebooks(root, out, names):
    """Write the notebooks that check any of the parts ``names`` into ``out/notebooks/``;
    returns the files written.

    The sources are ``root/notebooks/STEM.py`` (:data:`NOTEBOOKS`), in jupytext's
    percent format. With jupytext installed each becomes ``STEM.ipynb`` (no outputs);
    without it the ``.py`` file is copied as it is (Jupyter with jupytext, VS Code
    and plain ``python`` all run it), so that making a handout never needs the
    notebooks extra. A course repository without ``notebooks/`` writes none.
    """
    source = Path(root) / "notebooks"
    if not source.is_dir():
        return []
    dest = Path(out) / "notebooks"
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    as_ipynb = notebook_format() == "ipynb"
    written = []
    for stem, parts in NOTEBOOKS:
        if not set(parts) & set(names):
            continue
        path = source / f"{stem}.py"
        if not path.is_file():
            raise ValueError(f"{path} is missing (NOTEBOOKS in minires/assignment.py names it)")
        if as_ipynb:
            import jupytext

            notebook = jupytext.read(path, fmt="py:percent")
            notebook.metadata.pop("jupytext", None)  # a plain notebook, not paired with a .py
            target = dest / f"{stem}.ipynb"
            jupytext.write(notebook, target, fmt="ipynb")
        else:
            target = dest / path.name
            shutil.copy2(path, target)
        written.append(target)
    return written


# The first thing a student does in the copy: make `minires` mean the copy. An
# installed minires (the course repository's, say) would otherwise be what plain
# `pytest` and the `minires` command import, and they would test the reference.
_SETUP = [
    "## First: install this copy",
    "",
    "Inside this folder, in a fresh virtual environment (PyTorch is not needed):",
    "",
    "```bash",
    'pip install -e ".[test,notebooks]"   # minires (this copy), NumPy, pytest, Jupyter: all the checks and notebooks need',
    "```",
    "",
    "`minires` is now this copy: `python -c \"import minires; print(minires.__file__)\"` prints a",
    "path inside this folder. Run the tests with `python -m pytest` (it puts this folder first",
    "on the path); the test suite stops with an error if the `minires` it imports is not this copy's.",
]


def _notebook_lines(names, out):
    """ASSIGNMENT.md's section on the notebooks the copy at ``out`` holds."""
    files = {p.stem: p.name for p in sorted((Path(out) / "notebooks").glob("*")) if p.is_file()}
    rows = [(files[stem], [n for n in parts if n in names]) for stem, parts in NOTEBOOKS if stem in files]
    if not rows:
        return []
    lines = ["## The notebooks", "",
             "Work through them in this order: `jupyter notebook notebooks/` (or open them in",
             "VS Code). Each states the math of its parts, checks each part in a cell (the grader's",
             "checks, as `assignment check PART` runs them; a part not written yet says so), asks a",
             "few questions to answer in the notebook, and runs one small experiment on your own code.", "",
             "| notebook | parts |", "|---|---|"]
    lines += [f"| `notebooks/{name}` | {', '.join(f'`{n}`' for n in parts)} |" for name, parts in rows]
    if any(name.endswith(".py") for name, _ in rows):
        lines += ["", "(They are percent-format `.py` files: the copy was made without jupytext.",
                  "Jupyter opens them as notebooks once `jupytext` is installed, which the",
                  "install command above does.)"]
    return lines + [""]


def _assignment_readme(names, out):
    lines = [
        "# Assignment: backpropagation by hand",
        "",
        "Each part below is a function body in `minires/` replaced by a `TODO` and a",
        "`raise NotImplementedError`. Write the body; do not change the function's",
        "signature or what it returns.",
        "",
        *_SETUP,
        "",
        "## Checking your work",
        "",
        "Everything else in the package works, so you can test your code in every way",
        "the project tests its own (run these inside this folder):",
        "",
        "```bash",
        "python -m minires assignment check PART   # one part: its gradient checks and its tests, in seconds",
        "python -m pytest -m PART                  # the same tests alone",
        "python -m minires assignment grade        # every part, as the grader sees it",
        "python -m pytest                          # the whole suite: a part not written yet fails once",
        "```",
        "",
        "Write the parts in the order below; each needs only the ones before it, and",
        "`check` says \"not written yet\" for a part you have not started. Once every",
        "part passes, `python -m minires train --subset 2000 --epochs 2` trains a ResNet",
        "on your own backward passes (the copy runs your code for every assigned op).",
        "",
        *_notebook_lines(names, out),
        "## The parts",
        "",
        "| part | where | derivation |",
        "|---|---|---|",
    ]
    for name in names:
        part = _PART_BY_NAME[name]
        lines.append(f"| `{name}` | `minires/{part.path}` (`{part.function}`) | `{part.doc}` |")
    lines.append("")
    if not all((Path(out) / _PART_BY_NAME[name].doc).is_file() for name in names):
        lines += ["The derivation pages are in the `docs/` folder of the course repository;",
                  "this copy does not include them.", ""]
    for name in names:
        part = _PART_BY_NAME[name]
        lines += [f"### `{name}`", "", "```text", part.todo, "```", ""]
    return "\n".join(lines)


# ======================================================================================
# grade (parent side)
# ======================================================================================

def default_grade_path(cwd=None):
    """The folder ``grade`` grades without a path: the current folder when it holds
    a ``minires/`` package (a student copy, graded even when the ``minires``
    command that runs this file is installed from elsewhere), else the folder
    this file's own package sits in."""
    cwd = Path.cwd() if cwd is None else Path(cwd)
    if (cwd / "minires" / "__init__.py").is_file():
        return cwd.resolve()
    return source_root()


def import_mismatch(path, imported):
    """None if ``imported`` (the folder of the ``minires`` a process imported) is
    ``path``/minires; else the error message, naming both folders and the fix."""
    path, imported = Path(path).resolve(), Path(imported).resolve()
    if imported == (path / "minires").resolve():
        return None
    return (f"refusing to grade {path}: the grading process imported minires from {imported}, "
            f"not {path / 'minires'}. Another minires installed in this Python comes first; "
            f"fix: `pip install -e {path}` (or `pip uninstall minires`), then grade again")


def grade(path=None, only=None, use_torch=True, timeout=600, hidden=None, points=None, backend="numpy"):
    """Grade the package at ``path`` (default: ``default_grade_path()``).

    ``hidden``: a JSON file of the instructor's extra cases (:func:`load_hidden`),
    checked after the public ones. ``points``: a JSON file {part: points} that
    overrides the PARTS table's; a part earns its points when every check passes.
    ``backend="cupy"`` runs the student's code on the GPU (the cases are made and
    the answers compared on the host, as with NumPy); no CuPy or no GPU is a
    RuntimeError, never a NumPy grade in its place.

    The checks run in a subprocess that imports ``minires`` from ``path``; if it
    gets another one (an installed ``minires`` shadowing the copy), RuntimeError
    with both folders, rather than a grade of the wrong code.

    Returns a dict: ``path``, ``imported`` (the folder of the ``minires`` that was
    graded), ``torch`` (whether parity checks ran), ``parts``
    (one dict per part: ``part``, ``passed``, ``worst_rel_error``, ``hint``,
    ``checks``, ``error``, ``case`` and ``frames``: where the student's code raised,
    ``points``, ``max_points``), ``passed``, ``total``, ``score`` (a fraction),
    ``points``, ``max_points`` and ``backend``.
    """
    if backend not in ("numpy", "cupy"):
        raise ValueError(f"unknown backend {backend!r}: expected 'numpy' or 'cupy'")
    path = Path(path).resolve() if path is not None else default_grade_path()
    if not (path / "minires" / "__init__.py").is_file():
        raise ValueError(f"no minires package to grade in {path} (expected {path / 'minires' / '__init__.py'})")
    names = parse_names(only)
    if hidden is not None:
        load_hidden(hidden)  # a bad file is the instructor's error: say so before grading
    table = load_points(points)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(PYTHONPATH=str(path), PYTHONDONTWRITEBYTECODE="1", MINIRES_BACKEND="numpy")  # the worker sets it
    with tempfile.TemporaryDirectory(prefix="minires-grade-") as tmp:
        results_file = Path(tmp) / "results.jsonl"
        results_file.touch()
        command = [sys.executable, "-P", str(Path(__file__).resolve()), "--worker", str(results_file),
                   "--torch" if use_torch else "--no-torch",
                   str(Path(hidden).resolve()) if hidden is not None else "-", backend, *names]
        stopped = None
        try:
            proc = subprocess.run(command, cwd=path, env=env, capture_output=True, text=True, timeout=timeout)
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                stopped = f"the grading process exited with status {proc.returncode}: {' | '.join(tail)}"
        except subprocess.TimeoutExpired:
            stopped = f"the grading process ran past --timeout {timeout} s (an endless loop?)"
        records = [json.loads(line) for line in results_file.read_text().splitlines() if line.strip()]
    header = next((r for r in records if "worker" in r), {})
    if header.get("fatal"):
        raise RuntimeError(header["fatal"])
    by_part = {r["part"]: r for r in records if "part" in r}
    parts = []
    for name in names:
        record = by_part.get(name) or {
            "part": name, "passed": False, "worst_rel_error": None, "checks": [],
            "error": stopped or "the grading process stopped before this part",
        }
        record["hint"] = "" if record["passed"] else _hint(_PART_BY_NAME[name], record, path)
        record["max_points"] = table[name]
        record["points"] = table[name] if record["passed"] else 0
        parts.append(record)
    passed = sum(p["passed"] for p in parts)
    return {"path": str(path), "imported": header.get("minires"), "torch": bool(header.get("torch")),
            "torch_requested": bool(use_torch), "hidden": hidden is not None,
            "parts": parts, "passed": passed, "total": len(parts), "score": passed / len(parts),
            "points": sum(p["points"] for p in parts), "max_points": sum(p["max_points"] for p in parts),
            "backend": backend}


def load_points(path=None):
    """{part: points}: the PARTS table's, with a JSON file's ``{"part": points}`` over it."""
    table = {p.name: p.points for p in PARTS}
    if path is None:
        return table
    try:
        given = json.loads(Path(path).read_text())
        bad = [k for k, v in given.items() if k not in table or not isinstance(v, (int, float)) or v < 0]
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"--points {path}: expected JSON {{part: points}} ({type(err).__name__}: {err})") from None
    if bad:
        raise ValueError(f"--points {path}: unknown part or not a number >= 0: {', '.join(map(str, bad))}")
    return {**table, **given}


def gradescope_results(report):
    """The report in Gradescope's autograder format (results.json): one test per part."""
    tests = []
    for p in report["parts"]:
        tests.append({"name": p["part"], "score": p["points"], "max_score": p["max_points"],
                      "status": "passed" if p["passed"] else "failed",
                      "output": format_report({**report, "parts": [p]}, verbose=True).split("\n", 3)[3]
                      .rsplit("\n\nscore:", 1)[0]})
    return {"score": report["points"], "max_score": report["max_points"], "visibility": "visible",
            "output": f"{report['passed']}/{report['total']} parts passed", "tests": tests}


def _hint(part, record, root=None):
    """What ``grade`` tells the student about a failed part; ``root`` is the graded folder."""
    doc = doc_reference(part, root)
    error = record.get("error")
    if error and error.startswith("NotImplementedError"):
        return f"not written yet (still raises NotImplementedError); see {doc}"
    failed = next((c for c in record["checks"] if not c["passed"]), None)
    where = ""
    if failed is not None:
        where = f"[{failed['name']}] " + (f"{failed['message']}; " if failed.get("message") else "")
    elif error:
        where = f"{error}; "
    return f"{where}{part.hint} (see {doc})"


def format_report(report, verbose=False):
    """The grade table as text; ``verbose``: every check of every part, and where it raised."""
    width = max(len(p["part"]) for p in report["parts"])
    if report["torch"]:
        parity = " + PyTorch parity"
    elif report.get("torch_requested", True):
        parity = "; PyTorch not installed: no parity checks"
    else:
        parity = "; parity checks off (--no-torch)"
    hidden = " + the instructor's hidden cases" if report.get("hidden") else ""
    device = "; the student's code ran on the GPU (CuPy)" if report.get("backend") == "cupy" else ""
    lines = [f"grading {report['path']}  (gradient checks{parity}{hidden}{device})",
             "", f"{'part':<{width}}  result  points  worst rel. error  hint"]
    for p in report["parts"]:
        points = f"{p.get('points', 0):g}/{p.get('max_points', 0):g}"
        err = p["worst_rel_error"]
        err_text = "-" if err is None else f"{err:.1e}"
        lines.append(f"{p['part']:<{width}}  {'PASS' if p['passed'] else 'FAIL':<6}  {points:>6}  {err_text:>15}  "
                     f"{p['hint']}")
        if (p.get("error") or "").startswith("NotImplementedError"):
            pass  # "not written yet" says it all
        elif p.get("case") and p.get("error"):
            lines.append(f"{'':<{width}}  raised in case [{p['case']}]:")
        for frame in (p.get("frames") or ()) if not p["hint"].startswith("not written") else ():
            lines.append(f"{'':<{width}}    {frame['file']}:{frame['line']}: {frame['code']}")
        if verbose:
            for c in p["checks"]:
                rel = "-" if c["rel_error"] is None else f"{c['rel_error']:.1e}"
                lines.append(f"{'':<{width}}    {'ok  ' if c['passed'] else 'FAIL'} {rel:>8}  {c['name']}"
                             + (f"  ({c['message']})" if c.get("message") else ""))
    lines.append("")
    lines.append(f"score: {report['passed']}/{report['total']} parts passed ({100 * report['score']:.0f}%), "
                 f"{report.get('points', 0):g}/{report.get('max_points', 0):g} points; "
                 f"a part passes when every check agrees to {TOLERANCE:.0e}")
    return "\n".join(lines)


# ======================================================================================
# command line
# ======================================================================================

def add_parser(sub):
    """Register ``python -m minires assignment make | grade | list``."""
    p = sub.add_parser("assignment", help="course kit: make a student copy with stubs, grade a copy")
    asub = p.add_subparsers(dest="assignment_command", required=True, metavar="{make,check,grade,list}")

    m = asub.add_parser("make", help="write a student copy of the package with TODO stubs")
    m.add_argument("--out", required=True, metavar="DIR", help="folder for the student copy")
    m.add_argument("--only", nargs="+", metavar="NAME", help="parts to stub (default: all); see `list`")
    m.add_argument("--with-docs", action="store_true", help="also copy docs/ (it states every formula)")
    m.add_argument("--force", action="store_true",
                   help="replace minires/, tests/, demos/, docs/, notebooks/ in a non-empty DIR")
    m.set_defaults(run=run_make)

    g = asub.add_parser("grade", help="grade a copy part by part; exit status 1 unless all pass")
    g.add_argument("--path", metavar="DIR", help="folder holding the minires/ to grade (default: the current "
                   "folder if it holds a minires/ package, else the one this minires is installed from)")
    g.add_argument("--only", nargs="+", metavar="NAME", help="parts to grade (default: all)")
    g.add_argument("--json", action="store_true", help="print the per-part results as JSON")
    g.add_argument("--verbose", "-v", action="store_true", help="show every check of every part")
    g.add_argument("--points", metavar="FILE", help="JSON {part: points} over the default points table")
    g.add_argument("--hidden", metavar="FILE", help="JSON of the instructor's extra cases (not in the handout): "
                   '{"seed": N, "cases": {part: [case, ...]}}; see docs/assignments.md')
    g.add_argument("--gradescope", metavar="FILE", help="also write Gradescope's results.json to FILE")
    g.add_argument("--no-torch", dest="torch", action="store_false", help="skip the PyTorch parity checks")
    g.add_argument("--backend", choices=["numpy", "cupy"], default="numpy",
                   help="run the student's code with NumPy (the default) or on the GPU with CuPy")
    g.add_argument("--timeout", type=float, default=600, help="seconds before the grader gives up (600)")
    g.set_defaults(run=run_grade)

    c = asub.add_parser("check", help="one part: its gradient checks, then its tests (pytest -m PART)")
    c.add_argument("part", metavar="PART", help="the part to check; see `list`")
    c.add_argument("--path", metavar="DIR", help="folder holding the minires/ to check (default: as grade)")
    c.add_argument("--no-torch", dest="torch", action="store_false", help="skip the PyTorch parity checks")
    c.set_defaults(run=run_check)

    li = asub.add_parser("list", help="list the assignment parts")
    li.set_defaults(run=run_list)


def run_make(args):
    names = make(args.out, args.only, force=args.force, with_docs=args.with_docs)
    print(f"student copy in {Path(args.out).resolve()}: {len(names)} part(s) stubbed: {', '.join(names)}")
    notebooks = sorted(p.name for p in (Path(args.out) / "notebooks").glob("*") if p.is_file())
    if notebooks and notebook_format() == "py":
        print("jupytext is not installed: the notebooks are in notebooks/ as percent-format .py files "
              "(open them with Jupyter + jupytext or VS Code); for .ipynb files: "
              "pip install -e \".[notebooks]\", then make again with --force")
    elif notebooks:
        print(f"notebooks: {', '.join(notebooks)}")
    print("see ASSIGNMENT.md there; grade it with: "
          f"python -m minires assignment grade --path {Path(args.out).resolve()}")
    return 0


def run_grade(args):
    if args.path is None and default_grade_path() != Path.cwd().resolve():
        print(f"no minires/ in the current folder: grading the installed one, in {source_root()} "
              "(use --path DIR to grade another copy)", file=sys.stderr)
    report = grade(args.path, args.only, use_torch=args.torch, timeout=args.timeout, hidden=args.hidden,
                   points=args.points, backend=args.backend)
    print(json.dumps(report, indent=2) if args.json else format_report(report, verbose=args.verbose))
    if args.gradescope:
        Path(args.gradescope).write_text(json.dumps(gradescope_results(report), indent=2) + "\n")
    return 0 if report["passed"] == report["total"] else 1


def check(part, path=None, use_torch=True, out=print):
    """``assignment check PART``: the part's gradient checks, then its tests. Returns the exit status."""
    (name,) = parse_names([part])
    path = Path(path).resolve() if path is not None else default_grade_path()
    report = grade(path, [name], use_torch=use_torch)
    result = report["parts"][0]
    if (result.get("error") or "").startswith("NotImplementedError"):
        out(_not_written_line(name))
        return 1
    out(format_report(report, verbose=not result["passed"]))
    tests = path / "tests"
    if not tests.is_dir():
        return 0 if result["passed"] else 1
    env = dict(os.environ, PYTHONPATH=str(path))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m",
                           f"{name} and not slow", str(tests)], cwd=path, env=env, capture_output=True, text=True)
    out(f"\npython -m pytest -m {name}:\n" + proc.stdout.strip())
    return 0 if result["passed"] and proc.returncode == 0 else 1


class PartsNotPassing(Exception):
    """Raised by :func:`check_parts` (a notebook's check cell) when a part does not pass."""


def _not_written_line(name):
    return f"{name}: not written yet (the TODO in minires/{_PART_BY_NAME[name].path})"


def check_parts(*names, path=None, use_torch=True, out=print):
    """A notebook's check cell: grade the parts ``names`` of the copy this ``minires``
    comes from (default: :func:`source_root`), one line per part; raise
    :class:`PartsNotPassing` unless every part passes.

    The checks are ``grade``'s, run in a fresh process, so an edit of the student's
    file counts at once, without restarting the notebook's kernel. Returns None (a
    notebook would display a returned report under the verdict lines).
    """
    if not names:
        raise ValueError("check_parts: name the parts to check, e.g. check_parts('relu_backward')")
    names = parse_names(names)
    report = grade(path if path is not None else source_root(), names, use_torch=use_torch)
    failed = []
    for p in report["parts"]:
        name = p["part"]
        if (p.get("error") or "").startswith("NotImplementedError"):
            line = _not_written_line(name)
        elif p["passed"]:
            line = (f"{name}: PASS ({len(p['checks'])} checks, worst relative error "
                    f"{p['worst_rel_error']:.1e}{', with PyTorch parity' if report['torch'] else ''})")
        else:
            line = f"{name}: FAIL {p['hint']}"
            if p.get("case") and p.get("error"):
                line += f"\n    raised in case [{p['case']}]: {p['error']}"
            line += "".join(f"\n    {f['file']}:{f['line']}: {f['code']}" for f in p.get("frames") or ())
        out(line)
        if not p["passed"]:
            failed.append(line.splitlines()[0])
    if failed:
        raise PartsNotPassing("; ".join(failed))


def notebook_setup(cwd=None, out=print):
    """A notebook's first cell: say which ``minires`` the notebook runs, and refuse one
    that is not the copy around the notebook (``COPY/notebooks/x.ipynb`` must run
    ``COPY/minires``; an installed course repository would run the reference code)."""
    root = source_root()
    here = Path.cwd() if cwd is None else Path(cwd)
    beside = here.resolve().parent
    if (beside / "minires" / "__init__.py").is_file() and beside != root.resolve():
        raise RuntimeError(f"this notebook sits in {beside}, but it imported minires from {root / 'minires'}: "
                           f"its checks and experiments would run that code. Fix: `pip install -e "
                           f"\".[test,notebooks]\"` in {beside}, then restart the kernel")
    out(f"minires from {root / 'minires'}")


def run_check(args):
    return check(args.part, args.path, use_torch=args.torch)


def run_list(args):
    width = max(len(n) for n in PART_NAMES)
    for part in PARTS:
        print(f"{part.name:<{width}}  {part.function}  ({doc_reference(part, source_root())})")
    return 0


# ======================================================================================
# grade (worker side): runs with the student's package on PYTHONPATH
# ======================================================================================

class CheckFailed(Exception):
    """A check could not compare (wrong shape, wrong type, ...): the message says why."""


def _tuples(value):
    """JSON lists -> tuples, all the way down (the hidden cases' shapes and pairs)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


#: The parts whose checks take extra cases (``grade --hidden FILE``), and what one case is.
HIDDEN_CASE_FORMAT = {
    "relu_backward": "x shape, e.g. [3, 2, 5]",
    "batchnorm2d_backward": "[x shape (N, C, H, W), training], e.g. [[3, 4, 2, 5], true]",
    "maxpool2d_backward": "[x shape, kernel, stride, padding], e.g. [[1, 2, 7, 5], [3, 2], 2, 1]",
    "conv2d_backward": "[x shape, w shape, stride, padding, bias], e.g. [[1, 2, 6, 5], [3, 2, 3, 2], [1, 2], [2, 1], true]",
}


def load_hidden(path):
    """``grade --hidden FILE``: {"seed": int, "cases": {part: [case, ...]}} -> (seed, cases)."""
    try:
        data = json.loads(Path(path).read_text())
        seed, cases = int(data.get("seed", 12345)), data["cases"]
        unknown = sorted(set(cases) - set(HIDDEN_CASE_FORMAT))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"--hidden {path}: expected JSON {{\"seed\": N, \"cases\": {{part: [case, ...]}}}} "
                         f"({type(err).__name__}: {err})") from None
    if unknown:
        raise ValueError(f"--hidden {path}: no hidden cases for part(s) {', '.join(unknown)}; "
                         f"parts that take them: {', '.join(HIDDEN_CASE_FORMAT)}")
    return seed, {name: [_tuples(c) for c in part_cases] for name, part_cases in cases.items()}


def _student_frames(err, student):
    """The frames of ``err``'s traceback in the student's own files: file:line and the line."""
    here = Path(__file__).resolve()
    frames = []
    for frame in traceback.extract_tb(err.__traceback__):
        path = Path(frame.filename).resolve()
        if path != here and student in path.parents:
            frames.append({"file": path.relative_to(student).as_posix(), "line": frame.lineno,
                           "code": (frame.line or "").strip()})
    return frames[-6:]


def _run_part(name, grader, student, configs=None):
    """Run one part's checks; returns (error, case, frames)."""
    try:
        if configs is None:
            _CHECKS[name](grader)
        else:
            _CHECKS[name](grader, configs)
        return None, None, []
    except (Exception, SystemExit) as err:  # the student's code may raise anything
        error = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        return error, getattr(grader, "case", None), _student_frames(err, student)


def _worker_main(argv):
    results_file, torch_flag, hidden_file, backend_name, names = argv[0], argv[1], argv[2], argv[3], argv[4:]
    out = open(results_file, "a")

    def emit(record):
        out.write(json.dumps(record) + "\n")
        out.flush()

    import numpy

    import minires

    student = Path(os.environ.get("PYTHONPATH", ".")).resolve()
    imported = Path(minires.__file__).resolve()
    mismatch = import_mismatch(student, imported.parent)
    if mismatch:
        emit({"worker": True, "fatal": mismatch})
        return
    seed, hidden = load_hidden(hidden_file) if hidden_file != "-" else (None, {})
    try:  # the array module the student's code runs on; no CuPy or no GPU is said, not graded on NumPy
        from minires.backend import set_backend
        xp = set_backend(backend_name)
    except Exception as e:
        emit({"worker": True, "fatal": f"--backend {backend_name}: {e}"})
        return
    torch = None
    if torch_flag == "--torch":
        try:
            import torch
        except ImportError:
            torch = None
    emit({"worker": True, "torch": torch is not None, "minires": str(imported.parent)})
    for name in names:
        grader = _Grader(numpy, torch, xp)
        error, case, frames = _run_part(name, grader, student)
        if error is None and name in hidden:  # the instructor's cases, after the public ones
            grader.rng, grader.prefix = numpy.random.default_rng(seed), "hidden: "
            error, case, frames = _run_part(name, grader, student, hidden[name])
        checks = grader.checks
        errors = [c["rel_error"] for c in checks]
        # None when nothing was compared, or when a check failed before it could compare (wrong shape)
        worst = max(errors) if errors and error is None and None not in errors else None
        emit({"part": name, "passed": error is None and bool(checks) and all(c["passed"] for c in checks),
              "worst_rel_error": worst, "checks": checks, "error": error,
              "case": (grader.prefix + case) if case else None, "frames": frames})


class _Grader:
    """Collects checks for one part. Uses only NumPy (and torch, if given).

    ``xp`` is where the student's code runs: NumPy, or CuPy for ``--backend cupy``.
    The cases are made, and the answers compared, on the host either way; only
    the calls into the student's code (:meth:`functions`) and the residual
    block's stand-in layers run on the device.
    """

    def __init__(self, np, torch, xp=None):
        self.np, self.torch = np, torch
        self.xp = np if xp is None else xp
        self.rng = np.random.default_rng(0)
        self.checks = []
        self.case, self.prefix = None, ""  # the case being checked; "hidden: " for the instructor's
        self.returned = {}  # id(host copy) -> (host copy, device array) of what the device gave back

    # -- host and device ---------------------------------------------------------------
    def host(self, a):
        """A device array as a NumPy array; anything else as it is."""
        return a if self.xp is self.np or not isinstance(a, self.xp.ndarray) else a.get()

    def gave_back(self, a):
        """The device array whose host copy ``a`` is, or None."""
        kept = self.returned.get(id(a))
        return kept[1] if kept is not None and kept[0] is a else None

    def device(self, a):
        """A NumPy array on the device (an array the device gave back: the device's own)."""
        if self.xp is self.np or not isinstance(a, self.np.ndarray):
            return a
        original = self.gave_back(a)
        return original if original is not None else self.xp.asarray(a)

    def functions(self, module):
        """``module`` whose functions run on the device: NumPy arguments move there,
        whatever the call changed in them comes back, array results come back."""
        return module if self.xp is self.np else _OnDevice(self, module)

    # -- comparisons -------------------------------------------------------------------
    def rel_error(self, a, b):
        np = self.np
        a, b = np.asarray(self.host(a), dtype=np.float64), np.asarray(self.host(b), dtype=np.float64)
        return float(np.linalg.norm(a - b) / max(1e-8, np.linalg.norm(a) + np.linalg.norm(b)))

    def record(self, name, rel_error=None, passed=None, message=""):
        if passed is None:
            passed = rel_error is not None and rel_error < TOLERANCE  # NaN fails too
        self.checks.append({"name": self.prefix + name, "rel_error": rel_error, "passed": bool(passed),
                            "message": message})

    def compare(self, name, got, expected, what):
        """Record rel_error(got, expected) after checking that ``got`` is an array of the right shape."""
        np = self.np
        if got is None or not hasattr(got, "shape"):
            self.record(name, None, False, f"{what} is {type(got).__name__}, expected an array")
            return
        if tuple(got.shape) != tuple(np.shape(expected)):
            self.record(name, None, False,
                        f"{what} has shape {tuple(got.shape)}, expected {tuple(np.shape(expected))}")
            return
        error = self.rel_error(got, expected)
        if not np.isfinite(error):
            self.record(name, None, False, f"{what} holds NaN or inf")
            return
        self.record(name, error, message="" if error < TOLERANCE else f"{what} is off")

    def unpack(self, result, count, names):
        if not isinstance(result, tuple) or len(result) != count:
            raise CheckFailed(f"expected a tuple {names}, got {type(result).__name__}"
                              + (f" of length {len(result)}" if isinstance(result, tuple) else ""))
        return result

    # -- numerical gradients -----------------------------------------------------------
    def numeric(self, forward, array, dout, h=1e-6):
        """Centered differences of sum(forward() * dout) w.r.t. every entry of ``array``."""
        np = self.np
        grad = np.zeros(array.shape)
        flat = array.reshape(-1)
        where = self.xp if isinstance(array, self.xp.ndarray) else np  # the residual check's are on the device
        assert where.shares_memory(flat, array), "arrays under test must be contiguous"
        dout = self.host(dout)
        for i in range(array.size):
            old = flat[i].item()
            flat[i] = old + h
            plus = float(np.sum(np.asarray(self.host(forward())) * dout))
            flat[i] = old - h
            minus = float(np.sum(np.asarray(self.host(forward())) * dout))
            flat[i] = old
            grad.reshape(-1)[i] = (plus - minus) / (2 * h)
        return grad

    def gradcheck(self, label, forward, arrays, analytic, dout):
        """For each name: compare analytic[name] with the numerical gradient of ``arrays[name]``."""
        for name, array in arrays.items():
            self.compare(f"{label}: d{name}", analytic[name], self.numeric(forward, array, dout), f"d{name}")

    def unchanged(self, label, before, after, what="dout"):
        if not self.np.array_equal(self.host(before), self.host(after)):
            self.record(f"{label}: {what} untouched", None, False, f"{what} was modified in place")

    def data(self, *shape, low=None):
        x = self.rng.standard_normal(shape)
        if low is not None:  # keep away from kinks (0 for ReLU): |x| >= low
            x = self.np.sign(x) * (low + self.np.abs(x))
        return self.np.ascontiguousarray(x)

    # -- torch -------------------------------------------------------------------------
    def t(self, a, grad=True):
        return self.torch.tensor(self.np.asarray(self.host(a)), dtype=self.torch.float64, requires_grad=grad)

    def torch_grads(self, out, dout, tensors):
        out.backward(self.torch.tensor(self.host(dout)))
        return {name: t.grad.numpy() for name, t in tensors.items()}


class _OnDevice:
    """A module of the student's functions, called on the grader's device (see _Grader.functions)."""

    def __init__(self, grader, module):
        self._grader, self._module = grader, module

    def __getattr__(self, name):
        function, g = getattr(self._module, name), self._grader

        def on_device(*args, **kwargs):
            moved = []

            def there(a):
                d = g.device(a)
                if d is not a and g.gave_back(a) is None:  # a fresh copy: its changes must come back
                    moved.append((a, d))
                return d

            result = function(*map(there, args), **{k: there(v) for k, v in kwargs.items()})
            for host, dev in moved:  # in-place changes (running statistics, a modified dout) come back
                host[...] = g.host(dev)
            return tuple(map(self._back, result)) if isinstance(result, tuple) else self._back(result)

        return on_device

    def _back(self, r):
        g = self._grader
        if not isinstance(r, g.xp.ndarray):
            return r  # a cache stays as it is, on the device
        h = g.host(r)
        g.returned[id(h)] = (h, r)
        return h


def _check_relu(g, configs=((4, 5), (2, 3, 4, 4))):
    from minires.functional import activation

    F = g.functions(activation)

    for shape in configs:
        label = f"x {shape}"
        g.case = label
        x = g.data(*shape, low=0.05)
        out, cache = F.relu_forward(x)
        dout = g.data(*out.shape)
        dout_copy = dout.copy()
        dx = F.relu_backward(dout, cache)
        g.unchanged(label, dout_copy, dout)
        g.gradcheck(label, lambda: F.relu_forward(x)[0], {"x": x}, {"x": dx}, dout)
        if g.torch:
            tx = g.t(x)
            g.compare(f"{label}: dx vs torch", dx, g.torch_grads(g.torch.relu(tx), dout, {"x": tx})["x"], "dx")


def _check_linear(g):
    from minires.functional import linear

    F = g.functions(linear)

    for bias in (True, False):
        label = "with bias" if bias else "no bias"
        g.case = label
        x, w = g.data(5, 4), g.data(3, 4)
        b = g.data(3) if bias else None
        out, cache = F.linear_forward(x, w, b)
        dout = g.data(*out.shape)
        dx, dw, db = g.unpack(F.linear_backward(dout, cache), 3, "(dx, dw, db)")
        arrays, analytic = {"x": x, "w": w}, {"x": dx, "w": dw}
        if bias:
            arrays["b"], analytic["b"] = b, db
        elif db is not None:
            g.record(f"{label}: db", None, False, "db must be None when there is no bias")
        g.gradcheck(label, lambda: F.linear_forward(x, w, b)[0], arrays, analytic, dout)
        if g.torch:
            tensors = {k: g.t(v) for k, v in arrays.items()}
            tout = g.torch.nn.functional.linear(tensors["x"], tensors["w"], tensors.get("b"))
            for k, v in g.torch_grads(tout, dout, tensors).items():
                g.compare(f"{label}: d{k} vs torch", analytic[k], v, f"d{k}")


def _softmax_oracle(np, logits, labels):
    """The grader's own softmax cross-entropy, (loss, probs), straight from the
    definition: right only for moderate logits (that is all it is used for)."""
    e = np.exp(logits)
    probs = e / e.sum(axis=1, keepdims=True)
    return -np.log(probs[np.arange(len(labels)), labels]).mean(), probs


def _check_softmax_forward(g):
    from minires.functional import loss

    F = g.functions(loss)

    np = g.np
    for label, shift in (("logits ~ N(0, 9)", 0.0), ("logits + 1000s per row (stability)", 1000.0)):
        g.case = label
        logits = g.data(6, 5) * 3
        labels = g.rng.integers(0, 5, 6)
        expected_loss, expected_probs = _softmax_oracle(np, logits, labels)
        # softmax ignores a constant added to a row: the shifted loss must equal the
        # plain one (and stay finite, which needs a stable formula)
        shifted = np.ascontiguousarray(logits + shift * g.rng.choice([-3.0, -1.0, 2.0, 5.0], (6, 1)))
        loss, cache = g.unpack(F.softmax_cross_entropy_forward(shifted, labels), 2, "(loss, cache)")
        g.compare(f"{label}: loss", np.asarray(loss, dtype=np.float64), np.asarray(expected_loss), "loss")
        if not (isinstance(cache, tuple) and len(cache) == 2):
            g.record(f"{label}: cache", None, False, "cache must be the tuple (probs, labels)")
        else:
            g.compare(f"{label}: cache probs", cache[0], expected_probs, "cache[0] (probs)")
        if g.torch:
            tloss = g.torch.nn.functional.cross_entropy(g.t(shifted, False), g.torch.tensor(labels))
            g.compare(f"{label}: loss vs torch", np.asarray(loss, dtype=np.float64),
                      np.asarray(tloss.item()), "loss")


def _check_softmax_backward(g):
    from minires.functional import loss

    F = g.functions(loss)

    np = g.np
    for label, dloss in (("dloss 1.0", 1.0), ("dloss 0.37", 0.37)):
        g.case = label
        logits = g.data(6, 5) * 2
        labels = g.rng.integers(0, 5, 6)
        _, probs = _softmax_oracle(np, logits, labels)
        probs_copy = probs.copy()
        dlogits = F.softmax_cross_entropy_backward(dloss, (probs, labels))
        g.unchanged(label, probs_copy, probs, "probs (the cache)")
        # the cache is built by the grader, so this check is independent of the forward part
        g.gradcheck(label, lambda: _softmax_oracle(np, logits, labels)[0], {"logits": logits},
                    {"logits": dlogits}, np.float64(dloss))
        if g.torch:
            tz = g.t(logits)
            tloss = g.torch.nn.functional.cross_entropy(tz, g.torch.tensor(labels))
            g.compare(f"{label}: dlogits vs torch", dlogits,
                      g.torch_grads(tloss, np.float64(dloss), {"z": tz})["z"], "dlogits")


def _check_batchnorm(g, configs=(((4, 3, 5, 6), True), ((2, 2, 1, 3), True), ((3, 2, 4, 4), False))):
    from minires.functional import batchnorm

    F = g.functions(batchnorm)

    np = g.np
    for shape, training in configs:
        label = f"x {shape}, {'training' if training else 'eval'}"
        g.case = label
        c = shape[1]
        x = np.ascontiguousarray(2 + 3 * g.data(*shape))
        gamma, beta = 1 + 0.5 * g.data(c), 0.5 * g.data(c)
        running_mean, running_var = g.data(c), g.rng.uniform(0.5, 2, c)

        def forward():  # running stats as copies: fixed while the batch statistics are live
            return F.batchnorm2d_forward(x, gamma, beta, running_mean.copy(), running_var.copy(),
                                         training=training)[0]

        _, cache = F.batchnorm2d_forward(x, gamma, beta, running_mean.copy(), running_var.copy(),
                                         training=training)
        dout = g.data(*shape)
        dout_copy = dout.copy()
        dx, dgamma, dbeta = g.unpack(F.batchnorm2d_backward(dout, cache), 3, "(dx, dgamma, dbeta)")
        g.unchanged(label, dout_copy, dout)
        arrays = {"x": x, "gamma": gamma, "beta": beta}
        analytic = {"x": dx, "gamma": dgamma, "beta": dbeta}
        g.gradcheck(label, forward, arrays, analytic, dout)
        if g.torch:
            tensors = {k: g.t(v) for k, v in arrays.items()}
            tout = g.torch.nn.functional.batch_norm(
                tensors["x"], g.t(running_mean, False), g.t(running_var, False), tensors["gamma"],
                tensors["beta"], training=training, momentum=0.1, eps=1e-5)
            for k, v in g.torch_grads(tout, dout, tensors).items():
                g.compare(f"{label}: d{k} vs torch", analytic[k], v, f"d{k}")


def _check_maxpool(g, configs=(((2, 3, 4, 6), 2, 2, 0), ((2, 2, 5, 5), 3, 2, 1),
                                 ((1, 2, 4, 5), (2, 3), (1, 2), 0))):
    from minires.functional import pooling

    F = g.functions(pooling)

    np = g.np
    for shape, kernel, stride, padding in configs:
        label = f"x {shape}, kernel {kernel}, stride {stride}, padding {padding}"
        g.case = label
        # distinct values 0.1 apart: no ties, and a step h never changes the arg-max
        x = np.ascontiguousarray((g.rng.permutation(int(np.prod(shape))) * 0.1).reshape(shape))
        out, cache = F.maxpool2d_forward(x, kernel, stride, padding)
        dout = g.data(*out.shape)
        dout_copy = dout.copy()
        dx = F.maxpool2d_backward(dout, cache)
        g.unchanged(label, dout_copy, dout)
        g.gradcheck(label, lambda: F.maxpool2d_forward(x, kernel, stride, padding)[0], {"x": x}, {"x": dx}, dout)
        if g.torch:
            tx = g.t(x)
            tout = g.torch.nn.functional.max_pool2d(tx, kernel, stride, padding)
            g.compare(f"{label}: dx vs torch", dx, g.torch_grads(tout, dout, {"x": tx})["x"], "dx")


_CONV_CASES = (  # x shape, w shape, stride, padding, bias
    ((2, 3, 5, 6), (4, 3, 3, 3), 1, 1, True),
    ((2, 3, 7, 6), (4, 3, 3, 3), 2, 0, True),
    ((2, 2, 5, 6), (3, 2, 2, 3), 2, 2, True),
    ((1, 3, 4, 5), (2, 3, 3, 2), (2, 1), (1, 0), False),
    ((2, 4, 3, 3), (5, 4, 1, 1), 1, 0, True),
)


def _check_conv(g, configs=_CONV_CASES):
    from minires.functional import conv

    F = g.functions(conv)

    for x_shape, w_shape, stride, padding, bias in configs:
        label = f"w {w_shape}, stride {stride}, padding {padding}" + ("" if bias else ", no bias")
        g.case = label
        x, w = g.data(*x_shape), g.data(*w_shape)
        b = g.data(w_shape[0]) if bias else None
        out, cache = F.conv2d_forward(x, w, b, stride, padding)
        dout = g.data(*out.shape)
        dout_copy = dout.copy()
        dx, dw, db = g.unpack(F.conv2d_backward(dout, cache), 3, "(dx, dw, db)")
        g.unchanged(label, dout_copy, dout)
        arrays, analytic = {"x": x, "w": w}, {"x": dx, "w": dw}
        if bias:
            arrays["b"], analytic["b"] = b, db
        elif db is not None:
            g.record(f"{label}: db", None, False, "db must be None when there is no bias")
        g.gradcheck(label, lambda: F.conv2d_forward(x, w, b, stride, padding)[0], arrays, analytic, dout)
        if g.torch:
            tensors = {k: g.t(v) for k, v in arrays.items()}
            tout = g.torch.nn.functional.conv2d(tensors["x"], tensors["w"], tensors.get("b"), stride, padding)
            for k, v in g.torch_grads(tout, dout, tensors).items():
                g.compare(f"{label}: d{k} vs torch", analytic[k], v, f"d{k}")


class _ChannelScale:
    """A stand-in layer for the residual check: out = x * w[c], with its own exact backward."""

    def __init__(self, np, w):
        self.np, self.w, self.dw = np, w, np.zeros_like(w)

    def __call__(self, x):
        self.x = x
        return x * self.w.reshape(1, -1, 1, 1)

    def backward(self, dout):
        self.dw += (dout * self.x).sum(axis=(0, 2, 3))
        return dout * self.w.reshape(1, -1, 1, 1)


class _Smooth:
    """A stand-in activation with its own exact backward: tanh, or softplus (a smooth ReLU)."""

    def __init__(self, np, kind):
        self.np, self.kind = np, kind

    def __call__(self, x):
        self.x = x
        return self.np.tanh(x) if self.kind == "tanh" else self.np.logaddexp(0, x)

    def backward(self, dout):
        if self.kind == "tanh":
            return dout * (1 - self.np.tanh(self.x) ** 2)
        return dout / (1 + self.np.exp(-self.x))


def _check_residual(g):
    """ResidualBlock.backward on its own: the block's layers are stand-ins whose backward
    the grader knows, so this part does not depend on the conv / BN / ReLU parts."""
    from minires.models.blocks import ResidualBlock

    np = g.xp  # the stand-in layers run where the student's code runs
    for shortcut in ("identity", "projection"):
        label = f"{shortcut} shortcut"
        g.case = label
        c = 3
        x = g.device(g.data(2, c, 4, 5))
        w1, w2, w3 = (g.device(1 + 0.5 * g.data(c)) for _ in range(3))
        block = ResidualBlock()
        scale1, scale2 = _ChannelScale(np, w1), _ChannelScale(np, w2)
        block.branch = [scale1, _Smooth(np, "tanh"), scale2]  # order matters: they do not commute
        block.downsample = _ChannelScale(np, w3) if shortcut == "projection" else None
        block.relu = _Smooth(np, "softplus")
        out = block.forward(x)
        dout = g.device(g.data(*out.shape))
        dout_copy = dout.copy()
        dx = block.backward(dout)
        g.unchanged(label, dout_copy, dout)
        arrays = {"x": x, "branch[0].w": w1, "branch[2].w": w2}
        analytic = {"x": dx, "branch[0].w": scale1.dw, "branch[2].w": scale2.dw}
        if block.downsample is not None:
            arrays["downsample.w"], analytic["downsample.w"] = w3, block.downsample.dw
        # parameter gradients were accumulated by one backward; the forward below only reads
        g.gradcheck(label, lambda: block.forward(x), arrays, {k: v.copy() for k, v in analytic.items()}, dout)


_CHECKS = {
    "relu_backward": _check_relu,
    "linear_backward": _check_linear,
    "softmax_cross_entropy_forward": _check_softmax_forward,
    "softmax_cross_entropy_backward": _check_softmax_backward,
    "batchnorm2d_backward": _check_batchnorm,
    "maxpool2d_backward": _check_maxpool,
    "conv2d_backward": _check_conv,
    "residual_block_backward": _check_residual,
}
assert set(_CHECKS) == set(PART_NAMES)


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "--worker":
        sys.exit("this file is run by `python -m minires assignment grade`, not by hand")
    _worker_main(sys.argv[2:])
