"""The progress bar names no last epoch on a run counted in steps."""

from types import SimpleNamespace

import pytest

from vgtrain.training.progress import EpochAwareRichProgressBar


@pytest.mark.parametrize("max_epochs, expected", [(-1, "Epoch 7"), (None, "Epoch 7"), (10, "Epoch 7/9")])
def test_train_description(max_epochs, expected):
    bar = EpochAwareRichProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=max_epochs)
    assert bar._get_train_description(7).strip() == expected


def test_a_step_counted_run_through_the_cli_prints_no_negative_epoch(tmp_path):
    from tests.conftest import TINY_MODEL_OVERRIDES, run_vgtrain
    from vgtrain.data.synthetic import write_shapes_dataset

    write_shapes_dataset(tmp_path / "shapes", num_train=32, num_val=8, num_heldout=8, image_size=32,
                         samples_per_shard=16, progress=False)  # fmt: skip
    result = run_vgtrain(
        "train", *TINY_MODEL_OVERRIDES, f"paths.data_dir={tmp_path}", "logger=none", "evaluate.enabled=false",
        "data.cache_features=false", "data.num_workers=0", "data.batch_size=4", "trainer.max_steps=3",
        "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "data.synthetic.num_train=32",
        "data.synthetic.num_val=8", "data.synthetic.num_heldout=8", "data.synthetic.image_size=32",
        "data.synthetic.samples_per_shard=16", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Epoch 0" in result.stdout + result.stderr
    assert "/-" not in result.stdout + result.stderr
