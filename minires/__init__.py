"""minires: a from-scratch ResNet in NumPy (CPU) and CuPy (GPU), written to be read.

The ops are written twice: plainly in minires/functional/ (the textbook) and
fast in minires/kernels/ (the engine). ``set_kernels("fast" | "textbook")``
chooses which one runs (minires/ops.py, the seam).
"""
__version__ = "0.1.0"

from .ops import get_kernels, set_kernels  # noqa: E402
