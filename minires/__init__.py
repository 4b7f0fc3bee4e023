"""minires: a from-scratch ResNet in NumPy (CPU) and CuPy (GPU), written to be read."""
__version__ = "0.1.0"
