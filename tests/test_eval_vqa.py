"""`vgtrain eval task=vqa`: answers scored per question type, report; the same answers as the
training module greedy-decodes (export -> eval round trip)."""

import json

import pytest
import torch

from tests.conftest import run_vgtrain
from tests.vqa_helpers import LORA, train_vqa, write_tiny_vqa
from vgtrain.data.conversation_split import read_conversation_split
from vgtrain.data.pipeline import SkipCounter
from vgtrain.decode.chat import generate_answers
from vgtrain.evaluation.vqa import split_questions
from vgtrain.export.writer import export_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data = write_tiny_vqa(tmp_path_factory.mktemp("vqa"))
    root = tmp_path_factory.mktemp("evalvqa")
    module, checkpoint, datamodule = train_vqa(root, data, llm_adapter=LORA, steps=6)
    return data, module, export_checkpoint(checkpoint, root / "export"), datamodule


def test_eval_task_vqa_scores_answers_like_the_training_module(trained, tmp_path):
    data, module, export, datamodule = trained
    val = json.loads((data / "manifest.json").read_text())["patterns"]["val"]
    done = run_vgtrain(
        "eval", "task=vqa", f"export={export}", "data=shapes_vqa", f"data.val_urls={val}",
        "decode=greedy", "decode.options.max_new_tokens=6", "logger=none", "report.num_images=3",
        f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    samples = list(read_conversation_split(val, None, SkipCounter()))
    questions = [q for key, _, conversations in samples for q in split_questions(key, conversations)]
    assert len(rows) == len(questions) == metrics["num_questions"]
    assert metrics["vqa_accuracy"] == pytest.approx(sum(r["score"] for r in rows) / len(rows))
    kinds = {r["type"] for r in rows}
    assert {f"vqa_accuracy/{k}" for k in kinds} <= metrics.keys() and "followup" in kinds
    # The training module, greedy through the training template, answers the same.
    renderer = datamodule.collator.renderer
    images = {key: image for key, image, _ in samples}
    with torch.no_grad():
        pixels = torch.stack([module.model.vision.transform(images[q.key]) for q in questions])
        features = module.model.features(pixels)
        encodings = [renderer.encode(q.history, add_generation_prompt=True) for q in questions]
        expected = generate_answers(module.model, features, encodings, max_new_tokens=6)
    assert [r["answer"] for r in rows] == expected
    page = (run / "report.html").read_text()
    assert page.count("<img src='data:image/png") == 3 and rows[0]["question"].split()[0] in page
