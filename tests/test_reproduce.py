"""Runs made again from their records alone (``python -m core rerun``): the same top-1 when nothing changed,
exit 1 when a number moved, one line when an input is gone or changed."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from core.cli import main
from core.default_model import DEFAULT_MODEL_DIR, WEIGHTS_FILE
from core.errors import StudioError
from core.experiments import read_records, write_records
from core.models import load_checkpoint, save_safetensors
from core.reproduce import recorded_images, recorded_model
from core.workspace import checkpoint_label, open_workspace
from tests.test_workspace import image_folder, tiny_vim


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> Path:
    """Two small runs of a copy of the default model, logged by the quantize command."""
    root = tmp_path_factory.mktemp("rerun")
    weights = str(shutil.copy(DEFAULT_MODEL_DIR / WEIGHTS_FILE, root / "model.safetensors"))
    assert main(["quantize", weights, "--method", "ouromamba", "dynamic_per_token", "--setting", "W4A8",
                 "--limit", "30", "--n-calib", "4", "--recon-epochs", "1", "--error-images", "4",
                 "--out", str(root)]) == 0
    return root / "runs.json"


def test_a_run_made_again_gives_the_same_top1(logged: Path, capsys):
    capsys.readouterr()
    assert main(["rerun", str(logged), "--run", "1", "2"]) == 0
    printed = capsys.readouterr().out.splitlines()
    records = read_records(logged)
    assert [line.split(":")[0] for line in printed] == ["#1 ouromamba W4A8O8 real×4",
                                                        "#2 dynamic_per_token W4A8 real×4"]
    assert all(line.endswith(": the same") for line in printed)
    assert f"top-1 {records[0].top1:.2f} % recorded" in printed[0] and f"{records[0].top1:.2f} % now" in printed[0]
    assert records[0].checkpoint == checkpoint_label(logged.parent / "model.safetensors")


def test_a_number_that_moved_exits_1(logged: Path, tmp_path: Path, capsys):
    record = read_records(logged)[1]
    write_records([replace(record, top1=record.top1 + 1)], tmp_path, "edited")
    assert main(["rerun", str(tmp_path / "edited.json")]) == 1  # the newest (only) run by default
    assert "DIFFERENT: -1.00 points" in capsys.readouterr().out


def test_changed_or_missing_inputs_are_one_line(logged: Path, tmp_path: Path, capsys):
    record = read_records(logged)[1]
    copy = shutil.copy(logged.parent / "model.safetensors", tmp_path / "model.safetensors")
    changed = replace(record, checkpoint=checkpoint_label(Path(copy)))
    Path(copy).write_bytes(Path(copy).read_bytes()[:-1] + b"\x00")
    with pytest.raises(StudioError, match="changed since the run"):
        recorded_model(changed)
    with pytest.raises(StudioError, match="is not there any more"):
        recorded_model(replace(record, checkpoint=f"{tmp_path / 'gone.safetensors'} (sha256 0123456789ab)"))
    model = load_checkpoint(logged.parent / "model.safetensors")
    with pytest.raises(StudioError, match=r"an archive \(uploaded my_val.zip\) that is not kept"):
        recorded_images(replace(record, data="image archive uploaded my_val.zip (3 classes)"), model)
    with pytest.raises(StudioError, match="has 10,000 images now, the run used 20,000"):
        recorded_images(replace(record, test_images=20_000), model)
    assert main(["rerun", str(logged), "--run", "3"]) == 2
    assert "--run 3: the file holds runs #1 to #2" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("")
    assert main(["rerun", str(tmp_path / "empty.jsonl")]) == 2


def test_images_from_a_folder_are_read_again(logged: Path, tmp_path: Path):
    """The app's other models score a folder of images: the record's words find the same images."""
    folder = image_folder(tmp_path / "data")
    workspace = open_workspace(save_safetensors(tiny_vim(), tmp_path / "tiny.safetensors"), folder)
    record = replace(read_records(logged)[0], data=workspace.data.source, test_images=7)
    images = recorded_images(record, workspace.model)
    assert images.source == workspace.data.source and len(images) == 7
    assert (images.images == workspace.data.images[:7]).all()
    assert images.labels.tolist() == workspace.data.labels[:7].tolist()
