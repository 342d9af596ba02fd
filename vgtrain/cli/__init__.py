"""`vgtrain <command> [args]`: one entry point for every task."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from vgtrain.cli.explain import explain
from vgtrain.errors import Preempted, UserExit

HYDRA_COMMANDS = {"train", "eval"}
COMMANDS = {
    "train": "train an adapter (Hydra overrides follow, e.g. trainer.max_steps=50 model/mapper=mlp)",
    "export": "export a checkpoint's adapter: vgtrain export CKPT OUT_DIR [--bundle-backbones]",
    "caption": "caption images with an export: vgtrain caption --export DIR IMG... [--strategy beam]",
    "chat": "talk about an image with an export (stdin/stdout): vgtrain chat --export DIR IMG",
    "shards": "image-text data -> WebDataset shards: vgtrain shards SOURCE --out DIR [--val-fraction 0.05]",
    "cache": "precompute frozen vision features beside the shards: vgtrain cache [--batch-size N] OVERRIDES",
    "eval": "score an export on a split (COCO metrics, CLIPScore): vgtrain eval export=DIR data.val_urls=...",
    "bench": "training, data and decoding throughput -> bench.json: vgtrain bench [--size smoke] [--only train]",
}

USAGE = (
    "usage: vgtrain <command> [args]\n\ncommands:\n"
    + "\n".join(f"  {name:<8} {summary}" for name, summary in COMMANDS.items())
    + (
        "\n\n`vgtrain <command> --help` shows a command's options. Errors print as one line;\n"
        "`--verbose` (or HYDRA_FULL_ERROR=1) shows the full traceback."
    )
)


@contextlib.contextmanager
def _errors_raised() -> Iterator[None]:
    """Makes Hydra re-raise errors instead of printing its abbreviated traceback and exiting, so
    that main() decides: one line for an error the user can act on, the traceback otherwise."""
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"vgtrain: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    verbose = "--verbose" in rest or os.environ.get("HYDRA_FULL_ERROR") == "1"
    rest = [arg for arg in rest if arg != "--verbose"]
    # Hydra reads sys.argv itself; hand it the command's own arguments. For `train`, argv[0] is
    # a runnable file: Lightning's DDP launcher starts the other ranks by running it again.
    entry = str(Path(__file__).with_name("ddp_rank.py")) if command == "train" else f"vgtrain {command}"
    sys.argv = [entry, *rest]
    try:
        with _errors_raised():
            # Each command is vgtrain/cli/<command>.py; imported on use, so `vgtrain caption` never
            # pays for Lightning. Hydra commands read sys.argv, the others take their arguments.
            command_module = importlib.import_module(f"vgtrain.cli.{command}")
            if command in HYDRA_COMMANDS:
                command_module.main()
            else:
                return command_module.main(rest)
    except UserExit as failed:  # a user error raised inside a Hydra job (see UserExit)
        if verbose:
            raise failed.error from None
        print(f"vgtrain {command}: {failed.code} (--verbose shows the traceback)", file=sys.stderr)
        return 1
    except Preempted as stop:  # a checkpoint was written on SIGTERM/SIGUSR1: say where, exit 128+signal
        print(f"vgtrain {command}: {stop.message}", file=sys.stderr)
        return int(stop.code)
    except Exception as error:
        message = None if verbose else explain(error)
        if message is None:  # asked for, or unexpected (a bug): the full traceback
            raise
        print(f"vgtrain {command}: error: {message} (--verbose shows the traceback)", file=sys.stderr)
        return 1
    return 0
