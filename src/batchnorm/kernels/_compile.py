"""The compiler process of :mod:`batchnorm.kernels._jit`:
``python -m batchnorm.kernels._compile MODULE DTYPE PARENT_PID [ENTRY ...]`` compiles a backend's
entries for one dtype into numba's cache (a module of its own, so that running it does not
re-execute a module the package has imported)."""

import sys

from batchnorm.kernels._jit import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
