"""Lightning's DDP launcher starts ranks 1.. by running ``sys.argv[0]`` again with the same
arguments; `vgtrain train` points ``sys.argv[0]`` at this file, so every rank runs `vgtrain train`
with the overrides of rank 0. Not a command of its own."""

import sys
from pathlib import Path

if __name__ == "__main__":
    # Run as a script, this folder is sys.path[0]: drop it so that its modules (train.py, eval.py …)
    # cannot shadow top-level packages of the same name.
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)
    from vgtrain.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
