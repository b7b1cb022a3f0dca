"""The ``dinokit`` command: data check / synth / split, exit codes and messages."""

import json
import subprocess
import sys
from pathlib import Path

from dinokit.cli import main


def test_data_check_on_every_fixture(kaggle_root, parquet_root, folders_root, capsys) -> None:
    for root, layout in ((kaggle_root, "kaggle"), (parquet_root, "parquet"), (folders_root, "folders")):
        assert main(["data", "check", str(root)]) == 0
        out = capsys.readouterr().out
        assert f"layout:    {layout}" in out and "usable:    yes" in out and "split sha256:" in out


def test_data_check_reports_problems(messy_kaggle_root, capsys) -> None:
    assert main(["data", "check", str(messy_kaggle_root)]) == 0
    out = capsys.readouterr().out
    assert "skipped 7 input(s)" in out and "1 truncated" in out and "1 too large" in out


def test_data_check_unusable_root_exits_nonzero(tmp_path: Path, capsys) -> None:
    assert main(["data", "check", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "matches no dataset layout" in err and "Training_set.csv" in err
    (tmp_path / "train").mkdir()
    (tmp_path / "Training_set.csv").write_text("filename,label\nmissing.jpg,calling\n")
    assert main(["data", "check", str(tmp_path)]) == 2
    assert "no labelled images" in capsys.readouterr().err


def test_data_synth_and_split(tmp_path: Path, capsys) -> None:
    out = tmp_path / "synth"
    assert main(["data", "synth", str(out), "--per-class", "4", "--size", "24"]) == 0
    assert (out / "Training_set.csv").is_file()
    manifest = tmp_path / "split.csv"
    assert main(["data", "split", str(out), "--out", str(manifest)]) == 0
    printed = capsys.readouterr().out
    import hashlib

    assert hashlib.sha256(manifest.read_bytes()).hexdigest() in printed


def test_bad_override_is_a_clear_error(capsys) -> None:
    assert main(["pretrain", "--preset", "ci", "--set", "optim.nope=1"]) == 2
    assert "unknown config key 'optim.nope'" in capsys.readouterr().err


def test_python_dash_m_entry_point() -> None:
    result = subprocess.run([sys.executable, "-m", "dinokit", "--help"], capture_output=True, text=True, check=True)
    assert "pretrain" in result.stdout and "data" in result.stdout


def test_the_original_command_with_resume_continues_the_run(env, kaggle_root, capsys) -> None:
    """A user's natural resume: the same command plus --resume. The run's own data (written the same
    or another way) is no change; another folder is refused, naming both values."""
    run = env / "r"
    first = ["pretrain", "--preset", "ci", "--data", str(kaggle_root), "--out", str(run), "--set", "optim.batch_size=4"]
    assert main([*first, "train.max_iters=2"]) == 0
    assert main([*first, "--resume"]) == 0
    same_folder = str(kaggle_root.parent / ".." / kaggle_root.parent.name / kaggle_root.name) + "/"
    assert main([*first[:4], same_folder, *first[5:], "--resume"]) == 0
    capsys.readouterr()
    assert main([*first[:4], str(env), *first[5:], "--resume"]) == 2
    err = capsys.readouterr().err
    assert "data.root cannot change" in err and str(kaggle_root) in err and str(env) in err


def test_a_budgeted_run_resumes_with_its_original_command(env, capsys) -> None:
    """The budget rewrites config.json (minutes spent: 0; epochs: those that fit): the original
    `--set train.time_budget_min=... optim.epochs=...` plus --resume is still the same run."""
    run = env / "b"
    first = ["pretrain", "--preset", "ci", "--out", str(run), "--set", "train.time_budget_min=0.05", "optim.epochs=50"]
    assert main(first) == 0
    assert json.loads((run / "config.json").read_text())["train"]["time_budget_min"] == 0.0
    assert main([*first, "--resume"]) == 0
    capsys.readouterr()
    assert main([*first[:-1], "optim.epochs=40", "--resume"]) == 2
    assert "optim.epochs cannot change" in capsys.readouterr().err
