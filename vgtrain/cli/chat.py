"""`vgtrain chat --export DIR IMAGE...`: talk about images on stdin/stdout.

Each line read is a user turn; the answer is printed on one line (with several images, one
``image<TAB>answer`` line per image, each image with its own history). The history is kept and
the KV cache reused across turns. Commands: ``/image PATH...`` switches to other images (the
history stays), ``/reset`` forgets the history, ``/quit`` (or end of input) ends.
"""

from __future__ import annotations

import argparse
import sys

from vgtrain.decode.images import ImageError
from vgtrain.export.artifact import ArtifactError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vgtrain chat", description="Talk about images with an exported adapter."
    )
    p.add_argument("images", nargs="+", help="the image(s) to talk about")
    p.add_argument(
        "--export", required=True, metavar="DIR", help="an export directory written by `vgtrain export`"
    )
    p.add_argument("--max-new-tokens", type=int, default=48, help="longest answer, in tokens")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vgtrain.decode import VisualDecoder
    from vgtrain.decode.chat_session import ChatSession

    try:
        decoder = VisualDecoder.from_export(args.export, device=args.device)
        sessions = [ChatSession(decoder, image, max_new_tokens=args.max_new_tokens) for image in args.images]
    except (ArtifactError, ImageError, OSError) as error:
        print(f"vgtrain chat: error: {error}", file=sys.stderr)
        return 1
    names = list(args.images)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            for session in sessions:
                session.reset()
            continue
        if text.startswith("/image"):
            paths = text.split()[1:]
            if len(paths) != len(sessions):
                print(
                    f"vgtrain chat: /image needs {len(sessions)} path(s), got {len(paths)}", file=sys.stderr
                )
                continue
            try:
                for session, path in zip(sessions, paths, strict=True):
                    session.set_image(path)
            except ImageError as error:
                print(f"vgtrain chat: {error}", file=sys.stderr)
                continue
            names = paths
            continue
        for name, session in zip(names, sessions, strict=True):
            answer = session.ask(text)
            print(answer if len(sessions) == 1 else f"{name}\t{answer}", flush=True)
