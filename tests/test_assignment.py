"""The assignment pipeline's decisions: the preset per device, the budget split, and which stages run.

The whole pipeline end to end (twice: the second run skips everything) is in test_report_video.py,
whose fixture runs it once for all the report tests.
"""

from pathlib import Path

import pytest

from dinokit import assignment
from dinokit.assignment import Stage, choose_preset, pretrain_minutes, run_assignment
from dinokit.config import make_config
from dinokit.device import DeviceKind


@pytest.mark.parametrize(
    ("kind", "memory_gb", "preset"),
    [
        (DeviceKind("cpu"), None, "cpu-demo"),
        (DeviceKind("cuda", (9, 0), name="NVIDIA H200"), 139.8, "har-vits8"),
        (DeviceKind("cuda", (8, 0), name="NVIDIA A100-SXM4-40GB"), 39.4, "har-vits8"),  # 40 GB reports 39.4 GiB
        (DeviceKind("cuda", (8, 9), name="NVIDIA L4"), 22.0, "har-vits8-16gb"),
        (DeviceKind("cuda", (7, 5), name="Tesla T4"), 14.7, "har-vits8-16gb"),
        (DeviceKind("cuda", (6, 0), name="Tesla P100-PCIE-16GB"), 15.9, "har-vits8-16gb"),
    ],
)
def test_the_preset_follows_the_device(kind: DeviceKind, memory_gb: float | None, preset: str) -> None:
    assert choose_preset(kind, memory_gb) == preset


def test_a_new_session_on_another_gpu_continues_the_run_it_started(env: Path) -> None:
    from dinokit.assignment import existing_preset

    assert existing_preset([], None) is None  # nothing started: the device decides
    run = env / "runs" / "har-vits8-16gb-embedded"  # started on a T4 in an earlier session
    run.mkdir(parents=True)
    make_config("har-vits8-16gb").save(run / "config.json")
    (run / "pipeline.json").write_text('{"stages": {}}')
    assert existing_preset([], None) == "har-vits8-16gb"
    assert existing_preset([f"data.root={env / 'other'}"], None) is None  # other data: another run


def test_the_budget_leaves_room_for_the_stages_after_training() -> None:
    assert pretrain_minutes(1) == 51.0  # 85 % of an hour
    assert pretrain_minutes(10) == 510.0
    assert pretrain_minutes(0.01) == 1.0  # never below a minute
    with pytest.raises(ValueError, match="--hours must be positive"):
        pretrain_minutes(0)


@pytest.fixture
def fake_stages(env: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Three stages, a -> b -> c (c depends on b's finish), whose inputs the test controls."""
    inputs, calls = {"a": "1", "b": "1"}, []

    def stage(name: str, key) -> Stage:
        def run(ctx) -> str:
            calls.append(name)
            if name in inputs.get("fail", ""):
                raise KeyboardInterrupt  # interrupted half-way: not recorded as finished
            (ctx.run_dir / name).write_text("done")
            return f"{name} ran"

        return Stage(name, name, key, lambda c: (c.run_dir / name).is_file(), run)

    stages = [
        stage("a", lambda c: inputs["a"]),
        stage("b", lambda c: inputs["b"]),
        stage("c", lambda c: assignment._stamp(c, "b")),
    ]
    monkeypatch.setattr(assignment, "STAGES", stages)
    (env / "runs" / "x").mkdir(parents=True)
    return {"inputs": inputs, "calls": calls, "run": env / "runs" / "x"}


def test_stages_skip_when_current_and_rerun_with_what_depends_on_them(fake_stages: dict) -> None:
    run, inputs, calls = fake_stages["run"], fake_stages["inputs"], fake_stages["calls"]
    first = run_assignment("ci", out_dir=run)
    assert first["ran"] == ["a", "b", "c"] and calls == ["a", "b", "c"]
    assert run_assignment("ci", out_dir=run)["skipped"] == ["a", "b", "c"] and len(calls) == 3
    inputs["b"] = "2"  # b's input changed: b runs again, and c because b did; a stays
    assert run_assignment("ci", out_dir=run)["ran"] == ["b", "c"]
    (run / "a").unlink()  # an output lost: its stage runs again
    assert run_assignment("ci", out_dir=run)["ran"] == ["a"]


def test_an_interrupted_stage_runs_again_and_the_finished_ones_do_not(fake_stages: dict) -> None:
    run, inputs, calls = fake_stages["run"], fake_stages["inputs"], fake_stages["calls"]
    inputs["fail"] = "b"
    with pytest.raises(KeyboardInterrupt):
        run_assignment("ci", out_dir=run)
    del inputs["fail"]
    again = run_assignment("ci", out_dir=run)
    assert again["skipped"] == ["a"] and again["ran"] == ["b", "c"] and calls == ["a", "b", "b", "c"]


def test_the_plan_names_what_is_done_and_what_is_left(fake_stages: dict, capsys) -> None:
    run_assignment("ci", out_dir=fake_stages["run"])
    out = capsys.readouterr().out
    assert "done: nothing yet" in out and "to do: a" in out and "done: a, b" in out


def test_one_home_folder_holds_runs_reports_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dinokit import paths

    for name in ("DINOKIT_DATA_DIR", "DINOKIT_RUNS", "DINOKIT_REPORT", "DINOKIT_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DINOKIT_HOME", str(tmp_path / "kaggle-working"))
    home = tmp_path / "kaggle-working"
    assert paths.runs_dir() == home / "runs" and paths.report_dir() == home / "report"
    assert paths.data_dir() == home / "data" and paths.cache_dir() == home / "data" / "cache"
    monkeypatch.setenv("DINOKIT_RUNS", str(tmp_path / "elsewhere"))  # a single root can still be moved alone
    assert paths.runs_dir() == tmp_path / "elsewhere" and paths.report_dir() == home / "report"


def test_a_folder_without_labels_pretrains_and_the_report_says_why_nothing_is_classified(env: Path) -> None:
    from conftest import jpeg_bytes

    from dinokit.config import make_config
    from dinokit.data.har import load_dataset
    from dinokit.eval.run_eval import no_labels
    from dinokit.report import build_report
    from dinokit.runs import read_metrics
    from dinokit.train.loop import pretrain

    folder = env / "photos"
    folder.mkdir()
    for i in range(40):
        (folder / f"IMG_{i:03d}.jpg").write_bytes(jpeg_bytes(i, size=40))
    data = load_dataset(folder)
    assert (data.layout, len(data.labeled), len(data.unlabeled)) == ("images", 0, 40)
    run = env / "runs" / "photos"
    cfg = make_config("ci", {"data.root": str(folder), "train.knn_every_epochs": 1})
    assert pretrain(cfg, out_dir=run).status == "finished"  # on all 40 unlabelled images
    assert not any("knn_top1" in m for m in read_metrics(run))  # no labels, no kNN; snapshots still kept
    assert list((run / "snapshots").glob("teacher_*.pt"))
    why = no_labels(run)
    assert "0 labelled images" in why and "40 unlabelled" in why and "class folders" in why
    build_report(run, env / "report")
    assert why in (env / "report" / "report.md").read_text()
