"""The speed study's mechanics on a tiny model (speed itself is never asserted)."""

import json
from pathlib import Path

import torch

from dinokit.bench import BenchCase, format_table, run_bench, save_records, speedups


def test_bench_records_every_backend_and_mode(tmp_path) -> None:
    case = BenchCase("vit_pico", patch=8, img_size=32, batch=2, n_local=2)
    records = run_bench([case], backends=["naive", "sdpa"], warmup=0, repeats=1, progress=False, isolate=False)
    assert len(records) == 2 * 3 + 1  # 2 backends x 3 modes + timm's own fused ViT for inference
    assert [r.mode for r in records if r.backend == "timm-fused"] == ["inference"]
    assert all(r.status == "ok" and r.images_per_s > 0 and r.tokens == 17 for r in records)
    assert all(r.max_abs_diff < 1e-4 for r in records)  # on == off before anything is timed
    rows = speedups(records)
    assert all(row["speedup"] == 1.0 for row in rows if row["backend"] == "naive")
    table = format_table(records)
    assert "train_step" in table and "sdpa" in table
    data = json.loads(save_records(records, tmp_path / "b.json").read_text())
    assert {"backend", "mode", "images_per_s", "peak_mem_mb", "device", "torch", "speedup"} <= data[0].keys()


def test_cpu_peak_memory_is_per_backend_and_shows_the_n_by_n_matrix() -> None:
    # vit_pico at 224 px / patch 8: 785 tokens, 2 heads, batch 8 -> naive writes two
    # 8 x 2 x 785^2 fp32 matrices per layer (scores and softmax, 2 x 37.6 MB); flash writes none.
    # Each backend is measured in its own fresh process (the CPU default), so sdpa cannot
    # inherit naive's peak or its already-mapped heap.
    case = BenchCase("vit_pico", patch=8, img_size=224, batch=8, modes=("inference",))
    records = run_bench([case], backends=["naive", "sdpa"], warmup=0, repeats=1, progress=False, timm_ref=False)
    assert all(r.status == "ok" and r.extra["isolated"] for r in records)
    peak = {r.backend: r.peak_mem_mb for r in records}
    assert peak["naive"] - peak["sdpa"] > 40, peak
    # ... and the kernel maps those fresh buffers in page by page: 2 layers x 2 matrices x
    # 2 x 785^2 x 4 B / 4 KiB = 4,800 faults per image for naive (5,400 measured); flash ~400.
    faults = {r.backend: r.extra["page_faults_per_image"] for r in records}
    assert faults["naive"] > 2 * faults["sdpa"] + 1000, faults
    assert "faults/img" in format_table(records)


def test_out_of_memory_is_recorded_not_raised(monkeypatch) -> None:
    import dinokit.bench as bench

    def runner(case, mode, backend, device):
        if backend == "naive":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")
        return lambda: None

    monkeypatch.setattr(bench, "_runner", runner)  # in this process: isolate=False
    case = BenchCase("vit_pico", patch=8, img_size=32, batch=2, modes=("inference",))
    records = run_bench(
        [case], backends=["naive", "sdpa"], warmup=0, repeats=1, progress=False, timm_ref=False, isolate=False
    )
    assert [(r.backend, r.status) for r in records] == [("naive", "oom"), ("sdpa", "ok")]
    rows = speedups(records)
    assert rows[1]["speedup"] is None  # no baseline to divide by: no ratio is made up


def test_speedup_plot_draws_one_line_per_mode_backend_dtype() -> None:
    from dinokit.viz.plots import speedup_vs_tokens

    def row(backend, tokens, batch, speedup, mem=None):
        return {"mode": "inference", "backend": backend, "dtype": "fp32", "tokens": tokens, "batch": batch,
                "speedup": speedup, "memory_ratio": mem}  # fmt: skip

    rows = [row("naive", 145, 8, 1.0), row("sdpa", 145, 8, 1.1, 0.9), row("sdpa", 785, 8, 1.5, 0.5),
            row("sdpa", 785, 32, 1.9, 0.3), row("timm-fused", 785, 8, 1.4)]  # fmt: skip
    fig = speedup_vs_tokens(rows)
    speed_ax, mem_ax = fig.axes
    assert [line.get_label() for line in speed_ax.get_lines()[:2]] == ["inference · sdpa · fp32",
                                                                         "inference · timm-fused · fp32"]  # fmt: skip
    assert list(speed_ax.get_lines()[0].get_ydata()) == [1.1, 1.5, 1.9]  # naive (1.0) is the baseline, not drawn
    assert [t.get_text() for t in speed_ax.texts] == ["b8", "b8", "b32"]  # the sdpa line mixes batch sizes
    assert len(mem_ax.get_lines()) == 1  # timm has no memory ratio here


def test_paired_ratio_script_alternates_backends_in_fresh_processes(tmp_path, monkeypatch) -> None:
    import runpy
    import sys

    out = tmp_path / "paired.json"
    argv = ["paired_ratio.py", "--arch", "vit_pico", "--img", "32", "--batch", "2", "--rounds", "2",
            "--repeats", "1", "--out", str(out)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "paired_ratio.py"), run_name="__main__")
    rounds = json.loads(out.read_text())["rounds"]
    assert [r["order"] for r in rounds] == [["naive", "sdpa"], ["sdpa", "naive"]]  # ABBA
    for r in rounds:
        assert r["ratio"] == r["naive"]["latency_ms"] / r["sdpa"]["latency_ms"] > 0
