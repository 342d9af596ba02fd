"""`python -m vgtrain.cli <command> ...`, the same as the `vgtrain` console script."""

import sys

from vgtrain.cli import main

if __name__ == "__main__":
    # Without a module spec, Lightning's DDP launcher re-runs sys.argv[0] (vgtrain/cli/ddp_rank.py,
    # with the command's overrides) instead of `-m vgtrain.cli`, which would lose the command name.
    __spec__ = None  # noqa: F811
    sys.exit(main())
