"""The standalone decoder and its strategies, checked against slow no-cache references."""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_LLM, TINY_MAPPER, TINY_VISION, run_vgtrain
from tests.tiny_checkpoints import Trained, heldout_images, tiny_llama_folder, train_tiny
from vgtrain.cli.caption import main as caption_main
from vgtrain.decode import Decoding, VisualDecoder, generate_captions
from vgtrain.decode.images import open_image
from vgtrain.decode.magic import magic_search
from vgtrain.decode.reference import greedy_reference, magic_reference
from vgtrain.export.artifact import ADAPTER_FILE, MANIFEST_FILE, ArtifactError
from vgtrain.export.writer import export_checkpoint
from vgtrain.models import build_model

QUESTIONS = ["what is it?", "what colour is the shape on the left of the image?", "where?"]


@pytest.fixture(scope="module")
def trained(shapes_dir, tmp_path_factory) -> Trained:
    return train_tiny(tmp_path_factory.getbasetemp(), shapes_dir, "frozen")


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    return export_checkpoint(trained.checkpoint, tmp_path_factory.mktemp("decode") / "export")


@pytest.fixture(scope="module")
def images(shapes_dir, tmp_path_factory) -> list[Path]:
    return heldout_images(shapes_dir, tmp_path_factory.mktemp("images"), count=3)


def _decoder(
    llm: str, tmp_path_factory: pytest.TempPathFactory, dtype: torch.dtype = torch.float32
) -> VisualDecoder:
    """An untrained tiny model in memory: the algorithms need no training to be compared."""
    llm_config = (
        dict(TINY_LLM)
        if llm == "gpt2"
        else {"name": "smollm2_135m_hub", "path": str(tiny_llama_folder(tmp_path_factory.getbasetemp()))}
    )
    torch.manual_seed(0)  # the mapper's random init decides the captions: keep them fixed
    model = build_model(dict(TINY_VISION), llm_config, dict(TINY_MAPPER)).to(dtype)
    return VisualDecoder(model, vision_config=dict(TINY_VISION))


def _job(decoder: VisualDecoder, images: list[Path], prompts: list[str]) -> tuple[Decoding, object]:
    vision = decoder.model.vision
    pixels = torch.stack([vision.transform(open_image(path)) for path in images])
    features = vision.encode(pixels.to(next(vision.parameters()).dtype))
    job = Decoding(
        decoder.model.llm,
        decoder.prepare_inputs(features, prompts),
        lambda: decoder.clip,
        partial(decoder.bind_memory, features),
        decoder.model.xattn,
    )
    return job, features


def test_export_round_trip_gives_the_in_memory_models_captions(trained, exported, images):
    model = trained.module.model
    with torch.no_grad():
        features = model.vision.encode(torch.stack([model.vision.transform(open_image(p)) for p in images]))
    expected = generate_captions(model, features, prompt=trained.module.prompt, max_new_tokens=12)
    results = VisualDecoder.from_export(exported).caption(images, max_new_tokens=12)
    assert [r.text for r in results] == expected
    assert all(r.ok and r.image == str(p) and r.score < 0 for r, p in zip(results, images, strict=True))


@pytest.mark.parametrize("llm", ["gpt2", "llama"])
def test_greedy_equals_a_no_cache_loop_and_beam_of_one_with_left_padded_questions(
    llm, images, tmp_path_factory
):
    decoder = _decoder(llm, tmp_path_factory, torch.float64)  # float64: no near-tie can flip an argmax
    prompts = decoder.prompts(3, QUESTIONS)
    job, features = _job(decoder, images, prompts)
    assert job.inputs.attention_mask[:, 0].tolist() == [0, 1, 0]  # rows of different length, left-padded
    greedy = [group[0].tokens for group in decoder.decode(features, prompts, "greedy", max_new_tokens=8)]
    assert greedy == [tokens for tokens, _ in greedy_reference(job, max_new_tokens=8)]
    beam = [
        group[0].tokens for group in decoder.decode(features, prompts, "beam", num_beams=1, max_new_tokens=8)
    ]
    assert beam == greedy
    for row in range(3):  # padding changes nothing: each image alone decodes the same
        alone = decoder.decode(
            features.index_select(torch.tensor([row])), [prompts[row]], "greedy", max_new_tokens=8
        )
        assert alone[0][0].tokens == greedy[row]


def test_sampling_is_reproducible_under_a_seed_and_leaves_the_global_rng_alone(images, tmp_path_factory):
    decoder = _decoder("gpt2", tmp_path_factory)
    options = {"temperature": 1.5, "top_k": 0, "top_p": 0.95, "max_new_tokens": 8}
    state = torch.get_rng_state()
    first = [r.tokens for r in decoder.caption(images, "sample", seed=3, **options)]
    assert torch.equal(state, torch.get_rng_state())
    assert first == [r.tokens for r in decoder.caption(images, "sample", seed=3, **options)]
    assert first != [r.tokens for r in decoder.caption(images, "sample", seed=4, **options)]


@pytest.mark.parametrize("beta", [2.0, 0.0], ids=["magic", "contrastive-search"])
def test_magic_matches_the_step_by_step_reference(beta, images, tmp_path_factory):
    decoder = _decoder("gpt2", tmp_path_factory, torch.float64)
    decoder.clip.double()
    prompts = decoder.prompts(2, QUESTIONS[:2])
    job, features = _job(decoder, images[:2], prompts)
    options = {"top_k": 4, "alpha": 0.4, "beta": beta, "max_new_tokens": 6}
    cached = magic_search(job, **options)
    assert cached == magic_reference(job, **options)
    through_decoder = decoder.decode(features, prompts, "magic", **options)
    assert [group[0].tokens for group in through_decoder] == [tokens for tokens, _ in cached]


def test_clip_reranking_orders_the_returned_sequences_by_similarity(images, tmp_path_factory):
    decoder = _decoder("gpt2", tmp_path_factory)
    results = decoder.caption(
        images, "beam", num_beams=3, num_return_sequences=3, rerank="clip", max_new_tokens=6
    )
    for result in results:
        scores = [c.clip_score for c in result.candidates]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True) and result.clip_score == scores[0]
    with pytest.raises(ValueError, match="has no option 'num_beams'"):
        decoder.caption(images, "greedy", num_beams=3)


def test_token_limits_and_stop_strings(images, tmp_path_factory):
    decoder = _decoder("gpt2", tmp_path_factory)
    fixed = decoder.caption(images, "greedy", min_new_tokens=5, max_new_tokens=5)
    assert all(len(r.tokens) == 5 for r in fixed)
    text = decoder.caption(images[:1], "greedy", max_new_tokens=12)[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    stopped = decoder.caption(images[:1], "greedy", max_new_tokens=12, stop_strings=[stop])[0].text
    assert stop not in stopped and text.startswith(stopped)


def test_a_mismatched_backbone_is_refused_naming_both(exported, tmp_path):
    cases = {
        "vision": ("init_seed", 7, "weights_digest"),
        "llm": ("arch", {"width": 32, "layers": 2, "heads": 2}, "hidden_size"),
    }
    for part, (key, value, fact) in cases.items():
        copy = tmp_path / part
        shutil.copytree(exported, copy)
        manifest = json.loads((copy / MANIFEST_FILE).read_text())
        recorded = manifest["backbones"][part]["facts"][fact]
        manifest["backbones"][part]["config"][key] = value
        (copy / MANIFEST_FILE).write_text(json.dumps(manifest))
        with pytest.raises(ArtifactError, match=f"{part} backbone 'tiny'.*{fact}") as error:
            VisualDecoder.from_export(copy)
        assert repr(recorded) in str(error.value) and str(error.value).count(f"{fact}=") == 2


def test_unreadable_export_names_the_file(exported, tmp_path):
    with pytest.raises(ArtifactError, match="not an export directory"):
        VisualDecoder.from_export(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    (broken / ADAPTER_FILE).write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match=r"adapter\.safetensors: cannot read"):
        VisualDecoder.from_export(broken)
    (broken / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ArtifactError, match=r"vgtrain\.json: cannot read"):
        VisualDecoder.from_export(broken)


def test_bad_images_get_error_results_and_the_rest_are_captioned(exported, images, tmp_path):
    corrupt, truncated = tmp_path / "corrupt.png", tmp_path / "truncated.png"
    corrupt.write_bytes(b"\x89PNG not really")
    truncated.write_bytes(images[0].read_bytes()[:60])
    batch = [images[0], tmp_path / "missing.jpg", corrupt, images[1], truncated]
    decoder = VisualDecoder.from_export(exported)
    results = decoder.caption(batch, max_new_tokens=8)
    assert [r.ok for r in results] == [True, False, False, True, False]
    for result, path in zip(results, batch, strict=True):
        assert result.image == str(path) and (result.ok or result.error.startswith(str(path)))
    good = decoder.caption([images[0], images[1]], max_new_tokens=8)
    assert [results[0].text, results[3].text] == [r.text for r in good]


def test_caption_command_end_to_end(trained, images, tmp_path):
    exported = tmp_path / "export"
    result = run_vgtrain("export", str(trained.checkpoint), str(exported), cwd=tmp_path)
    assert result.returncode == 0 and exported.is_dir(), result.stderr
    folder = tmp_path / "imgs"
    folder.mkdir()
    for path in images[:2]:
        shutil.copy(path, folder)
    (tmp_path / "list.txt").write_text(f"# images\n{images[2]}\nmissing.png\n")
    expected = {
        str(p): r.text
        for p, r in zip(
            sorted(folder.iterdir()),
            VisualDecoder.from_export(exported).caption(sorted(folder.iterdir()), max_new_tokens=10),
            strict=True,
        )
    }

    run = run_vgtrain(
        "caption", "--export", str(exported), str(folder), "list.txt", "--max-new-tokens", "10", cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr
    lines = dict(line.split("\t", 1) for line in run.stdout.splitlines())
    assert len(lines) == 3 and all(lines[path] == text for path, text in expected.items())
    assert run.stderr.strip().splitlines() == [
        "vgtrain caption: error: missing.png: no such file"
    ]  # relative to list.txt

    beam = run_vgtrain(
        "caption", "--export", str(exported), str(folder), "--num-beams", "2", "--json", cwd=tmp_path
    )
    records = [json.loads(line) for line in beam.stdout.splitlines()]
    assert beam.returncode == 0 and len(records) == 2
    assert all(
        isinstance(r["score"], float) and isinstance(r["caption"], str) and r["error"] is None
        for r in records
    )


def test_caption_command_exits_nonzero_only_when_nothing_was_captioned(exported, images, tmp_path, capsys):
    assert caption_main(["--export", str(exported), str(tmp_path / "missing.png"), str(images[0])]) == 0
    assert caption_main(["--export", str(exported), str(tmp_path / "missing.png")]) == 1
    assert "missing.png: no such file" in capsys.readouterr().err
    assert caption_main(["--export", str(tmp_path / "nope"), str(images[0])]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]
    assert (
        caption_main(["--export", str(exported), str(images[0]), "--strategy", "greedy", "--num-beams", "2"])
        == 1
    )
    assert "has no option 'num_beams'" in capsys.readouterr().err
