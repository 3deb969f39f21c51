"""The CLI explains bad input in one line and exits with 2."""

import json
from pathlib import Path

from core.cli import main


def test_bad_checkpoint_is_one_line(tmp_path: Path, capsys):
    (tmp_path / "junk.pth").write_bytes(b"\x00garbage")
    assert main(["info", str(tmp_path / "junk.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not a readable checkpoint" in err and "\n" not in err


def test_info_on_default_model(capsys):
    assert main(["info"]) == 0
    assert '"seq_len": 50' in capsys.readouterr().out


def test_eval_subset(capsys):
    assert main(["eval", "--limit", "20", "--batch-size", "7"]) == 0
    assert '"total": 20' in capsys.readouterr().out


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
