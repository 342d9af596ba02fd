"""`vgtrain export`: what the artifact holds, what it leaves out, and what it refuses."""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY_LLM, run_vgtrain
from tests.tiny_checkpoints import Trained, tiny_llama_folder, train_tiny
from vgtrain.cli.export import main as export_main
from vgtrain.decode import VisualDecoder
from vgtrain.export.artifact import ADAPTER_FILE, MANIFEST_FILE, ArtifactError, config_digest
from vgtrain.export.writer import ExportError, export_checkpoint


@pytest.fixture(scope="module")
def frozen_llm(shapes_dir, tmp_path_factory) -> Trained:
    return train_tiny(tmp_path_factory.getbasetemp(), shapes_dir, "frozen")


@pytest.fixture(scope="module")
def trained_llm(shapes_dir, tmp_path_factory) -> Trained:
    return train_tiny(
        tmp_path_factory.getbasetemp(),
        shapes_dir,
        "trained-llm",
        llm={**TINY_LLM, "trainable": True},
        prompt="a picture of",
        steps=4,
    )


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_files_follow_the_umask(frozen_llm, tmp_path, umask):
    """A teammate can read an export in a shared folder: no private mode from the staging files."""
    previous = os.umask(umask)
    try:
        out = export_checkpoint(frozen_llm.checkpoint, tmp_path / "export")
    finally:
        os.umask(previous)
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*")}
    assert modes[ADAPTER_FILE] == 0o666 & ~umask
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    for name, mode in modes.items():
        assert mode == (0o777 if (out / name).is_dir() else 0o666) & ~umask, name


def test_export_holds_the_adapter_only_and_describes_it(frozen_llm, tmp_path):
    out = export_checkpoint(frozen_llm.checkpoint, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", ADAPTER_FILE, "tokenizer", MANIFEST_FILE]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], (
        "a staging directory was left behind"
    )
    tensors = load_file(out / ADAPTER_FILE)
    assert tensors and all(key.startswith("mapper.") for key in tensors)  # no vision, no frozen LLM tensors
    model = frozen_llm.module.model
    for key, value in tensors.items():
        assert torch.equal(value, model.state_dict()[key]), key

    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["format_version"] == 1
    assert manifest["backbones"]["vision"]["registry_name"] == "tiny"
    assert (
        manifest["backbones"]["vision"]["facts"]["weights_digest"]
        == model.vision.describe()["weights_digest"]
    )
    assert manifest["backbones"]["llm"]["facts"]["weights_digest"] == model.llm.describe()["weights_digest"]
    assert manifest["backbones"]["llm"]["source"] == "random-init(seed=0)"
    assert manifest["prefix_length"] == model.prefix_length and manifest["mapper"]["name"] == "transformer"
    hparams = torch.load(frozen_llm.checkpoint, weights_only=True)["hyper_parameters"]
    assert manifest["training_config"]["digest"] == config_digest(hparams)
    assert manifest["tokenizer"]["size"] == len(model.llm.tokenizer)
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert "transformer" in (out / "README.md").read_text()
    assert sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) < 50e6


def test_trained_llm_is_exported_with_tied_weights_stored_once(trained_llm, tmp_path):
    out = export_checkpoint(trained_llm.checkpoint, tmp_path / "export")
    tensors = load_file(out / ADAPTER_FILE)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["adapter"]["tied_aliases"] == {
        "llm.model.lm_head.weight": "llm.model.transformer.wte.weight"
    }
    assert "llm.model.transformer.wte.weight" in tensors and "llm.model.lm_head.weight" not in tensors
    assert not any(key.startswith("vision.") for key in tensors)
    assert manifest["prompt"] == "a picture of"
    assert "weights_digest" not in manifest["backbones"]["llm"]["facts"]  # trained: its weights are here

    decoder = VisualDecoder.from_export(out)
    for key, value in trained_llm.module.model.state_dict().items():
        assert torch.equal(value, decoder.model.state_dict()[key]), key
    llm = decoder.model.llm.model
    assert llm.lm_head.weight.data_ptr() == llm.transformer.wte.weight.data_ptr()  # still tied

    # A checkpoint that kept the tied tensor under one name only (older vgtrain) exports the same.
    checkpoint = torch.load(trained_llm.checkpoint, weights_only=True)
    del checkpoint["state_dict"]["model.llm.model.lm_head.weight"]
    torch.save(checkpoint, tmp_path / "one_name.ckpt")
    again = export_checkpoint(tmp_path / "one_name.ckpt", tmp_path / "again")
    assert load_file(again / ADAPTER_FILE).keys() == tensors.keys()


def test_checkpoint_whose_adapter_does_not_match_its_config_is_refused(frozen_llm, tmp_path):
    checkpoint = torch.load(frozen_llm.checkpoint, weights_only=True)
    checkpoint["hyper_parameters"]["mapper"] = {**checkpoint["hyper_parameters"]["mapper"], "width": 32}
    torch.save(checkpoint, tmp_path / "tampered.ckpt")
    with pytest.raises(ExportError, match=r"tampered\.ckpt.*do not match.*mapper\.") as error:
        export_checkpoint(tmp_path / "tampered.ckpt", tmp_path / "export")
    assert "(64," in str(error.value) and "(32," in str(error.value)  # both shapes named
    assert not (tmp_path / "export").exists()

    checkpoint["hyper_parameters"]["mapper"]["width"] = 64
    checkpoint["state_dict"].pop(next(iter(checkpoint["state_dict"])))
    torch.save(checkpoint, tmp_path / "missing.ckpt")
    with pytest.raises(ExportError, match="missing"):
        export_checkpoint(tmp_path / "missing.ckpt", tmp_path / "export")


def test_unreadable_checkpoint_and_occupied_target_give_one_line_errors(frozen_llm, tmp_path, capsys):
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    assert export_main([str(tmp_path / "junk.ckpt"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "junk.ckpt" in err and len(err.strip().splitlines()) == 1
    assert export_main([str(tmp_path / "absent.ckpt"), str(tmp_path / "out")]) == 1
    assert "absent.ckpt: no such checkpoint" in capsys.readouterr().err

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    assert export_main([str(frozen_llm.checkpoint), str(occupied)]) == 1
    assert "--overwrite" in capsys.readouterr().err and (occupied / "keep.txt").is_file()
    assert export_main([str(frozen_llm.checkpoint), str(occupied), "--overwrite"]) == 0
    assert not (occupied / "keep.txt").exists() and (occupied / ADAPTER_FILE).is_file()


def test_local_llm_folder_is_recorded_by_digest_and_bundled_on_request(
    shapes_dir, tmp_path, tmp_path_factory
):
    folder = tiny_llama_folder(tmp_path)
    trained = train_tiny(
        tmp_path_factory.getbasetemp(),
        shapes_dir,
        "llama",
        llm={"name": "smollm2_135m_hub", "path": str(folder)},
        steps=4,
    )
    referenced = export_checkpoint(trained.checkpoint, tmp_path / "referenced")
    bundled = export_checkpoint(trained.checkpoint, tmp_path / "bundled", bundle_backbones=True)
    record = json.loads((referenced / MANIFEST_FILE).read_text())["backbones"]["llm"]["files"]["path"]
    assert (
        record["path"] == str(folder.resolve()) and record["bundled"] is None and len(record["sha256"]) == 64
    )
    bundled_record = json.loads((bundled / MANIFEST_FILE).read_text())["backbones"]["llm"]["files"]["path"]
    assert (
        bundled_record["sha256"] == record["sha256"]
        and (bundled / bundled_record["bundled"] / "config.json").is_file()
    )
    assert all(key.startswith("mapper.") for key in load_file(bundled / ADAPTER_FILE))

    expected = VisualDecoder.from_export(referenced).caption([_an_image(tmp_path)], max_new_tokens=6)[0].text
    moved = tmp_path / "elsewhere"
    shutil.move(str(bundled), moved)
    shutil.rmtree(folder)  # the original backbone is gone: only the bundled copy remains
    assert (
        VisualDecoder.from_export(moved).caption([_an_image(tmp_path)], max_new_tokens=6)[0].text == expected
    )
    with pytest.raises(ArtifactError, match=r"tiny-llama.*does not exist.*--bundle-backbones"):
        VisualDecoder.from_export(referenced)


def test_local_vision_checkpoint_is_bundled_and_verified(frozen_llm, tmp_path):
    import open_clip

    from vgtrain.models.backbones.registry import _register_tiny_open_clip

    checkpoint = torch.load(frozen_llm.checkpoint, weights_only=True)
    vision = checkpoint["hyper_parameters"]["vision"]
    with torch.random.fork_rng(devices=[]):  # the same weights the random tiny entry builds
        torch.manual_seed(vision.get("init_seed", 0))
        clip = open_clip.create_model(_register_tiny_open_clip(vision["arch"]))
    torch.save(clip.state_dict(), tmp_path / "tiny_clip.pt")
    checkpoint["hyper_parameters"]["vision"] = {**vision, "pretrained": str(tmp_path / "tiny_clip.pt")}
    torch.save(checkpoint, tmp_path / "local_vision.ckpt")

    out = export_checkpoint(tmp_path / "local_vision.ckpt", tmp_path / "export", bundle_backbones=True)
    record = json.loads((out / MANIFEST_FILE).read_text())["backbones"]["vision"]["files"]["pretrained"]
    assert (
        record["bundled"] == "backbones/vision/pretrained/tiny_clip.pt"
        and (out / record["bundled"]).is_file()
    )
    (tmp_path / "tiny_clip.pt").unlink()
    decoder = VisualDecoder.from_export(out)
    assert decoder.model.vision.source.endswith("backbones/vision/pretrained/tiny_clip.pt")

    torch.save({k: v + 1 for k, v in clip.state_dict().items()}, out / record["bundled"])
    with pytest.raises(ArtifactError, match=r"vision backbone file .*tiny_clip\.pt has changed since export"):
        VisualDecoder.from_export(out)


def test_export_and_decoder_do_not_import_the_training_stack():
    code = (
        "import sys, vgtrain.export.writer, vgtrain.decode, vgtrain.cli.caption;"
        "bad = [m for m in ('lightning', 'hydra', 'wandb', 'webdataset') if m in sys.modules];"
        "assert not bad, bad"
    )
    import subprocess

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def _an_image(root: Path) -> Path:
    from PIL import Image

    path = root / "image.png"
    if not path.exists():
        Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
    return path


def test_export_is_logged_as_a_wandb_model_artifact(frozen_llm, tmp_path):
    # Through the CLI in its own process: wandb's log is flushed for certain once that has exited.
    out = tmp_path / "demo-export"
    command = [str(frozen_llm.checkpoint), str(out), "--wandb-artifact", "--wandb-project", "t"]
    result = run_vgtrain("export", *command, "--wandb-dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wandb artifact: t/demo-export" in result.stdout
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    records = b"".join(f.read_bytes() for f in run.rglob("*.wandb"))
    # The artifact lists the export's files, and the manifest travels as its metadata.
    assert b"demo-export" in records and ADAPTER_FILE.encode() in records and b"weights_digest" in records
