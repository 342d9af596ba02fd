"""`vgtrain shards` on LLaVA-style instruction JSON and VQAv2 question + annotation files."""

import json

from PIL import Image

from vgtrain.cli.shards import main as shards_main
from vgtrain.data.conversation_split import read_conversation_split
from vgtrain.data.pipeline import SkipCounter


def _images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        Image.new("RGB", (16, 16), (40 * index, 100, 200)).save(folder / name)


def _split_contents(out):
    manifest = json.loads((out / "manifest.json").read_text())
    found = {}
    for pattern in manifest["patterns"].values():
        for key, _, conversations in read_conversation_split(pattern, None, SkipCounter()):
            found[key] = conversations
    return manifest, found


def test_llava_instruction_json_with_bad_items_counted_by_reason(tmp_path):
    _images(tmp_path / "images", ["a.png", "b.png"])

    def item(image, turns, **extra):
        return {"id": image or "x", "image": image, "conversations": turns, **extra}

    human, gpt = "human", "gpt"
    data = [
        item("a.png", [{"from": human, "value": "<image>\nWhat is it?"}, {"from": gpt, "value": "A square."}]),
        item("a.png", [{"from": human, "value": "Colour?"}, {"from": gpt, "value": "Blue."},
                       {"from": human, "value": "Sure?"}, {"from": gpt, "value": "Yes."}]),
        item("b.png", [{"from": human, "value": "Describe it."}, {"from": gpt, "value": "A red one."}]),
        item(None, [{"from": human, "value": "Q"}, {"from": gpt, "value": "A"}]),
        item("missing.png", [{"from": human, "value": "Q"}, {"from": gpt, "value": "A"}]),
        item("b.png", [{"from": human, "value": "Only a question?"}]),
        item("b.png", [{"from": gpt, "value": "An answer first"}, {"from": human, "value": "Q"}]),
        item("b.png", [{"from": human, "value": "Q"}, {"from": gpt, "value": "  "}]),
    ]  # fmt: skip
    source = tmp_path / "instruct.json"
    source.write_text(json.dumps(data))
    out = tmp_path / "out"
    assert (
        shards_main(
            [
                str(source),
                "--out",
                str(out),
                "--image-root",
                str(tmp_path / "images"),
                "--no-progress",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    manifest, found = _split_contents(out)
    assert manifest["skipped"] == {
        "no_image": 1, "missing_image": 1, "no_assistant_turn": 1, "turns_out_of_order": 1, "empty_answer": 1,
    }  # fmt: skip
    assert sorted(found) == ["a", "b"]
    assert [len(c) for c in found["a"]] == [2, 4]
    assert found["a"][0][0] == {"role": "user", "content": "<image>\nWhat is it?"}
    assert found["b"][0][1]["content"] == "A red one."


def test_vqav2_questions_and_annotations_keep_all_ten_answers(tmp_path):
    _images(tmp_path / "val2014", ["COCO_val2014_000000000001.jpg", "COCO_val2014_000000000002.jpg"])
    questions = {
        "data_subtype": "val2014",
        "questions": [
            {"image_id": 1, "question": "How many dogs?", "question_id": 10},
            {"image_id": 1, "question": "Is it sunny?", "question_id": 11},
            {"image_id": 2, "question": "What colour?", "question_id": 20},
            {"image_id": 3, "question": "Missing image?", "question_id": 30},
            {"image_id": 2, "question": "No annotation?", "question_id": 21},
        ],
    }
    ten = ["2"] * 6 + ["two"] * 2 + ["3"] * 2

    def annotation(qid, image, best, answers, kind):
        return {
            "question_id": qid,
            "image_id": image,
            "multiple_choice_answer": best,
            "answer_type": kind,
            "question_type": "how many",
            "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)],
        }

    annotations = {"data_subtype": "val2014", "annotations": [
        annotation(10, 1, "2", ten, "number"), annotation(11, 1, "yes", ["yes"] * 10, "yes/no"),
        annotation(20, 2, "", ["red"] * 10, "other"), annotation(30, 3, "no", ["no"] * 10, "yes/no"),
    ]}  # fmt: skip
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    out = tmp_path / "out"
    args = [str(tmp_path / "q.json"), str(tmp_path / "a.json"), "--format", "vqav2", "--out", str(out)]
    assert shards_main([*args, "--image-root", str(tmp_path), "--no-progress", "--workers", "1"]) == 0
    manifest, found = _split_contents(out)
    assert manifest["skipped"] == {"missing_image": 1, "no_answer": 1, "empty_answer": 1}
    assert list(manifest["patterns"]) == ["val"]
    (conversations,) = found.values()
    first = conversations[0][1]
    assert first["content"] == "2" and first["answers"] == ten and first["type"] == "number"
    assert [c[0]["content"] for c in conversations] == ["How many dogs?", "Is it sunny?"]
