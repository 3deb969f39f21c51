"""The CLI explains bad input in one line and exits with 2."""

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
