"""What a profile's run should give, from recorded runs, with the machine that gave it.

Notebooks used to type their "Expect" numbers by hand, and those went stale whenever the recipe
or the machine changed. Now ``notebooks/expectations.json`` holds one entry per recorded run
(profile, machine: CPU model, AVX-512 or not, cores, torch; commit, date, how it was run; the
results), written by ``dinokit expectations RUN`` from a finished, evaluated run, and the
notebooks render their expectation tables from it (:func:`expected_table`). A value is a number,
or ``[low, high]`` for a range over several runs. GPU expectations come from the recorded GPU
sweeps in ``report/bench/gpu-*.json`` (:func:`gpu_sweep_table`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import torch

from dinokit import paths, runs

# column key -> (label, unit)
COLUMNS = {
    "knn": ("kNN top-1, pre-trained", " %"),
    "knn_random": ("kNN, random init", " %"),
    "linear": ("linear top-1, pre-trained", " %"),
    "linear_random": ("linear, random init", " %"),
    "pixels": ("linear, raw pixels", " %"),
    "supervised_knn": ("supervised reference, kNN", " %"),
    "supervised_linear": ("supervised reference, linear", " %"),
    "supervised_s": ("supervised reference trained for", " s"),
    "jaccard": ("attention Jaccard, pre-trained", " %"),
    "jaccard_random": ("attention Jaccard, random init", " %"),
    "jaccard_supervised": ("attention Jaccard, supervised", " %"),
    "pca": ("patch-PCA Jaccard, pre-trained", " %"),
    "pca_random": ("patch-PCA Jaccard, random init", " %"),
    "own_train_speedup": ("this run's training step, on / off", "×"),
    "own_test_speedup": ("this run's testing pass, on / off", "×"),
    "own_test_alone_speedup": ("testing, model alone, on / off", "×"),
    "vits8_224_inference_speedup": ("ViT-S/8 inference at 224 px, on / off", "×"),
    "op_145": ("attention op, 145 tokens, on / off", "×"),
    "op_785": ("attention op, 785 tokens, on / off", "×"),
    "op_1601": ("attention op, 1,601 tokens, on / off", "×"),
    "op_3137": ("attention op, 3,137 tokens, on / off", "×"),
    "epochs": ("epochs trained", ""),
    "step_s": ("seconds per step", " s"),
    "pretrain_s": ("pre-training", " s"),
    "eval_s": ("evaluation", " s"),
}


def _ablation_columns() -> dict[str, tuple[str, str]]:
    from dinokit.ablations import VARIANTS, ablation_key

    return {ablation_key(name): (f"ablation: {name}", " %") for name in VARIANTS}


COLUMNS.update(_ablation_columns())


def ablation_results(preset: str) -> dict[str, float]:
    """Final kNN of each finished ablation variant of ``preset`` (notebook 03's short runs)."""
    from dinokit.ablations import VARIANTS, ablation_dir, ablation_key, knn_curves

    done = {name: ablation_dir(preset, name) for name in VARIANTS}
    done = {name: d for name, d in done.items() if runs.is_finished(d)}
    return {ablation_key(name): round(points[-1][1], 1) for name, points in knn_curves(done).items() if points}


def expectations_path() -> Path:
    return paths.repo_root() / "notebooks" / "expectations.json"


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def this_machine() -> dict:
    """The CPU as the expectations name it: model, AVX-512 or not (and its bf16), cores, torch."""
    from dinokit.device import device_kind

    flags = cpu_flags()
    return {
        "cpu": device_kind("cpu").name,
        "avx512": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "cores": os.cpu_count(),
        "torch": torch.__version__.split("+")[0],
    }


def speed_results(run_dir: Path, report_dir: Path) -> dict:
    """FlashAttention on / off: the run's own study and the demo's ViT-S/8 sweep, where measured."""
    out, bench = {}, report_dir / "bench"
    own = bench / f"assignment-{run_dir.name}.json"
    if own.is_file():
        res = json.loads(own.read_text())
        keys = {"own_train_speedup": ("train", "speedup"), "own_test_speedup": ("test", "speedup"),
                "own_test_alone_speedup": ("test", "model_alone_speedup")}  # fmt: skip
        out.update({k: res[a][b] for k, (a, b) in keys.items() if res.get(a, {}).get(b)})
    sweep = bench / "cpu-demo.json"
    if sweep.is_file():
        on = [r["speedup"] for r in json.loads(sweep.read_text())
              if (r["mode"], r["img_size"], r["backend"]) == ("inference", 224, "sdpa") and r["speedup"]]  # fmt: skip
        if on:
            out["vits8_224_inference_speedup"] = on[0]
    return out


def results_of(run_dir: Path, report_dir: Path | None = None) -> dict:
    """The numbers a notebook expects, read from a finished and evaluated run (and its speed study)."""
    m = json.loads((run_dir / "eval" / "metrics.json").read_text())
    info, base = runs.run_info(run_dir), m.get("baselines", {})
    out = {"knn": m["knn"]["top1"], "linear": m["linear"]["top1"]}
    if "random_init" in base:
        out.update(knn_random=base["random_init"]["knn"]["top1"], linear_random=base["random_init"]["linear"]["top1"])
    if "pixels" in base:
        out["pixels"] = base["pixels"]["linear"]["top1"]
    if "supervised" in base:
        sup = base["supervised"]
        out.update(
            supervised_knn=sup["knn"]["top1"], supervised_linear=sup["linear"]["top1"], supervised_s=sup["seconds"]
        )
    jac = m.get("attention_jaccard") or {}
    if jac:
        out.update(jaccard=jac["teacher"], jaccard_random=jac["random_init"])
        if "supervised" in jac:
            out["jaccard_supervised"] = jac["supervised"]
        if "pca" in jac:
            out.update(pca=jac["pca"]["teacher"], pca_random=jac["pca"]["random_init"])
    budget = info.get("time_budget") or {}
    out["epochs"] = budget.get("epochs") or runs.run_config(run_dir).optim.epochs
    if budget.get("step_s"):
        out["step_s"] = budget["step_s"]
    stages = (
        json.loads((run_dir / "pipeline.json").read_text()).get("stages", {})
        if (run_dir / "pipeline.json").is_file()
        else {}
    )
    for stage in ("pretrain", "eval"):
        if stage in stages:
            out[f"{stage}_s"] = stages[stage]["seconds"]
    out.update(speed_results(run_dir, report_dir or paths.report_dir()))
    return {k: (round(v, 2) if abs(v) < 10 else round(v, 1)) if isinstance(v, float) else v for k, v in out.items()}


def record_run(
    run_dir: str | Path, source: str, path: str | Path | None = None, commit: str | None = None,
    report_dir: str | Path | None = None,
) -> dict:  # fmt: skip
    """Add (or replace: same profile, machine kind and commit) the entry of ``run_dir``; returns it.
    ``commit``: the code the run was made with (default: this checkout's)."""
    run_dir = Path(run_dir)
    path = Path(path) if path else expectations_path()
    entries = json.loads(path.read_text()) if path.is_file() else []
    entry = {
        "profile": runs.run_config(run_dir).preset,
        "machine": this_machine(),
        "commit": commit or paths.checkout_commit(),
        "date": dt.date.today().isoformat(),
        "source": source,
        "results": {
            **results_of(run_dir, Path(report_dir) if report_dir else None),
            **ablation_results(runs.run_config(run_dir).preset),
        },
    }
    same = lambda e: (e["profile"], e["commit"]) == (entry["profile"], entry["commit"]) and _same_kind(e, entry)  # noqa: E731
    entries = [e for e in entries if not same(e)] + [entry]
    path.write_text(json.dumps(entries, indent=1) + "\n")
    return entry


def _same_kind(a: dict, b: dict) -> bool:
    """Two entries from the same kind of machine: CPU model, and AVX-512 or not."""
    return (a["machine"]["cpu"], a["machine"]["avx512"]) == (b["machine"]["cpu"], b["machine"]["avx512"])


def add_to_latest_entry(results: dict, how: str, profile: str = "cpu-demo", path: str | Path | None = None) -> dict:
    """Add ``results`` measured apart from a run (notebook 05's attention op) to this machine kind's
    latest ``profile`` entry, with ``how`` (and this checkout's commit) appended to its source."""
    path = Path(path) if path else expectations_path()
    entries = json.loads(path.read_text()) if path.is_file() else []
    here = {"machine": this_machine()}
    mine = [e for e in entries if e["profile"] == profile and _same_kind(e, here)]
    if not mine:
        raise ValueError(f"no {profile} entry for this machine kind yet: record a run first (dinokit expectations RUN)")
    entry = mine[-1]
    entry["results"].update(results)
    entry["source"] += f"; {how}, {paths.checkout_commit()}, {dt.date.today().isoformat()}"
    path.write_text(json.dumps(entries, indent=1) + "\n")
    return entry


def _number(v: float, unit: str) -> str:
    return {" %": f"{v:.1f}", "×": f"{v:.2f}"}.get(unit, f"{v:g}")


def _value(v, unit: str) -> str:
    if v is None:
        return "–"
    if isinstance(v, list):
        return f"{_number(v[0], unit)}–{_number(v[1], unit)}{unit}"
    return f"{_number(v, unit)}{unit}"


def _machine(m: dict) -> str:
    simd = "AVX512-BF16" if m.get("avx512_bf16") else "AVX-512" if m.get("avx512") else "no AVX-512"
    return f"{m['cores']}-core {m['cpu']}, {simd}"


def expected_table(profile: str, keys: list[str], path: str | Path | None = None) -> str:
    """A markdown table: one row per recorded run of ``profile`` (its machine, commit, date), one
    column per key."""
    path = Path(path) if path else expectations_path()
    entries = [e for e in json.loads(path.read_text()) if e["profile"] == profile] if path.is_file() else []
    if not entries:
        return f"*No recorded run of `{profile}` yet: `dinokit expectations RUN` records one.*"
    head = ["machine", "commit, date"] + [COLUMNS[k][0] for k in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        cells = [_machine(e["machine"]), f"{e['commit']}, {e['date']}"]
        cells += [_value(e["results"].get(k), COLUMNS[k][1]) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    sources = "; ".join(f"{e['commit']}: {e['source']}" for e in entries)
    return "\n".join(lines) + f"\n\n*Recorded runs ({sources}).*"


def _rate(r: dict | None) -> str:
    if r is None:
        return "–"
    return "out of memory" if r["status"] == "oom" else f"{r['images_per_s']:,.0f} img/s"


def _peaks(off: dict | None, on: dict) -> str:
    gb = lambda r: "–" if r is None or r["status"] != "ok" else f"{r['peak_mem_mb'] / 1024:.1f}"  # noqa: E731
    return f"{gb(off)} / {gb(on)}"


def gpu_sweep_table(files: list[Path]) -> str:
    """Recorded GPU sweeps (``report/bench/gpu-*.json``) as one markdown table: per case, images/s
    with FlashAttention off and on, the ratio, and peak memory off / on."""
    if not files:
        return "*No GPU sweep recorded yet: `bash benchmarks/gpu_speed_study.sh` writes one.*"
    head = "| device | case | off (`naive`) | on (`sdpa`) | on / off | peak GB off / on |"
    lines = [head, "|---|---|---|---|---|---|"]
    devices = []
    for f in files:
        cases: dict[tuple, dict[str, dict]] = {}
        for r in json.loads(Path(f).read_text()):
            key = (r["mode"], r["arch"], r["patch"], r["img_size"], r["tokens"], r["batch"], r["dtype"])
            cases.setdefault(key, {})[r["backend"]] = r
        for (mode, arch, patch, px, tokens, batch, dtype), by in cases.items():
            off, on = by.get("naive"), by.get("sdpa")
            if on is None:
                continue
            case = f"{mode}, {arch}/{patch} at {px} px ({tokens} tokens), batch {batch}, {dtype}"
            ratio = on.get("speedup")  # over naive, as bench.speedups recorded it (none where naive failed)
            lines.append(f"| {on['device']} | {case} | {_rate(off)} | {_rate(on)} | {_value(ratio, '×')} | "
                         f"{_peaks(off, on)} |")  # fmt: skip
            devices.append(f"{on['device']} (torch {on['torch']})")
    names = ", ".join(dict.fromkeys(devices))
    return "\n".join(lines) + f"\n\n*Recorded sweeps: {', '.join(Path(f).name for f in files)}; {names}.*"
