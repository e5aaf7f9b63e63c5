"""The builder process of :mod:`batchnorm.kernels.native`:
``python -m batchnorm.kernels._build_native DIRECTORY NAME PARENT_PID MODE`` builds the native training
call into ``DIRECTORY``; with MODE ``background`` at the lowest CPU priority, in a process group of its
own (as the cpu backend's compiler, :func:`batchnorm.kernels._jit._run_in_background`), finishing the
build when its parent exits first; with ``wait`` (its parent waits for it) as its parent runs."""

import sys
import threading
from pathlib import Path

from batchnorm.kernels import _jit, native


def main(argv: list[str]) -> int:
    directory, name, parent, mode = argv
    background = mode == "background"
    if background:
        _jit._run_in_background()
    threading.Thread(target=_jit._watch_parent, args=(int(parent),), daemon=True).start()
    try:
        native.build(Path(directory), name, background=background)
    except Exception:  # its message is in DIRECTORY/failed, which the parent reads
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
