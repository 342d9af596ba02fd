"""`vgtrain chat` on stdin/stdout, VisualDecoder.chat, caption --question through the template."""

import os
import subprocess
import sys

import pytest
from PIL import Image

from tests.vqa_helpers import train_vqa, write_tiny_vqa
from vgtrain.decode import VisualDecoder
from vgtrain.decode.chat_session import ChatSession
from vgtrain.export.writer import export_checkpoint

Q1, Q2 = "What color is the shape?", "How big is it?"


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    data = write_tiny_vqa(tmp_path_factory.mktemp("vqa"))
    root = tmp_path_factory.mktemp("chat")
    _, checkpoint, _ = train_vqa(root, data, llm_adapter=None, steps=4)
    return export_checkpoint(checkpoint, root / "export")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two very different images (a briefly trained model tells them apart only when they are)."""
    import numpy as np

    folder = tmp_path_factory.mktemp("images")
    pixels = [
        np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8),
        np.zeros((32, 32, 3), np.uint8),
    ]
    paths = [folder / f"image{index}.png" for index in range(2)]
    for path, array in zip(paths, pixels, strict=True):
        Image.fromarray(array).save(path)
    return paths


def test_chat_session_reuses_the_cache_and_answers_as_a_fresh_decode(export_dir, images):
    decoder = VisualDecoder.from_export(export_dir)
    session = ChatSession(decoder, images[0], max_new_tokens=6)
    first = session.ask(Q1)
    second = session.ask(Q2)
    assert session.reused_tokens > 0  # the second turn fed only what the cache lacked
    # The same answers as decoding each turn from scratch with the whole history.
    fresh = decoder.chat([images[0]], [{"role": "user", "content": Q1}], max_new_tokens=6)[0].text
    assert first == fresh
    history = [
        {"role": "user", "content": Q1},
        {"role": "assistant", "content": first},
        {"role": "user", "content": Q2},
    ]
    assert second == decoder.chat([images[0]], history, max_new_tokens=6)[0].text


def test_vgtrain_chat_two_turns_on_stdin(export_dir, images, tmp_path):
    decoder = VisualDecoder.from_export(export_dir)
    turns = f"{Q1}\n{Q2}\n/reset\n{Q2}\n/image {images[1]}\n{Q1}\n"

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "vgtrain.cli",
            "chat",
            "--export",
            str(export_dir),
            "--max-new-tokens",
            "6",
            str(images[0]),
        ],
        input=turns,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    first, second, second_alone, other_image = done.stdout.splitlines()

    def answer(image, messages):
        return decoder.chat([image], messages, max_new_tokens=6)[0].text

    with_history = [
        {"role": "user", "content": Q1},
        {"role": "assistant", "content": first},
        {"role": "user", "content": Q2},
    ]
    # The second answer conditions on the first: it is the answer given the history...
    assert second == answer(images[0], with_history)
    # ... which is not what the question alone gets (after /reset the CLI asks it alone). Briefly
    # trained, the model may say the same words either way, but not with the same probability.
    alone = [{"role": "user", "content": Q2}]
    assert second_alone == answer(images[0], alone)
    scores = [decoder.chat([images[0]], m, max_new_tokens=6)[0].score for m in (with_history, alone)]
    assert scores[0] != pytest.approx(scores[1], abs=1e-4)
    # And on the image: the other image's answers are that image's (same history).
    assert other_image == answer(
        images[1],
        [
            {"role": "user", "content": Q2},
            {"role": "assistant", "content": second_alone},
            {"role": "user", "content": Q1},
        ],
    )
    scores = [decoder.chat([image], with_history, max_new_tokens=6)[0].score for image in images]
    assert scores[0] != pytest.approx(scores[1], abs=1e-4)
