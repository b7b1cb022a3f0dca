"""The notebooks' expected results come from recorded runs (notebooks/expectations.json), not typing."""

import json
import re

import pytest

from dinokit import paths
from dinokit.expectations import COLUMNS, expectations_path, expected_table

# the cells whose "Expect" paragraph is followed by a table rendered from the recorded runs
GENERATED = {
    "03_dinov2_pretraining": ["cell-09", "cell-13"],
    "04_linear_evaluation": ["cell-02b"],
    "05_flashattention_speed": ["cell-05", "cell-07"],
    "06_attention_maps": ["cell-09", "cell-11"],
}
TYPED_RESULT = re.compile(r"\d+(?:\.\d+)?\s?(?:%|×)")


def test_the_recorded_runs_name_both_kinds_of_cpu_and_how_they_were_made() -> None:
    entries = [e for e in json.loads(expectations_path().read_text()) if e["profile"] == "cpu-demo"]
    assert {e["machine"]["avx512"] for e in entries} == {True, False}  # with and without AVX-512
    for e in entries:
        assert {"cpu", "avx512", "cores", "torch"} <= e["machine"].keys() and e["machine"]["cores"] == 2
        assert e["commit"] and e["date"] and e["source"] and set(e["results"]) <= set(COLUMNS)


def test_expect_paragraphs_type_no_results_and_render_the_table() -> None:
    for name, ids in GENERATED.items():
        cells = json.loads((paths.repo_root() / "notebooks" / f"{name}.ipynb").read_text())["cells"]
        for cid in ids:
            i = next(k for k, c in enumerate(cells) if c["id"] == cid)
            text = "".join(cells[i]["source"])
            expect = next(p for p in text.split("\n\n") if p.startswith("**Expect**"))
            assert not TYPED_RESULT.findall(expect), f"{name} {cid}: typed results {TYPED_RESULT.findall(expect)}"
            shown = "".join(cells[i + 1]["source"])
            assert "show_expected(" in shown, f"{name}: the cell after {cid} must render the table"
            keys = re.findall(r'"(\w+)"', shown.split("show_expected(")[1])[1:]
            assert keys and set(keys) <= set(COLUMNS), keys


def test_the_table_shows_each_machine_with_its_commit() -> None:
    table = expected_table("cpu-demo", ["knn", "knn_random", "step_s"])
    assert "no AVX-512" in table and "AVX512-BF16" in table
    assert "5bca553" in table and "33.7 %" in table and "0.43 s" in table
    assert "No recorded run" in expected_table("har-vits8", ["knn"])


def test_the_gpu_paragraph_types_no_results_and_renders_the_recorded_sweeps() -> None:
    from dinokit.expectations import gpu_sweep_table

    cells = json.loads((paths.repo_root() / "notebooks" / "05_flashattention_speed.ipynb").read_text())["cells"]
    i = next(k for k, c in enumerate(cells) if c["id"] == "cell-09")
    expect = next(p for p in "".join(cells[i]["source"]).split("\n\n") if p.startswith("**Expect on a GPU**"))
    assert not TYPED_RESULT.findall(expect), TYPED_RESULT.findall(expect)
    assert "show_gpu_expected(" in "".join(cells[i + 1]["source"])
    table = gpu_sweep_table(sorted((paths.repo_root() / "report" / "bench").glob("gpu-*.json")))
    row = next(r for r in table.splitlines() if "inference, vit_small/8 at 224 px (785 tokens), batch 128" in r)
    assert "NVIDIA H200" in row and "1,316 img/s" in row and "4,077 img/s" in row and "3.10×" in row
    assert "out of memory" in table and "torch 2.11" in table
    assert "No GPU sweep recorded" in gpu_sweep_table([])


def test_a_measurement_apart_from_a_run_joins_this_machine_kinds_latest_entry(tmp_path, monkeypatch) -> None:
    from dinokit import expectations

    me = {"cpu": "Some CPU", "avx512": False, "avx512_bf16": False, "cores": 2, "torch": "2.14.1"}
    monkeypatch.setattr(expectations, "this_machine", lambda: me)
    other = {**me, "cpu": "Other CPU"}
    entries = [{"profile": "cpu-demo", "machine": m, "commit": c, "date": "d", "source": "s", "results": {}}
               for m, c in ((me, "old"), (other, "x"), (me, "new"))]  # fmt: skip
    path = tmp_path / "expectations.json"
    path.write_text(json.dumps(entries))
    entry = expectations.add_to_latest_entry({"op_145": [1.0, 1.1]}, "attention op, 3 fresh processes", path=path)
    assert entry["commit"] == "new"
    old, _, new = json.loads(path.read_text())
    assert new["results"] == {"op_145": [1.0, 1.1]} and old["results"] == {} and "3 fresh processes" in new["source"]
    monkeypatch.setattr(expectations, "this_machine", lambda: {**me, "cpu": "Third CPU"})
    with pytest.raises(ValueError, match="no cpu-demo entry"):
        expectations.add_to_latest_entry({}, "x", path=path)
