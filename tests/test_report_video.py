"""``make report`` / ``make video`` read saved artifacts only, and degrade when some are missing."""

import json
import re
import shutil
from pathlib import Path

import pytest

from dinokit.ablations import ablation_dir
from dinokit.assignment import STAGES, run_assignment
from dinokit.cli import main
from dinokit.device import is_cpu_name
from dinokit.report import build_report, display_path
from dinokit.viz import plots
from dinokit.viz.document import bench_files_for
from dinokit.viz.video import build_video, probe


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    mp = pytest.MonkeyPatch()
    mp.setenv("DINOKIT_DATA_DIR", str(tmp / "data"))
    mp.setenv("DINOKIT_REPORT", str(tmp / "report"))
    mp.setenv("DINOKIT_RUNS", str(tmp / "runs"))
    mp.delenv("DINOKIT_DATA", raising=False)
    run = tmp / "run"
    # the whole pipeline, as `make assignment` runs it (the speed study at 2 steps each way)
    result = run_assignment("ci", out_dir=run, overrides=["train.knn_every_epochs=1"], speed_iters=2)
    assert result["status"] == "finished" and result["ran"] == [s.name for s in STAGES if s.name != "notebooks"]
    common = {"mode": "inference", "arch": "vit_pico", "patch": 8, "img_size": 32, "tokens": 17, "batch": 2,
              "dtype": "fp32", "peak_mem_mb": 100.0, "memory_ratio": 1.0, "status": "ok",
              "device": json.loads((run / "run_info.json").read_text())["device_name"], "torch": "x"}  # fmt: skip
    rows = [
        {**common, "backend": b, "images_per_s": s, "speedup": s / 10} for b, s in (("naive", 10.0), ("sdpa", 20.0))
    ]
    (tmp / "report" / "bench" / "cpu.json").write_text(json.dumps(rows))
    for name, knn in (("full DINOv2", 30.0), ("no local crops", 25.0)):  # two finished ablation variants
        folder = ablation_dir("ci", name)
        folder.mkdir(parents=True)
        (folder / "metrics.jsonl").write_text("".join(json.dumps({"iteration": i, "knn_top1": knn + i}) + "\n"
                                                      for i in (1, 2)))  # fmt: skip
    gpu = [{**row, "device": "NVIDIA H200"} for row in rows]  # another device's results: named, not shown
    (tmp / "report" / "bench" / "gpu-NVIDIA-H200.json").write_text(json.dumps(gpu))
    yield run
    mp.undo()


def test_assignment_again_skips_every_stage_and_reports_its_own_speed(full_run: Path, capsys) -> None:
    """`dinokit assignment` twice: the second run finds every stage current and does nothing."""
    argv = ["assignment", "--preset", "ci", "--out", str(full_run), "--set", "train.knn_every_epochs=1"]
    assert main([*argv, "--speed-iters", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("; skipped") == len(STAGES) - 1 and "not asked" in out  # all but the notebooks (not asked)
    assert "to do:" not in out.split("=== 1/")[0]  # the plan at the start: nothing left
    own = json.loads((full_run.parent / "report" / "bench" / f"assignment-{full_run.name}.json").read_text())
    for kind in ("train", "test"):  # on and off both measured, in the run's own precision and batch
        assert own[kind]["on"]["images_per_s"] > 0 and own[kind]["off"]["images_per_s"] > 0
        assert own[kind]["speedup"] == pytest.approx(own[kind]["on"]["images_per_s"] / own[kind]["off"]["images_per_s"])
    assert own["train"]["on"]["batch"] == 16 and own["train"]["on"]["iterations"] == 2
    assert own["test"]["on"]["images"] > 0 and own["test"]["model_alone_speedup"] > 0
    report = (full_run.parent / "report" / "report.md").read_text()
    assert report.index("This run's own speed") < report.index("The generic sweep")


def test_a_finished_run_is_recorded_as_an_expectation(full_run: Path, tmp_path: Path) -> None:
    from dinokit.expectations import expected_table, record_run

    entry = record_run(full_run, "a test", tmp_path / "expectations.json", commit="abc1234")
    metrics = json.loads((full_run / "eval" / "metrics.json").read_text())
    assert entry["results"]["knn"] == pytest.approx(metrics["knn"]["top1"], abs=0.06)
    assert entry["results"]["jaccard"] == pytest.approx(metrics["attention_jaccard"]["teacher"], abs=0.06)
    assert entry["machine"]["cores"] and entry["profile"] == "ci"
    record_run(full_run, "again", tmp_path / "expectations.json", commit="abc1234")  # same run: replaced
    assert len(json.loads((tmp_path / "expectations.json").read_text())) == 1
    assert "abc1234" in expected_table("ci", ["knn", "pretrain_s"], tmp_path / "expectations.json")


def test_report_from_artifacts_is_complete_and_deterministic(full_run: Path) -> None:
    out = full_run.parent / "report"
    html = build_report(full_run, out)
    md = (out / "report.md").read_text()
    for section in ("Dataset and split", "Training curves", "held-out split", "FlashAttention", "Attention maps"):
        assert section in md
    assert "Missing" not in md
    # the text follows the data used (the embedded set, not HAR), the speed section this device only
    assert "12,600" not in md and "predictions.csv" in md
    assert "`gpu-NVIDIA-H200.json`" in md and not (out / "figures" / "bench_gpu-NVIDIA-H200.png").exists()
    for fig in ("training_curves", "per_class_confusion", "attention_maps", "bench_cpu", "failure_cases"):
        assert (out / "figures" / f"{fig}.png").is_file() and (out / "figures" / f"{fig}.pdf").is_file()
    assert "data:image/png;base64," in html.read_text()  # self-contained
    first = html.read_text()
    build_report(full_run, out)
    assert html.read_text() == first  # idempotent


def test_report_says_what_is_missing(full_run: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "run_info.json", "split.csv", "metrics.jsonl", "checkpoint.pt"):
        shutil.copy(full_run / name, bare / name)
    build_report(bare, tmp_path / "out", tmp_path / "no-bench")
    md = (tmp_path / "out" / "report.md").read_text()
    shown = display_path(bare)  # relative to the project, never this machine's absolute path
    assert f"dinokit eval {shown}" in md and f"dinokit attention {shown}" in md and "dinokit bench" in md


def test_video_plays(full_run: Path, monkeypatch) -> None:
    import dinokit.viz.video as video_module

    cards, card = {}, video_module._card

    def remember(title: str, lines=()):
        cards[title] = list(lines)
        return card(title, lines)

    monkeypatch.setattr(video_module, "_card", remember)
    video = build_video(full_run, full_run.parent / "demo.mp4")
    assert video.suffix == ".mp4"
    info = probe(video)
    assert info["seconds"] >= 30 and info["frames"] >= 150
    speed = cards["FlashAttention on vs off"]  # this run's device only, as the report
    assert speed and not any("H200" in line for line in speed)


def test_video_degrades_without_artifacts(full_run: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "metrics.jsonl"):
        shutil.copy(full_run / name, bare / name)
    video = build_video(bare, tmp_path / "bare.mp4")  # missing eval, attention, bench: cards say so
    assert probe(video)["frames"] > 50


def test_report_has_the_assignment_sections_and_keeps_the_students_text(full_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    build_report(full_run, out)
    md = (out / "report.md").read_text()
    for section in ("Introduction", "Method", "Dataset and split", "Results", "Discussion"):
        assert section in md
    assert "no labels" in md and "transductive" in md  # where the held-out set comes from, and why
    assert "/tmp/" not in md and str(full_run.parent) not in md  # no absolute paths of this machine
    mine = "I trained for longer and the kNN rose to 40 %.\n\nA second paragraph, with `code`."
    edited = md.replace(md.split("<!-- your text: discussion -->\n")[1].split("\n<!-- end of your text -->")[0], mine)
    (out / "report.md").write_text(edited)
    build_report(full_run, out)  # regenerate figures and tables
    again = (out / "report.md").read_text()
    assert mine in again and "A second paragraph" in (out / "report.html").read_text()
    assert again.count("<!-- your text:") == 7  # every section's block is still there


def test_report_links_the_executed_notebooks(full_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "linked"
    (out / "notebooks").mkdir(parents=True)
    for name in ("01_data_prep", "04_linear_evaluation"):
        (out / "notebooks" / f"{name}.html").write_text("<html></html>")
    build_report(full_run, out)
    md = (out / "report.md").read_text()
    assert "[01_data_prep](notebooks/01_data_prep.html)" in md and "notebooks/04_linear_evaluation.html" in md
    assert "05_flashattention_speed" not in md  # only the notebooks that were executed


@pytest.mark.parametrize(
    ("name", "cpu"),
    [
        ("AMD EPYC (2 cores)", True),
        ("Intel(R) Xeon(R) (16 cores)", True),
        ("NVIDIA H200", False),
        ("Tesla T4", False),
    ],  # fmt: skip
)
def test_device_names_say_cpu_or_gpu(name: str, cpu: bool) -> None:
    assert is_cpu_name(name) is cpu


def test_bench_files_are_this_device_and_profile(tmp_path: Path) -> None:
    def write(name: str, device: str) -> Path:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps([{"device": device}]))
        return path

    demo, quick, live = write("cpu-demo", "EPYC (2 cores)"), write("cpu-quick", "EPYC (2 cores)"), write("live-ci", "X")
    h200 = write("gpu-NVIDIA-H200", "NVIDIA H200")
    files = [demo, quick, live, h200]
    assert bench_files_for(files, "EPYC (2 cores)", "cpu-demo") == ([demo], [quick, live, h200])
    assert bench_files_for(files, "EPYC (2 cores)", "har-vits8") == ([demo, quick], [live, h200])
    assert bench_files_for(files, "Tesla T4", "har-vits8") == ([], files)


def test_single_shape_comparisons_are_bars_and_memory_names_the_device() -> None:
    row = {"mode": "train", "backend": "sdpa", "dtype": "bf16", "tokens": 785, "batch": 64, "speedup": 1.4,
           "memory_ratio": 0.6}  # fmt: skip
    gpu = plots.speedup_vs_tokens(
        [{**row, "device": "NVIDIA H200"}, {**row, "mode": "inference", "device": "NVIDIA H200"}]
    )
    assert len(gpu.axes[0].patches) == 2 and gpu.axes[0].get_xscale() == "linear"  # bars, not lone points
    assert "GPU" in gpu.axes[1].get_title()
    sweep = [{**row, "tokens": t, "device": "EPYC (2 cores)"} for t in (145, 785)]
    cpu = plots.speedup_vs_tokens(sweep)
    assert not cpu.axes[0].patches and cpu.axes[0].get_xscale() == "log" and "CPU" in cpu.axes[1].get_title()


# What each notebook says it feeds the report ("**Feeds the report:** ..."), and where it is: a figure
# file, or text in report.md. A claim a notebook makes that is in neither list fails the test.
FIGURES = {
    "class histogram": "class_histogram", "crops figure": "crops", "training curves": "training_curves",
    "kNN curve": "knn_curve", "ablations": "ablations",
    "per-class accuracy and confusion matrix": "per_class_confusion",
    "feature-space figure": "feature_space", "speed-up table and figure": "bench_cpu", "maps": "attention_maps",
    "Jaccard curve": "attention_jaccard", "patch PCA": "patch_pca",
}  # fmt: skip
TEXT = {"split table and sha256": "sha256", "accuracy table": "kNN top-1", "training set-up": "optimisation"}
NOT_FIGURES = ("explain each term", "figures here are yours", "`make report` reads")


def _claims(notebook: Path) -> list[str]:
    cells = json.loads(notebook.read_text())["cells"]
    line = next(ln for c in cells for ln in "".join(c["source"]).splitlines() if "**Feeds the report:**" in ln)
    items = []
    for group in re.findall(r"\(([^()]*)\)", line):
        group = re.sub(r"^\*[^*]+\*:\s*", "", group)  # "*Results*: training curves" -> "training curves"
        items += [re.sub(r"^(the |and )+", "", x.strip()) for x in re.split(r"[,;]| and (?=the )", group)]
    return [x for x in items if x and not any(x.startswith(n) for n in NOT_FIGURES)]


def test_every_figure_a_notebook_promises_is_in_the_report(full_run: Path) -> None:
    out = full_run.parent / "report"
    build_report(full_run, out)
    md = (out / "report.md").read_text()
    notebooks = sorted((Path(__file__).parents[1] / "notebooks").glob("0*.ipynb"))
    claims = {nb.stem: _claims(nb) for nb in notebooks}
    assert sum(len(c) for c in claims.values()) >= 12, claims
    for nb, items in claims.items():
        for item in items:
            if item in FIGURES:
                assert (out / "figures" / f"{FIGURES[item]}.png").is_file(), (nb, item)
            else:
                assert item in TEXT, f"{nb} promises {item!r}: add where the report shows it"
                assert TEXT[item] in md, (nb, item)
