"""The grounding loss: regions read and checked, boxes to grid cells, words to targets, the loss
where the prefix sits, and a model that learns to name what each visual token shows."""

import pytest
import torch
import torch.nn.functional as F
import webdataset as wds

from tests.conftest import TINY_LLM, TINY_MAPPER, TINY_VISION
from tests.vqa_helpers import PLAIN_CHAT, write_tiny_vqa
from vgtrain.data.conversation import GROUNDING_CHECK_SAMPLES, conversation_collator
from vgtrain.data.pipeline import CaptionPicker, SkipCounter, sample_text
from vgtrain.models import build_model
from vgtrain.models.grounding import (
    GroundingTargets,
    Region,
    RegionError,
    covered_cells,
    grounding_loss,
    read_regions,
)
from vgtrain.models.lm_loss import IGNORE_INDEX

PROJECTOR = {"name": "projector", "prefix_length": None, "hidden_dim": 64}


def test_regions_are_read_and_bad_ones_named():
    raw = [{"box": [0.1, 0.2, 0.5, 0.6], "words": ["red", " circle "]}]
    assert read_regions(raw) == [Region((0.1, 0.2, 0.5, 0.6), ("red", "circle"))]
    for bad, message in (
        ({"box": [0.1, 0.2, 0.5], "words": ["red"]}, r"regions\[0\].box must be"),
        ({"box": [0.5, 0.2, 0.1, 0.6], "words": ["red"]}, "x0 < x1"),
        ({"box": [0.1, 0.2, 0.5, 1.5], "words": ["red"]}, r"lie in \[0, 1\]"),
        ({"box": [0.1, 0.2, 0.5, 0.6], "words": []}, r"regions\[0\].words"),
        ({"box": [0.1, 0.2, 0.5, 0.6], "words": "red"}, r"regions\[0\].words"),
    ):
        with pytest.raises(RegionError, match=message):
            read_regions([bad])
    with pytest.raises(RegionError, match="must be a list"):
        read_regions({"box": [0, 0, 1, 1]})


def test_a_sample_with_bad_regions_is_skipped_and_counted():
    counter = SkipCounter()
    good = {"txt": b"a red circle", "json": b'{"regions": [{"box": [0, 0, 0.5, 0.5], "words": ["red"]}]}'}
    bad = {"txt": b"a red circle", "json": b'{"regions": [{"box": [0, 0, 2, 0.5], "words": ["red"]}]}'}
    assert sample_text(good, counter, "a.tar", CaptionPicker(None))["regions"][0].words == ("red",)
    assert sample_text(bad, counter, "b.tar", CaptionPicker(None)) is None
    assert counter.counts == {"bad_regions": 1}


def test_boxes_cover_the_grid_cells_they_overlap():
    grid = (4, 4)  # cells of 0.25
    assert covered_cells((0.0, 0.0, 0.3, 0.2), grid) == [0, 1]
    assert covered_cells((0.3, 0.3, 0.5, 0.5), grid) == [5]  # an edge on a cell boundary is no overlap
    assert covered_cells((0.6, 0.76, 1.0, 1.0), grid) == [14, 15]
    assert covered_cells((0.0, 0.0, 1.0, 1.0), (2, 3)) == [0, 1, 2, 3, 4, 5]


def test_targets_are_the_word_tokens_of_every_region_over_a_cell():
    model = build_model(dict(TINY_VISION), dict(TINY_LLM), dict(PROJECTOR))
    tokenizer = model.llm.tokenizer
    targets = GroundingTargets(tokenizer, (2, 2), max_targets=6)
    left = Region((0.0, 0.0, 0.5, 1.0), ("red", "circle"))
    middle = Region((0.4, 0.0, 0.6, 0.4), ("blue",))
    out = targets([left, middle])
    ids = {w: tokenizer(" " + w, add_special_tokens=False).input_ids for w in ("red", "circle", "blue")}
    cell = [sorted(int(t) for t in row if t != IGNORE_INDEX) for row in out]
    assert cell[0] == sorted(set(ids["red"] + ids["circle"] + ids["blue"]))
    assert cell[1] == sorted(ids["blue"])
    assert cell[2] == sorted(set(ids["red"] + ids["circle"])) and cell[3] == []
    assert targets([]).eq(IGNORE_INDEX).all()


def test_loss_is_the_mean_cross_entropy_over_the_targets():
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 3, 8), torch.randn(11, 8)
    targets = torch.full((2, 3, 2), IGNORE_INDEX)
    targets[0, 0] = torch.tensor([4, 7])
    targets[1, 2, 0] = 1
    log_probs = F.log_softmax(hidden @ weight.T, -1)
    expected = -(log_probs[0, 0, 4] + log_probs[0, 0, 7] + log_probs[1, 2, 1]) / 3
    assert torch.allclose(grounding_loss(hidden, targets, weight, None), expected)
    assert grounding_loss(hidden, torch.full_like(targets, IGNORE_INDEX), weight, None) == 0


def test_the_model_reads_the_prefix_where_the_image_sits():
    torch.manual_seed(0)
    model = build_model(dict(TINY_VISION), dict(TINY_LLM), dict(PROJECTOR)).eval()
    hidden = torch.randn(2, 9, 5)
    at = model.prefix_hidden(hidden, torch.tensor([0, 3]))
    assert torch.equal(at[0], hidden[0, :4]) and torch.equal(at[1], hidden[1, 3:7])
    ids = torch.randint(0, 100, (2, 6))
    labels = torch.full((2, 10), IGNORE_INDEX)
    labels[:, -1] = ids[:, -1]
    targets = torch.full((2, 4, 1), IGNORE_INDEX)
    targets[1, 2, 0] = 42
    pixels = torch.randn(2, 3, 32, 32)
    position = torch.tensor([0, 2])
    out = model(ids, torch.ones_like(ids), labels, pixel_values=pixels, image_position=position,
                grounding_targets=targets)  # fmt: skip
    embeds, mask = model.input_embeddings(model.features(pixels), ids, torch.ones_like(ids), position)
    causal = model.llm.causal_mask(embeds.shape[1], embeds.device, embeds.dtype)
    full = model.llm(embeds, causal if causal is not None else mask).last_hidden_state
    expected = -F.log_softmax(model.llm.model.get_output_embeddings()(full[1, 2 + 2]), -1)[42]
    assert torch.allclose(out.grounding_loss, expected, atol=1e-5)
    assert model(ids, torch.ones_like(ids), labels, pixel_values=pixels).grounding_loss is None


def test_an_earlier_block_is_read_through_the_final_norm():
    """model.grounding.layer=k: the loss reads block k's output as the head would read it (the
    final norm, then the head): the logit lens; a layer the LLM lacks is refused."""
    from vgtrain.training.module import checked_layer

    torch.manual_seed(0)
    model = build_model(dict(TINY_VISION), dict(TINY_LLM), dict(PROJECTOR)).eval()
    model.grounding_layer = 0
    ids = torch.randint(0, 100, (1, 5))
    labels = torch.full((1, 9), IGNORE_INDEX)
    labels[0, -1] = ids[0, -1]
    targets = torch.full((1, 4, 1), IGNORE_INDEX)
    targets[0, 1, 0] = 7
    pixels = torch.randn(1, 3, 32, 32)
    out = model(ids, torch.ones_like(ids), labels, pixel_values=pixels, grounding_targets=targets)
    embeds, mask = model.input_embeddings(model.features(pixels), ids, torch.ones_like(ids))
    causal = model.llm.causal_mask(embeds.shape[1], embeds.device, embeds.dtype)
    states = model.llm(
        embeds, causal if causal is not None else mask, output_hidden_states=True
    ).hidden_states
    head = model.llm.model.get_output_embeddings()
    expected = -F.log_softmax(head(model.llm.model.transformer.ln_f(states[1][0, 1])), -1)[7]
    assert torch.allclose(out.grounding_loss, expected, atol=1e-5)
    assert checked_layer(None, model) is None and checked_layer(1, model) == 1
    with pytest.raises(ValueError, match=r"layer=2 is not a block of the LLM \(0..1"):
        checked_layer(2, model)


def test_grounding_needs_a_prefix_per_visual_token():
    from vgtrain.training.module import CaptioningModule

    options = {"optimizer": torch.optim.AdamW, "scheduler": {}, "chat": PLAIN_CHAT}
    with pytest.raises(ValueError, match="model.grounding: it needs a prefix of one embedding"):
        CaptioningModule(
            dict(TINY_VISION), dict(TINY_LLM), dict(TINY_MAPPER), grounding={"weight": 1.0}, **options
        )
    module = CaptioningModule(
        dict(TINY_VISION), dict(TINY_LLM), dict(PROJECTOR), grounding={"weight": 1.0}, **options
    )
    assert module.grounding_weight == 1.0


def _samples(data_dir, count):
    shard = str(data_dir / "train-000000.tar")
    samples = []
    for raw in wds.WebDataset(shard, shardshuffle=False).decode("torchrgb"):
        meta = raw["json"]  # decoded
        samples.append(
            {
                "image": raw["png"],
                "key": raw["__key__"],
                "conversation": meta["conversations"][0],
                "regions": read_regions(meta["regions"]),
            }
        )
        if len(samples) == count:
            return samples
    return samples


def test_a_model_learns_to_name_what_each_visual_token_shows(tmp_path):
    """Trained on the shapes VQA data's regions, the LM head at a visual token a shape covers
    names that shape's colour and kind: the loss falls, and on held-out images it is far lower
    for their own words than for another image's (the words are read from the image)."""
    data_dir = write_tiny_vqa(tmp_path / "vqa")
    torch.manual_seed(0)
    model = build_model(dict(TINY_VISION), {**TINY_LLM, "trainable": True}, dict(PROJECTOR))
    tokenizer = model.llm.tokenizer
    collate = conversation_collator(
        tokenizer, model.prefix_length, dict(PLAIN_CHAT), seed=0,
        grounding=GroundingTargets(tokenizer, model.vision.grid_size),
    )  # fmt: skip
    samples = _samples(data_dir, 128)
    train, held_out = collate(samples[:96]), collate(samples[96:])
    optimizer = torch.optim.AdamW([p for _, p in model.trainable_named_parameters()], lr=3e-3)

    def grounding(batch):
        return model(
            batch["input_ids"], batch["attention_mask"], batch["labels"],
            pixel_values=batch["pixel_values"], image_position=batch["image_position"],
            grounding_targets=batch["grounding_targets"],
        ).grounding_loss  # fmt: skip

    first = float(grounding(train))
    for _ in range(100):
        optimizer.zero_grad()
        grounding(train).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        trained = float(grounding(train))
        held = float(grounding(held_out))
        # The same held-out images, each asked for the words of another image's cells
        others = {**held_out, "grounding_targets": held_out["grounding_targets"].roll(1, 0)}
        mismatched = float(grounding(others))
    print(f"grounding loss: {first:.3f} -> {trained:.3f}; held out {held:.3f}, mismatched {mismatched:.3f}")
    assert trained < 0.5 * first
    assert held < mismatched - 0.5


def test_the_collator_refuses_data_without_regions_and_packing():
    model = build_model(dict(TINY_VISION), dict(TINY_LLM), dict(PROJECTOR))
    tokenizer = model.llm.tokenizer
    targets = GroundingTargets(tokenizer, model.vision.grid_size)
    collate = conversation_collator(
        tokenizer, model.prefix_length, dict(PLAIN_CHAT), seed=0, grounding=targets
    )
    sample = {"caption": "a red circle", "image": torch.randn(3, 32, 32), "key": "plain_0"}
    for _ in range(GROUNDING_CHECK_SAMPLES // 32 - 1):
        assert collate([sample] * 32)["grounding_targets"].eq(IGNORE_INDEX).all()
    with pytest.raises(ValueError, match=r'none of the first 256 samples \(e.g. plain_0\) has "regions"'):
        collate([sample] * 32)
    with pytest.raises(ValueError, match="data.pack_length=0"):
        conversation_collator(
            tokenizer, model.prefix_length, dict(PLAIN_CHAT), pack_length=64, grounding=targets
        )


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_final_norm_is_found_in_every_tiny_family(family):
    llm = build_model(dict(TINY_VISION), {**TINY_LLM, "arch": {**TINY_LLM["arch"], "family": family}}, None,
                      {"name": "gated", "every": 1, "num_heads": 2, "head_dim": 16}).llm  # fmt: skip
    hidden = torch.randn(2, 3, 64)
    norm = llm.model.base_model.ln_f if family == "gpt2" else llm.model.base_model.norm
    assert torch.equal(llm.final_norm(hidden), norm(hidden))


def test_demo_vqa_trains_with_grounding_from_the_command_line(tmp_path):
    """`vgtrain train experiment=demo_vqa` (smallest run, a small generated dataset): the grounding
    loss is computed from the generated regions and logged beside the answer loss."""
    import csv
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "vgtrain.cli", "train", "experiment=demo_vqa", "debug=smoke", "logger=csv",
        "data.synthetic.num_train=64", "data.synthetic.num_val=8", "data.synthetic.num_phrasing=8",
        "trainer.log_every_n_steps=1", f"hydra.run.dir={run_dir}", f"paths.data_dir={tmp_path}",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((run_dir / "csv" / "version_0" / "metrics.csv").open()))
    grounding = [float(r["train/grounding_loss"]) for r in rows if r.get("train/grounding_loss")]
    # ~ln(512) at the start: the untrained head spreads over the tiny vocabulary
    assert grounding and all(4.0 < value < 8.0 for value in grounding)
    assert any(r.get("val/grounding_loss") for r in rows)
