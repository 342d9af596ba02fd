"""Every command the README shows runs as written.

The fenced ``bash`` and ``python`` blocks of README.md run in README order, as one user session,
in an empty folder that holds only the inputs a reader would bring (photos with captions, a few
images to caption). A command gets nothing but its documented smallest-run options appended
(README, "Usage": ``debug=smoke`` for training, ``limit=4`` for eval, ``--size smoke`` for the
bench). A block that cannot run here says why in a ``<!-- readme-test: skip: REASON -->`` line
right above it; any other line that is not a `vgtrain` command fails the test, so a new block
cannot go untested by accident.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(
    r"(?:<!-- readme-test: skip: (?P<skip>[^\n]*?) -->\n)?```(?P<lang>bash|python)\n(?P<body>.*?)```", re.S
)


@dataclass(frozen=True)
class Command:
    line: int  # in README.md
    language: str
    text: str  # as written, comments stripped
    appended: tuple[str, ...]

    def __str__(self) -> str:
        return f"README.md:{self.line}: {self.text[:90]}"


def strip_comment(line: str) -> str:
    """The line without a trailing shell comment (a ``#`` starting a word outside quotes)."""
    quote = None
    for index, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index].rstrip()
    return line.rstrip()


def smallest_run(words: list[str]) -> tuple[str, ...]:
    """The documented smallest-run options of a `vgtrain` command (README, "Usage")."""
    command = words[1] if len(words) > 1 else ""
    if command == "train":
        if "-m" in words and any(word.startswith("hparams_search=") for word in words):
            return ("debug=smoke", "hydra.sweeper.n_trials=2")
        return ("debug=smoke",)
    return {"eval": ("limit=4",), "bench": ("--size", "smoke")}.get(command, ())


def readme_commands() -> tuple[list[Command], list[str]]:
    """(the commands to run, the skipped blocks with their reasons)."""
    text = README.read_text(encoding="utf-8")
    commands: list[Command] = []
    skipped: list[str] = []
    for block in BLOCK.finditer(text):
        start = text.count("\n", 0, block.start("body")) + 1
        if block.group("skip") is not None:
            skipped.append(f"README.md:{start}: {block.group('skip')}")
            continue
        if block.group("lang") == "python":
            commands.append(Command(start, "python", block.group("body"), ()))
            continue
        logical, first = "", start
        for offset, raw in enumerate(block.group("body").splitlines()):
            if not logical:
                first = start + offset
            line = strip_comment(raw)
            if line.endswith("\\"):
                logical += line[:-1] + " "
                continue
            logical = (logical + line).strip()
            if logical:
                words = shlex.split(logical)
                assert words[0] == "vgtrain", (
                    f"README.md:{first}: {logical!r} is not a vgtrain command; mark its block with "
                    "<!-- readme-test: skip: REASON --> if it cannot run here"
                )
                commands.append(Command(first, "bash", logical, smallest_run(words)))
            logical = ""
    return commands, skipped


COMMANDS, SKIPPED = readme_commands()


def _scene(path: Path, index: int, size: int = 96) -> None:
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    box = (10 + 3 * (index % 7), 12, 60 + 2 * (index % 9), 70)
    (draw.ellipse if index % 2 else draw.rectangle)(box, fill=colours[index % len(colours)])
    image.save(path)


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty folder with what a reader brings: photos with captions and images to caption."""
    root = tmp_path_factory.mktemp("readme")
    (root / "photos").mkdir()
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    for index in range(40):
        _scene(root / "photos" / f"photo{index:03d}.jpg", index)
        shape = "circle" if index % 2 else "square"
        (root / "photos" / f"photo{index:03d}.txt").write_text(f"a {colours[index % 6]} {shape}\n")
    (root / "more_images").mkdir()
    for index, name in enumerate(
        ["photo.jpg", "img.png", "a.jpg", "b.jpg", "more_images/c.jpg", "more_images/d.png"]
    ):
        _scene(root / name, index)
    (root / "list.txt").write_text("a.jpg\nb.jpg\n")
    return root


def test_every_skipped_block_gives_a_reason():
    assert COMMANDS, "no runnable command found in README.md"
    assert all(reason.split(": ", 1)[1].strip() for reason in SKIPPED), SKIPPED


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_readme_command_runs_as_written(session: Path, command: Command) -> None:
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        # The `vgtrain` a reader has after `make install`: this interpreter's console script.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    if command.language == "python":
        argv = [sys.executable, "-c", command.text]
    else:
        argv = ["bash", "-c", " ".join([command.text, *map(shlex.quote, command.appended)])]
    result = subprocess.run(argv, cwd=session, env=environment, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
