"""The course notebooks: each runs top to bottom on this checkout's code.

In the course repository they are ``notebooks/*.py`` (jupytext percent format)
and run against the reference, so every check cell must print PASS and every
experiment must finish; in a student copy they are ``notebooks/*.ipynb`` and
run against the student's code (a part not written yet fails once, with its
"not written yet": see tests/conftest.py). ``minires/assignment.py``'s
``NOTEBOOKS`` says which parts each notebook checks. The tests of ``make``'s
side (a fresh handout's notebooks stop at their first check) are in
tests/test_assignment.py.
"""
import ast
import importlib.util
from pathlib import Path

import pytest

from minires import assignment as A

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
STUDENT_COPY = (ROOT / "ASSIGNMENT.md").is_file()

JUPYTER = ("jupytext", "nbformat", "nbclient", "ipykernel")
_missing = [name for name in JUPYTER if importlib.util.find_spec(name) is None]
needs_jupyter = pytest.mark.skipif(
    bool(_missing), reason=f"{', '.join(_missing)} not installed (pip install -e \".[notebooks]\")")


def notebook_paths():
    """(stem, parts, path) for every notebook this checkout holds: the .py sources in
    the course repository, the .ipynb (or, made without jupytext, .py) files in a copy."""
    found = []
    for stem, parts in A.NOTEBOOKS:
        for suffix in (".ipynb", ".py"):
            path = NOTEBOOK_DIR / f"{stem}{suffix}"
            if path.is_file():
                # one notebook in the default run, the others (8 to 18 s each) in the slow run
                marks = [] if stem.startswith("2-") else [pytest.mark.slow]
                found.append(pytest.param(stem, parts, path, id=stem, marks=marks))
                break
    return found


def read_notebook(path):
    if path.suffix == ".ipynb":
        import nbformat
        return nbformat.read(path, as_version=4)
    import jupytext
    return jupytext.read(path, fmt="py:percent")


def checked_parts(cell):
    """The part names a code cell passes to ``assignment.check_parts(...)``, in order."""
    names = []
    code = "\n".join("" if line.lstrip().startswith(("%", "!")) else line  # IPython magics
                     for line in cell.source.splitlines())
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "check_parts":
            names += [arg.value for arg in node.args]
    return names


def run_cells(notebook, cwd, monkeypatch, stop=None):
    """Execute the notebook's cells in order in a fresh kernel whose ``minires`` is
    this checkout's (cwd: the notebook's folder), up to and including cell index
    ``stop`` (default: all). Raises nbclient's CellExecutionError at a failing cell."""
    from nbclient import NotebookClient

    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the kernel is a subprocess: it inherits this
    monkeypatch.setenv("MINIRES_BACKEND", "numpy")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}})
    with client.setup_kernel():
        for index, cell in enumerate(notebook.cells):
            if stop is not None and index > stop:
                break
            client.execute_cell(cell, index)
    return notebook


def text_output(cell):
    """What a code cell printed (streams, results and errors), as one string."""
    parts = []
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream":
            parts.append(output.get("text", ""))
        elif output.get("output_type") == "error":
            parts.append(f"{output.get('ename')}: {output.get('evalue')}")
        elif "data" in output:
            parts.append(output["data"].get("text/plain", ""))
    return "".join(parts)


@pytest.mark.skipif(STUDENT_COPY, reason="a student copy holds only the notebooks of its parts")
def test_every_notebook_exists_and_checks_exactly_its_parts():
    if not NOTEBOOK_DIR.is_dir():
        pytest.skip("no notebooks/ folder")
    pytest.importorskip("jupytext", reason="jupytext not installed (pip install -e \".[notebooks]\")")
    for stem, parts in A.NOTEBOOKS:
        path = NOTEBOOK_DIR / f"{stem}.py"
        assert path.is_file(), path
        notebook = read_notebook(path)
        checks = [name for cell in notebook.cells if cell.cell_type == "code" for name in checked_parts(cell)]
        assert checks == list(parts), (stem, checks)
        first_code = next(cell for cell in notebook.cells if cell.cell_type == "code")
        assert "assignment.notebook_setup()" in first_code.source, stem
        questions = [cell for cell in notebook.cells if cell.cell_type == "markdown" and "*Your answer:*" in cell.source]
        assert sum(cell.source.count("*Your answer:*") for cell in questions) >= 2, stem
    assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.py")) == sorted(f"{stem}.py" for stem, _ in A.NOTEBOOKS)


@needs_jupyter
@pytest.mark.parametrize("stem, parts, path", notebook_paths())
def test_notebook_runs_top_to_bottom(stem, parts, path, monkeypatch):
    """Every cell runs; every check cell prints PASS for each of its parts; the
    experiment's cells print what they measured."""
    notebook = run_cells(read_notebook(path), NOTEBOOK_DIR, monkeypatch)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert f"minires from {ROOT / 'minires'}" in text_output(code[0])
    for cell in code:
        for name in checked_parts(cell):
            assert f"{name}: PASS (" in text_output(cell), (stem, text_output(cell))
    experiment = [cell for cell in code if not checked_parts(cell)][1:]  # after the setup cell
    assert experiment and all(text_output(cell).strip() for cell in experiment), stem
