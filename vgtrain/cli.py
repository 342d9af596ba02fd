"""`vgtrain <command> [args]`: one entry point for every task."""

from __future__ import annotations

import sys

COMMANDS = {
    "train": "train an adapter (Hydra overrides follow, e.g. trainer.max_steps=50 model/mapper=mlp)",
}

USAGE = "usage: vgtrain <command> [args]\n\ncommands:\n" + "\n".join(
    f"  {name:<8} {summary}" for name, summary in COMMANDS.items()
) + "\n\n`vgtrain <command> --help` shows a command's options."


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"vgtrain: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    # Hydra reads sys.argv itself; hand it the command's own arguments.
    sys.argv = [f"vgtrain {command}", *rest]
    if command == "train":
        from vgtrain.train import main as train_main

        train_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
