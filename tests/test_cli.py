"""The CLI explains bad input in one line and exits with 2."""

import csv
import json
from pathlib import Path

import pytest

from core.cli import main
from core.experiments import append_record, read_records
from core.report import accuracy_figure


def test_bad_checkpoint_is_one_line(tmp_path: Path, capsys):
    (tmp_path / "junk.pth").write_bytes(b"\x00garbage")
    assert main(["info", str(tmp_path / "junk.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not a readable checkpoint" in err and "\n" not in err


def test_info_on_default_model(capsys):
    assert main(["info"]) == 0
    assert '"seq_len": 50' in capsys.readouterr().out


def test_eval_subset(capsys):
    """Batches of 7 over 20 images (the last one short): the printed count is the model's own argmax over the
    first 20 test images, in one batch."""
    import torch

    from core.data import load_fashion_mnist
    from core.default_model import load_default_model
    assert main(["eval", "--limit", "20", "--batch-size", "7"]) == 0
    printed = json.loads(capsys.readouterr().out)
    test = load_fashion_mnist("test")
    with torch.no_grad():
        correct = int((load_default_model()[0](test.normalized(0, 20)).argmax(-1) == test.labels[:20]).sum())
    assert printed["total"] == 20 and printed["correct"] == correct
    assert printed["top1"] == pytest.approx(100 * correct / 20)


def test_generate_saves_a_set_and_counts_hits_only_where_there_are_targets(tmp_path: Path, capsys):
    assert main(["generate", "--source", "output_only", "--count", "2", "--iterations", "1", "--seed", "5",
                 "--out", str(tmp_path / "gen")]) == 0
    printed = capsys.readouterr().out
    assert "2 output_only images in" in printed and "FP prediction = target for " in printed and " of 2;" in printed
    manifest = json.loads((tmp_path / "gen" / "manifest.json").read_text())
    assert manifest["config"]["seed"] == 5 and manifest["config"]["iterations"] == 1
    assert main(["generate", "--source", "noise", "--count", "3", "--out", str(tmp_path / "noise")]) == 0
    printed = capsys.readouterr().out  # noise has no target classes: no hits to count
    assert "3 noise images in" in printed and "target" not in printed and "mean FP confidence" in printed
    assert len(list((tmp_path / "noise").glob("*.png"))) == 3


def test_missing_data_directory(tmp_path: Path, capsys):
    assert main(["eval", "--data", str(tmp_path), "--limit", "5"]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_pack_writes_a_model_that_loads_and_reports_agreement(tmp_path: Path, capsys):
    from core.quant.packed import load_packed
    out = tmp_path / "w4a8.safetensors"
    assert main(["pack", "--setting", "W4A8", "--n-calib", "8", "--recon-epochs", "0", "--check", "20",
                 "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert report["images"] == 20 and report["agreement"] >= 95.0
    packed = load_packed(out)
    assert (packed.config.w_bits, packed.config.a_bits) == (4, 8)
    assert packed.provenance["calibration"] == {"source": "real", "images": 8, "seed": 0}


def test_pack_refuses_what_it_cannot_read(tmp_path: Path, capsys):
    assert main(["pack", "--calib", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "neither 'real', 'noise' nor a folder" in capsys.readouterr().err


def test_sweep_trades_accuracy_for_eight_bit_channels_on_validation_images(tmp_path: Path, capsys):
    """k × n_refresh, scored on held-out training images (never the test set), with what each point costs:
    a lower k keeps more channels at 8 bits; the files carry the points and how to rerun them."""
    out = tmp_path / "sweep"
    assert main(["sweep", "--k", "2", "5", "--n-refresh", "10", "25", "--val", "200", "--n-calib", "8",
                 "--outlier-images", "32", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "validation images" in printed and sum(line.startswith("| ") for line in printed.splitlines()) == 5
    with out.with_suffix(".csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(row["k"], row["n_refresh"]) for row in rows] == [("2.0", "10"), ("2.0", "25"), ("5.0", "10"),
                                                              ("5.0", "25")]
    share = {(row["k"], row["n_refresh"]): float(row["outlier_share_pct"]) for row in rows}
    assert share["2.0", "10"] > 3 * share["5.0", "10"] > 0
    assert all(float(row["olist_share_pct"]) >= float(row["outlier_share_pct"]) for row in rows)
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["images"].startswith("fashion-mnist/train[55000:], validation") and len(record["points"]) == 4
    assert record["command"].startswith("python -m core sweep ") and "--val 200" in record["command"]
    assert record["base_config"]["method"] == "ouromamba" and record["calibration"]["images"] == 8


def test_sweep_refuses_a_knob_out_of_range(tmp_path: Path, capsys):
    assert main(["sweep", "--k", "0", "3", "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: argument --k: must be a finite number > 0, got 0 (see python -m core sweep --help)"
    assert not (tmp_path / "never.csv").exists()


def test_sweep_refuses_a_model_that_does_not_read_fashion_mnist(tmp_path: Path, capsys):
    from core.models import create_vim, save_safetensors
    other = save_safetensors(create_vim("vim_fmnist_patch4_28_midclstok", img_size=32, in_chans=3, num_classes=3,
                                        embed_dim=16, depth=1), tmp_path / "rgb.safetensors")
    assert main(["sweep", str(other), "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err.strip()
    assert "Fashion-MNIST's validation images" in err and "32×32, 3 channels, 3 classes" in err and "\n" not in err


def test_outliers_writes_per_site_statistics_with_what_the_outliers_buy(tmp_path: Path, capsys):
    out = tmp_path / "stats.csv"
    assert main(["outliers", "--n-calib", "8", "--images", "16", "--top", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "48 sites →" in printed and "statistics on the first 16 test images" in printed
    with out.open() as f:  # provenance first, as '#' lines
        provenance = [f.readline() for _ in range(3)]
        rows = list(csv.DictReader(f))
    assert provenance[0].startswith("# ") and "(sha256 " in provenance[0] and "seed 0" in provenance[1]
    assert len(rows) == 48 and {"sqnr_db", "sqnr_db_without_outliers", "growing_steps_per_window"} <= set(rows[0])
    x_proj = [row for row in rows if row["tensor"] == "x_proj.input"]
    assert all(float(row["sqnr_db"]) > float(row["sqnr_db_without_outliers"]) + 3 for row in x_proj)


def test_report_makes_one_html_page_from_the_quantize_records_and_the_apps_log(tmp_path: Path, capsys):
    results = Path(__file__).resolve().parent.parent / "results" / "quant"
    arrays = [results / "real128_W4A4.json", results / "real128_W8A8.json"]
    log = tmp_path / "runs.jsonl"
    append_record(read_records(arrays[0])[0], log)
    out = tmp_path / "shared" / "report.html"
    assert main(["report", *map(str, arrays), str(log), "--out", str(out), "--title", "W4A4 <vs> W8A8"]) == 0
    printed = capsys.readouterr().out
    runs = len(read_records(arrays[0])) + len(read_records(arrays[1])) + 1
    assert f"{runs} run(s) → {out}" in printed and "| method | W4A4 | W8A8 |" in printed
    page = out.read_text()
    assert "<title>W4A4 &lt;vs&gt; W8A8</title>" in page and f"<p>{runs} run(s)." in page
    assert page.count("<tr") == runs + 1  # a row per run under the header
    for bad, message in ((tmp_path / "none.json", "does not exist: give a file of run records"),
                         (results / "outlier_stats_default_model.csv", "is not a run record"),
                         (results / "real128_W4A4.csv", "is not a run record")):
        assert main(["report", str(bad), "--out", str(tmp_path / "x.html")]) == 2
        assert message in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("")
    assert main(["report", str(tmp_path / "empty.jsonl")]) == 2
    assert "hold no runs" in capsys.readouterr().err


def test_report_keeps_runs_scored_on_other_images_apart(tmp_path: Path, capsys):
    """A validation run and a test run of the same method and setting: two rows and two series, never one."""
    results = Path(__file__).resolve().parent.parent / "results" / "gen"
    files = [results / "quant_ouromamba_1000it.json", results / "validation" / "val_ouromamba_1000it.json"]
    out = tmp_path / "report.html"
    assert main(["report", *map(str, files), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| ouromamba on fashion-mnist/test | 83.08 (-5.86) | 88.62 (-0.32) |" in printed
    assert "| ouromamba on fashion-mnist/train[55000:], validation | 83.04 (-6.16) | – |" in printed
    assert out.is_file()
    figure = accuracy_figure([record for path in files for record in read_records(path)])
    assert [trace.name for trace in figure.data] == ["ouromamba O8 on fashion-mnist/test",
                                                      "ouromamba O8 on fashion-mnist/train[55000:], validation"]
    assert "5000 images of fashion-mnist/train[55000:], validation" in figure.data[1].text[0]


QUICK = ["--limit", "5", "--n-calib", "2", "--recon-epochs", "0", "--error-images", "0"]


def test_quantize_never_overwrites_earlier_records(tmp_path: Path, capsys):
    run = ["quantize", "--method", "dynamic_per_token", "--setting", "W8A8", *QUICK, "--out", str(tmp_path),
           "--outlier-bits", "16", "--k", "2"]
    assert main(run) == 0
    assert main(run) == 2  # the same name again: refused before any work, the first run kept
    assert "already holds runs: --append adds to them" in capsys.readouterr().err
    assert main([*run, "--append"]) == 0
    assert "(1 earlier run(s) kept)" in capsys.readouterr().out
    records = read_records(tmp_path / "runs.json")
    assert [r.setting for r in records] == ["W8A8", "W8A8"]
    # the outlier rule's options are for the methods with outlier channels: this record keeps the defaults
    assert (records[0].config["o_bits"], records[0].config["k"]) == (8, 3.0)


@pytest.mark.parametrize(("argv", "message"), [
    (["eval", "--limit", "-1"], "argument --limit: must be a whole number ≥ 1, got -1"),
    (["eval", "--limit", "0"], "argument --limit: must be a whole number ≥ 1, got 0"),
    (["pack", "--check", "-1", "--out", "x.safetensors"], "argument --check: must be a whole number ≥ 0, got -1"),
    (["quantize", "--k", "nan"], "argument --k: must be a finite number > 0, got nan"),
    (["generate", "--lr", "inf", "--out", "x"], "argument --lr: must be a finite number > 0, got inf"),
    (["generate", "--output-weight", "nan", "--out", "x"], "argument --output-weight: must be a finite number ≥ 0"),
    (["info", "--img-size", "100000"], "the image size must be from 1 to 2048 pixels, got 100000"),
    (["quantize", *QUICK, "--calib", ""], "the calibration source is empty"),
    (["quantize", "--calib", "noise", "--n-calib", "100000000"], "at most 684,784 (the paper calibrates on 128)"),
    (["quantize", *QUICK, "--name", "../x"], "--name must be a plain file name"),
    (["info", "assets/default_model"], "is a folder: give the weights file in it"),
    (["rerun", "assets/default_model/model.safetensors"], "is not text, so not a file of run records"),
    (["quantize", "--method", "ouromamba", "ptq4vm", "ouromamba"], "argument --method: ouromamba is given twice"),
    (["sweep", "--k", "2", "2.0"], "argument --k: 2.0 is given twice"),
    (["generate", "--layers", "1", "1", "--out", "x"], "argument --layers: 1 is given twice"),
    (["report", "a.json", "./a.json"], "argument records: ./a.json and a.json are the same"),
])
def test_bad_numbers_and_paths_are_one_line_before_any_work(argv: list[str], message: str, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_outputs_that_cannot_be_written_are_refused_before_any_work(tmp_path: Path, capsys):
    a_file, a_folder = tmp_path / "file", tmp_path / "folder"
    a_file.write_text("x")
    (a_folder / "old").mkdir(parents=True)
    for argv, message in (
        (["quantize", *QUICK, "--out", str(a_file)], "part of that path is a file"),
        (["pack", "--out", str(a_folder)], "is a folder: give a file name in it"),
        (["outliers", "--out", str(a_file / "x.csv")], "part of that path is a file"),
        (["sweep", "--out", str(a_file / "x")], "part of that path is a file"),
        (["generate", "--out", str(a_folder)], "already holds files: name a new folder"),
        (["generate", "--out", ""], "the calibration set folder is empty"),
        (["card-eval", str(a_file)], "is not a model folder"),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)


def test_a_calibration_folder_smaller_than_asked_is_refused(tmp_path: Path, capsys):
    from PIL import Image
    for index in range(3):
        Image.new("L", (28, 28), index * 60).save(tmp_path / f"{index}.png")
    assert main(["quantize", *QUICK[:2], "--calib", str(tmp_path), "--n-calib", "100"]) == 2
    assert "holds 3 images, fewer than the 100 asked for: calibrate on 3 or fewer" in capsys.readouterr().err


def test_sweep_names_keep_their_dots():
    from core.cli import with_suffix
    assert with_suffix("out/sweep_k2.5", ".csv") == Path("out/sweep_k2.5.csv")
    assert with_suffix("out/sweep.json", ".csv") == Path("out/sweep.csv")


def test_checkpoints_that_cannot_give_a_meaningful_top1_are_refused(tmp_path: Path, capsys):
    import torch

    from core.models import create_vim, save_safetensors
    five = save_safetensors(create_vim("vim_fmnist_patch4_28_midclstok", num_classes=5, embed_dim=16, depth=1),
                            tmp_path / "five.safetensors")
    assert main(["eval", str(five), "--limit", "5"]) == 2
    assert "(28×28, 1 channel, 5 classes) does not read it" in capsys.readouterr().err
    broken = create_vim("vim_fmnist_patch4_28_midclstok", embed_dim=16, depth=1)
    with torch.no_grad():
        broken.head.weight[0, 0] = float("nan")
    assert main(["info", str(save_safetensors(broken, tmp_path / "nan.safetensors"))]) == 2
    assert "holds NaN or infinite values in 1 tensor(s) (head.weight…)" in capsys.readouterr().err


def test_interrupting_a_command_is_one_line(monkeypatch, capsys):
    import core.cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(core.cli, "evaluate", interrupted)
    assert main(["eval", "--limit", "5"]) == 130
    assert capsys.readouterr().err.strip().startswith("interrupted: what was written before stays")


def test_help_names_every_default(capsys):
    commands = ("info", "eval", "card-eval", "generate", "quantize", "rerun", "pack", "outliers", "sweep", "report")
    for command in commands:
        assert main([command, "--help"]) == 0
    printed = capsys.readouterr().out
    assert "calibration images (default: 128)" in printed and "usage: python -m core quantize" in printed
    assert "(default: None)" not in printed and "(default: False)" not in printed
