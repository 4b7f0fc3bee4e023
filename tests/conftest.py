"""Shared fixtures, and a guard that the tests import this repository's minires.

In a student copy of the course kit (``minires assignment make``), a test that
runs into a part not written yet, or into a function the copy leaves out, is
reported once per part instead of with hundreds of tracebacks: see
:func:`pytest_runtest_makereport`.

``xp`` runs a test once per backend: NumPy always, CuPy only where CuPy and a
GPU are present (skipped cleanly elsewhere, e.g. in CI). The active backend is
switched for the duration of the test, so modules built inside it live there.
"""
import re
from pathlib import Path

import numpy
import pytest

try:
    import minires
except ModuleNotFoundError as err:  # no minires importable at all: pytest_configure explains
    if err.name != "minires":
        raise
    minires = None

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """Stop at once if these tests would import some other folder's ``minires``.

    Plain ``pytest`` (unlike ``python -m pytest``) does not put the repository on
    sys.path, so it imports whichever ``minires`` is installed: in a student copy
    of the course kit that is the course's reference code, and every test of a
    stubbed part would pass. A UsageError prints one clear message, no traceback.
    """
    imported = Path(minires.__file__).resolve().parent if minires else None
    here = (REPO / "minires").resolve()
    if imported != here:  # (checked before importing anything from it: another minires may lack it)
        problem = (f"import minires from {imported}, not {here}: they would test that code"
                   if imported else f"cannot import minires ({REPO} is not on sys.path)")
        raise pytest.UsageError(
            f"the tests in {REPO / 'tests'} {problem}.\n"
            f"  fix: run `pip install -e .` in {REPO}, or run the tests with `python -m pytest` there.")


BACKENDS = ["numpy", pytest.param("cupy", marks=pytest.mark.gpu)]


@pytest.fixture(params=BACKENDS)
def xp(request):
    from minires import backend  # here, not at the top: pytest_configure checks which minires first
    if request.param == "cupy" and not backend.cupy_available():
        pytest.skip("CuPy with a GPU is not available")
    previous = backend.backend_name()
    module = backend.set_backend(request.param)
    backend.manual_seed(0)
    yield module
    backend.set_backend(previous)


@pytest.fixture(params=["fast", "textbook"])
def kernels(request):
    """Run a test under each setting of the seam (minires/ops.py): the engine's ops, then the textbook's."""
    from minires import ops
    with ops.kernels(request.param):
        yield request.param


@pytest.fixture
def rng():
    return numpy.random.default_rng(1234)


# What a stub of the course kit raises, and what a function left out of a student copy raises
# (minires/assignment.py writes both); found in the error's text, so also in a subprocess's output.
# (and what `assignment check` and a notebook's check cell print: "NAME: not written yet (the TODO in ...)")
NOT_WRITTEN = re.compile(r"\b(\w+): not written yet(?:, see the TODO above| -- write its body| \(the TODO in)")
LEFT_OUT = re.compile(r"(\w+) \(minires/[\w/.]+\) is left out of this student copy: "
                      r"it would give away the part (\w+)")
_reported = set()
# a student copy holds ASSIGNMENT.md; in the course repository nothing is turned into a skip
STUDENT_COPY = (REPO / "ASSIGNMENT.md").is_file()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A part not written yet fails ONE test, with one line; every later test that meets
    it is skipped, and so is a test of a function the student copy leaves out."""
    report = (yield).get_result()
    if not STUDENT_COPY or call.excinfo is None or report.outcome != "failed" or call.when not in ("setup", "call"):
        return
    # the error, its traceback (chained errors too: a CLI that caught the stub's error)
    # and the captured output (a subprocess's)
    text = "\n".join([f"{call.excinfo.typename}: {call.excinfo.value}", str(report.longrepr),
                      *(content for _, content in report.sections)])
    not_written, left_out = NOT_WRITTEN.search(text), LEFT_OUT.search(text)
    where = (str(item.path), item.location[1] or 0)
    if not_written:
        part = not_written.group(1)
        if part not in _reported:
            _reported.add(part)
            from minires.assignment import PARTS
            path = next((p.path for p in PARTS if p.name == part), "")
            report.longrepr = (f"{part}: not written yet -- write its body (the TODO in minires/{path}), "
                               f"then run its tests: python -m minires assignment check {part}")
            return
        report.outcome, report.longrepr = "skipped", (*where, f"Skipped: {part} not written yet")
    elif left_out:
        report.outcome = "skipped"
        report.longrepr = (*where, f"Skipped: {left_out.group(1)} is left out of this copy "
                                   f"(it would give away {left_out.group(2)})")
