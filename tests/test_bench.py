"""The speed study's mechanics on a tiny model (speed itself is never asserted)."""

import json

from dinokit.bench import BenchCase, format_table, run_bench, save_records, speedups


def test_bench_records_every_backend_and_mode(tmp_path) -> None:
    case = BenchCase("vit_pico", patch=8, img_size=32, batch=2, n_local=2)
    records = run_bench([case], backends=["naive", "sdpa"], warmup=0, repeats=1, progress=False)
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
