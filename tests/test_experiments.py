"""Calibration sources, run records and the quantize command line."""

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from core.cli import main
from core.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, calibration_images, load_fashion_mnist
from core.data.fashion_mnist import VALIDATION_SIZE
from core.errors import StudioError
from core.experiments import RunRecord, read_records, write_records


def test_real_and_noise_sets_are_seeded_and_shaped():
    real = calibration_images("real", 6, seed=3)
    assert real.shape == (6, 1, 28, 28) and torch.equal(real, calibration_images("real", 6, seed=3))
    assert not torch.equal(real, calibration_images("real", 6, seed=4))
    # each is a training image, normalized, from before the held-out validation images
    train = load_fashion_mnist("train")
    pool = train.images[:len(train) - VALIDATION_SIZE].flatten(1)
    pixels = torch.round((real * FASHION_MNIST_STD + FASHION_MNIST_MEAN) * 255).to(torch.uint8).flatten(1)
    assert all((pool == image).all(1).any() for image in pixels)
    noise = calibration_images("noise", 4, seed=0)
    assert noise.shape == (4, 1, 28, 28) and torch.equal(noise, calibration_images("noise", 4, seed=0))


def test_folder_source_and_its_errors(tmp_path: Path):
    for i in range(3):
        Image.new("RGB", (40 + i, 30), (i * 50, 100, 200)).save(tmp_path / f"im{i}.png")
    images = calibration_images(str(tmp_path), 2, seed=0)
    assert images.shape == (2, 1, 28, 28)
    # one colour each: its grey level (ITU-R 601-2, as PIL converts), normalized as Fashion-MNIST
    grey = [round((i * 50 * 299 + 100 * 587 + 200 * 114) / 1000) for i in range(3)]
    for image in images:
        level = image.flatten()[0] * FASHION_MNIST_STD + FASHION_MNIST_MEAN
        assert torch.equal(image, torch.full_like(image, image.flatten()[0]))
        assert min(abs(float(level) * 255 - g) for g in grey) < 1e-3
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(StudioError, match="not a readable image"):
        calibration_images(str(tmp_path), 4, seed=0)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StudioError, match="no images"):
        calibration_images(str(empty), 1, seed=0)
    with pytest.raises(StudioError, match="neither 'real', 'noise' nor a folder"):
        calibration_images("imagenet", 1, seed=0)
    with pytest.raises(StudioError, match="at least 1 image"):
        calibration_images("noise", 0, seed=0)
    with pytest.raises(StudioError, match="the seed must be a whole number from 0"):
        calibration_images("noise", 1, seed=2**64)


def test_quantize_command_writes_records_with_provenance(tmp_path: Path, capsys):
    code = main(["quantize", "--method", "ptq4vm", "dynamic_per_token", "--setting", "W8A8", "--limit", "40",
                 "--n-calib", "8", "--recon-epochs", "0", "--out", str(tmp_path), "--name", "runs"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| ptq4vm |" in out and "| dynamic_per_token |" in out
    records = json.loads((tmp_path / "runs.json").read_text())
    assert [r["method"] for r in records] == ["ptq4vm", "dynamic_per_token"]
    first = records[0]
    assert first["calibration"] == {"source": "real", "images": 8, "seed": 0}
    assert first["test_images"] == 40 and 0 <= first["top1"] <= 100
    assert first["config"]["w_bits"] == 8 and "torch" in first["versions"] and first["date"]
    assert (tmp_path / "runs.csv").read_text().count("\n") == 3
    # every quantizer's SQNR on the first 32 scored images, in forward order; at 8 bits most sit near 8-bit
    # levels (~30 dB), out_proj's input far below (its outlier channels set every token's static scale)
    errors = first["site_errors"]
    assert errors["images"] == 32 and len(errors["rows"]) == 4 * 22  # the default model: 22 sites a layer
    assert errors["rows"][0]["site"] == "layers.0.in_proj.input" and all(r["bits"] == 8 for r in errors["rows"])
    sqnr = {r["site"]: r["sqnr_db"] for r in errors["rows"]}
    assert sorted(sqnr.values())[len(sqnr) // 2] > 25 and sqnr["layers.0.out_proj.input"] < 20
    assert all(0.9 < r["cosine"] <= 1 and r["cosine_vs_fp_model"] <= 1 for r in errors["rows"])


def test_quantize_command_can_reflect_scales_and_records_it(tmp_path: Path, capsys):
    """--reflect-scales reaches the reconstruction and the record (which `rerun` rebuilds the run from); without
    it the record says False, as every run before the option."""
    for name, flag in (("reflected", ["--reflect-scales"]), ("plain", [])):
        assert main(["quantize", "--setting", "W4A4", "--limit", "20", "--n-calib", "8", "--recon-epochs", "1",
                     *flag, "--out", str(tmp_path), "--name", name]) == 0
    capsys.readouterr()
    reflected, plain = (json.loads((tmp_path / f"{name}.json").read_text())[0] for name in ("reflected", "plain"))
    assert reflected["config"]["reconstruction"]["reflect_scales"] is True
    assert plain["config"]["reconstruction"]["reflect_scales"] is False


def test_quantize_command_can_score_on_the_held_out_validation_images(tmp_path: Path, capsys):
    """--eval-split val: the records say which images scored them, and they are not the test images."""
    args = ["quantize", "--method", "per_tensor", "--setting", "W8A8", "--limit", "30", "--n-calib", "4",
            "--recon-epochs", "0", "--out", str(tmp_path)]
    assert main([*args, "--eval-split", "val", "--name", "val", "--error-images", "0"]) == 0
    assert "images of fashion-mnist/train[55000:], validation" in capsys.readouterr().out
    assert main([*args, "--name", "test"]) == 0
    val, test = (json.loads((tmp_path / f"{name}.json").read_text())[0] for name in ("val", "test"))
    assert "train[55000:], validation" in val["data"] and "test" in test["data"] and "train" not in test["data"]
    assert val["test_images"] == test["test_images"] == 30
    assert val["site_errors"] == {} and test["site_errors"]["images"] == 30  # no more than were scored


def test_quantize_command_bad_input_is_one_line(capsys):
    assert main(["quantize", "--w-bits", "0", "--limit", "5", "--n-calib", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "w_bits must be" in err
    assert main(["quantize", "--error-images", "-1", "--limit", "5", "--n-calib", "2"]) == 2
    assert "argument --error-images: must be a whole number ≥ 0, got -1" in capsys.readouterr().err
    assert main(["quantize", "--overrides", "{oops", "--limit", "5"]) == 2
    assert "overrides are not valid JSON" in capsys.readouterr().err.strip().splitlines()[-1]
    assert main(["quantize", "--overrides", '{"layers.9.*": {"w_bits": 8}}', "--limit", "5", "--n-calib", "2",
                 "--recon-epochs", "0"]) == 2
    assert "override 'layers.9.*' matches no site of this model" in capsys.readouterr().err
    assert main(["quantize", "--overrides", '{"*": {"skip": true}}', "--limit", "5", "--n-calib", "2"]) == 2
    assert "the overrides skip every quantizer" in capsys.readouterr().err  # not a record of the FP model as W4A4
    assert main(["quantize", "--seed", str(10**23), "--limit", "5", "--n-calib", "2"]) == 2
    assert "the seed must be a whole number from 0 to 4,294,967,295" in capsys.readouterr().err


def test_quantize_command_applies_per_site_overrides(tmp_path: Path, capsys):
    """The out_proj inputs at 8 bits: their records say so, and their SQNR is an 8-bit one (the rest stay 4-bit)."""
    assert main(["quantize", "--method", "ptq4vm", "--setting", "W4A4", "--limit", "30", "--n-calib", "4",
                 "--recon-epochs", "0", "--overrides", '{"*.out_proj.input": {"a_bits": 8}}', "--out",
                 str(tmp_path)]) == 0
    record = json.loads((tmp_path / "runs.json").read_text())[0]
    assert record["config"]["overrides"] == {"*.out_proj.input": {"a_bits": 8}}
    bits = {row["site"]: row["bits"] for row in record["site_errors"]["rows"]}
    assert {site for site, b in bits.items() if b == 8} == {f"layers.{i}.out_proj.input" for i in range(4)}


def test_outliers_command_writes_per_site_statistics(tmp_path: Path, capsys):
    out = tmp_path / "stats.csv"
    assert main(["outliers", "--images", "8", "--n-calib", "8", "--out", str(out), "--top", "3"]) == 0
    import pandas as pd
    frame = pd.read_csv(out, comment="#")
    assert len(frame) == 4 * (2 + 2 * 5)  # per layer: in/out_proj inputs + per direction x/dt_proj, Δ, B, C
    assert (frame["olist_size"] >= frame["outlier_channels_per_token"]).all()
    assert "sites →" in capsys.readouterr().out


def test_cuda_graph_timing_refuses_the_cpu_clearly():
    import pytest
    import torch

    from core.errors import StudioError
    from core.eval import time_forward
    with pytest.raises(StudioError, match="CUDA graphs need a CUDA device"):
        time_forward(torch.nn.Identity(), torch.zeros(2, 3), cuda_graph=True)


def test_the_threshold_sweep_needs_the_per_time_step_rule():
    from core.default_model import load_default_model
    from core.experiments import threshold_sweep
    from core.quant import QuantConfig
    model, _ = load_default_model()
    with pytest.raises(StudioError, match="method 'ptq4vm' has none"):
        threshold_sweep(model, QuantConfig(method="ptq4vm"), torch.zeros(1, 1, 28, 28), None, [3.0], [10], 90.0)


def test_tables_keep_runs_with_other_overrides_apart():
    from core.experiments import RunRecord, accuracy_table, run_name
    fields = {"model": "m", "method": "ptq4vm", "setting": "W4A4", "calibration": {"source": "real", "images": 8,
              "seed": 0}, "top1": 80.0, "fp_top1": 90.0, "delta_vs_fp": -10.0, "test_images": 10,
              "calibration_seconds": 1.0, "eval_seconds": 1.0, "hardware": "CPU", "config": {"overrides": {}}}
    plain = RunRecord.from_dict(fields)
    raised = RunRecord.from_dict({**fields, "top1": 89.0, "config": {"overrides": {"*.out_proj.input": {"a_bits": 8}}}})
    assert run_name(plain) == "ptq4vm" and run_name(raised) == 'ptq4vm + {"*.out_proj.input":{"a_bits":8}}'
    rows = accuracy_table([plain, raised]).splitlines()[2:]
    assert rows == ["| ptq4vm | 80.00 (-10.00) |", '| ptq4vm + {"*.out_proj.input":{"a_bits":8}} | 89.00 (-10.00) |']
    # runs that would share a cell get rows of their own, named by what differs (it used to keep the last one)
    noise = RunRecord.from_dict({**fields, "top1": 70.0, "calibration": {"source": "noise", "images": 8, "seed": 1}})
    assert accuracy_table([plain, noise]).splitlines()[2:] == [
        "| ptq4vm (real × 8, seed 0) | 80.00 (-10.00) |", "| ptq4vm (noise × 8, seed 1) | 70.00 (-10.00) |"]
    bigger = RunRecord.from_dict({**fields, "test_images": 300})
    assert "| ptq4vm (300 images of test images) | 80.00 (-10.00) |" in accuracy_table([plain, bigger])
    assert accuracy_table([plain, plain]).splitlines()[2:] == ["| #1 ptq4vm | 80.00 (-10.00) |",
                                                               "| #2 ptq4vm | 80.00 (-10.00) |"]
    with pytest.raises(StudioError, match="run record: top1 = 'x' .expected float."):
        RunRecord.from_dict({**fields, "top1": "x"})


def test_writing_no_runs_or_one_run_not_in_a_list_is_one_line(tmp_path: Path):
    from core.experiments import read_records, write_records
    from core.report import write_report
    record = read_records(Path(__file__).resolve().parent.parent / "results" / "quant" / "real128_W4A4.json")[0]
    with pytest.raises(StudioError, match="no runs to write"):
        write_records([], tmp_path, "runs")
    with pytest.raises(StudioError, match="write_report takes a list of RunRecords .* got RunRecord"):
        write_report(record, tmp_path / "report.html")
    assert write_report([record], tmp_path / "report.html").is_file()


def test_the_lowest_site_counts_minus_infinity_and_skips_exact_and_unmeasured_ones():
    import math

    import pandas as pd

    from core.experiments import lowest_site
    frame = pd.DataFrame({"site": ["a", "b", "c", "d"], "sqnr_db": [12.0, math.inf, math.nan, 3.0]}, index=[5, 5, 6, 6])
    assert lowest_site(frame)["site"] == "d"  # an index with repeats: positions, not labels
    frame.loc[frame["site"] == "a", "sqnr_db"] = -math.inf
    assert lowest_site(frame)["site"] == "a"
    assert lowest_site(frame.assign(sqnr_db=[math.inf, math.nan, math.inf, math.nan])) is None


def test_records_written_after_every_run_survive_an_interrupted_write(tmp_path: Path, monkeypatch):
    """The quantize command rewrites its .csv/.json after every run; a Ctrl-C or a full disk in the middle of
    the write truncated the file and lost the runs before it. Now the previous file stays whole."""
    first = [RunRecord(model="m", method="ouromamba", setting="W4A4", calibration={}, top1=1.0, fp_top1=2.0,
                       delta_vs_fp=-1.0, test_images=1, calibration_seconds=0.0, eval_seconds=0.0, hardware="CPU",
                       config={}, reconstruction=[], versions={}, date="2026-01-01")]
    csv_path, json_path = write_records(first, tmp_path, "runs")
    before = csv_path.read_text(), json_path.read_text()

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_records([*first, replace(first[0], method="ptq4vm")], tmp_path, "runs")
    assert (csv_path.read_text(), json_path.read_text()) == before
    assert read_records(json_path) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.csv", "runs.json"]  # no partial file left
