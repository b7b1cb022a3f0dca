"""``make assignment`` / ``dinokit assignment``: the whole deliverable, from a dataset folder to the
report, in stages that survive the end of a session.

Stages, in order: data check -> time-budgeted pre-training -> evaluation (kNN, linear probe,
baselines, Kaggle predictions; the supervised reference only when asked, capped in time) -> the
assignment's speed study (this run's training and testing, FlashAttention on vs off) -> attention
maps and patch PCA -> executed notebooks (when asked) -> report (linking them) -> video.
``RUN/pipeline.json`` records each finished stage with the key of what it was computed from: a stage whose key still
holds is skipped, an interrupted one runs again (pre-training resumes from its checkpoint), and
re-running the same command after a session ends continues with no flags. ``make demo`` is the
same pipeline on the embedded data with the ``cpu-demo`` preset.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from dinokit import paths, runs
from dinokit.config import PRESETS, Config, make_config
from dinokit.device import DeviceKind, device_kind, resolve_device

STATE = "pipeline.json"
PRETRAIN_SHARE = 0.85  # of --hours; evaluation, the speed study and the report take the rest
# har-vits8 (batch 64, no checkpointing) needs about 43 GB: 40/80 GB cards (an A100-40GB reports 39.4 GiB)
BIG_GPU_GIB = 38


def choose_preset(kind: DeviceKind, memory_gib: float | None = None) -> str:
    """``cpu-demo`` on a CPU; ``har-vits8`` on a 40 GB-class GPU or larger; ``har-vits8-16gb`` (batch 32,
    activation checkpointing) on smaller cards."""
    if kind.type != "cuda":
        return "cpu-demo"
    return "har-vits8" if memory_gib is None or memory_gib >= BIG_GPU_GIB else "har-vits8-16gb"


def pretrain_minutes(hours: float) -> float:
    """The pre-training budget inside a whole-pipeline budget of ``hours`` (at least one minute)."""
    if hours <= 0:
        raise ValueError(f"--hours must be positive; got {hours:g}")
    return max(1.0, round(hours * 60 * PRETRAIN_SHARE, 1))


@dataclass
class Context:
    cfg: Config
    run_dir: Path
    device: str
    supervised_minutes: float | None  # None: no supervised reference
    speed_iters: int
    notebooks: bool
    state: dict = field(default_factory=dict)
    memo: dict = field(default_factory=dict)

    def iteration(self) -> int:
        return runs.run_progress(self.run_dir)[0]


@dataclass
class Stage:
    name: str
    title: str
    key: Callable[[Context], str]  # what the stage's result depends on
    done: Callable[[Context], bool]  # its outputs are on disk
    run: Callable[[Context], str]  # does the work; returns a line for the log


def _stamp(ctx: Context, *names: str) -> str:
    """When the named stages last finished: downstream keys change when they re-run."""
    return " ".join(ctx.state.get(n, {}).get("finished", "-") for n in names)


def _config_hash(run_dir: Path) -> str:
    """The run's stored config (the epochs the budget chose included); ``new`` before it exists."""
    path = run_dir / "config.json"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.is_file() else "new"


# --- the stages -------------------------------------------------------------------------------


def _data(ctx: Context) -> str:
    from dinokit.data.source import prepare_split, resolve_data_root

    split = prepare_split(ctx.cfg)
    if (ctx.run_dir / "config.json").is_file():
        runs.check_data(ctx.run_dir, split.sha256, resolve_data_root(ctx.cfg))
    return f"{len(split.classes)} classes; {split.summary()}"


def _data_key(ctx: Context) -> str:
    from dinokit.data.source import prepare_split

    if "split_sha256" not in ctx.memo:  # hashing every image: once per command
        ctx.memo["split_sha256"] = prepare_split(ctx.cfg, progress=False).sha256
    return ctx.memo["split_sha256"]


def _pretrain(ctx: Context) -> str:
    from dinokit.train.loop import pretrain

    done, _ = runs.run_progress(ctx.run_dir)
    result = pretrain(ctx.cfg, out_dir=ctx.run_dir, resume=done > 0, device=ctx.device)
    if result.status != "finished":
        raise Interrupted(f"pre-training {result.status}; run the same command again to resume")
    budget = runs.run_info(ctx.run_dir).get("time_budget")
    return budget["why"] if budget else f"trained {runs.run_progress(ctx.run_dir)[0]} iterations"


def _pretrain_done(ctx: Context) -> bool:
    return runs.is_finished(ctx.run_dir)


def _eval(ctx: Context) -> str:
    from dinokit.eval.run_eval import evaluate_run, no_labels, results_table

    why = no_labels(ctx.run_dir)
    if why:
        return why

    cap = None if ctx.supervised_minutes is None else 60 * ctx.supervised_minutes
    metrics = evaluate_run(ctx.run_dir, device=ctx.device, supervised=cap is not None, supervised_cap_s=cap)
    return results_table(metrics)


def _speed(ctx: Context) -> str:
    from dinokit.run_speed import assignment_speed, format_speed

    warmup = min(5, max(1, ctx.speed_iters // 3))
    path = assignment_speed(ctx.run_dir, ctx.device, iters=ctx.speed_iters, warmup=warmup)
    text = format_speed(json.loads(path.read_text()))
    if ctx.cfg.preset == "cpu-demo":  # the demo also shows where FlashAttention matters: ViT-S/8 at 224 px
        from dinokit.bench import PRESETS, format_table, run_bench, save_records

        sweep = paths.report_dir() / "bench" / "cpu-demo.json"
        if not sweep.is_file():  # inference only: this run's own rows above are the training comparison
            cases = [c for c in PRESETS["cpu-demo"] if c.modes == ("inference",)]
            records = run_bench(cases, device=ctx.device, timm_ref=False, repeats=2)
            save_records(records, sweep)
            text += "\n\n" + format_table(records)
    return f"{text}\nwrote {path}"


def _attention(ctx: Context) -> str:
    from dinokit.viz.attention_run import compute_run_attention

    return f"wrote {compute_run_attention(ctx.run_dir, device=ctx.device)}"


def _report(ctx: Context) -> str:
    from dinokit.report import build_report

    return f"wrote {build_report(ctx.run_dir)}"


def _report_done(ctx: Context) -> bool:
    md = paths.report_dir() / "report.md"
    return md.is_file() and f"report: {ctx.run_dir.name}\n" in md.read_text()[:500]


def _notebooks(ctx: Context) -> str:
    if runs.default_run_dir(ctx.cfg).resolve() != ctx.run_dir.resolve():
        return f"skipped: the notebooks open runs/<preset>-<dataset>, not {ctx.run_dir} (use the default --out)"
    env = {**os.environ, "DINOKIT_PROFILE": ctx.cfg.preset}
    if ctx.cfg.data.root:
        env["DINOKIT_DATA"] = str(ctx.cfg.data.root)
    out = paths.report_dir() / "notebooks"
    notebooks = sorted((paths.repo_root() / "notebooks").glob("0*.ipynb"))
    cmd = [
        sys.executable,
        "-m",
        "jupyter",
        "nbconvert",
        "--to",
        "html",
        "--execute",
        "--ExecutePreprocessor.timeout=-1",
        "--output-dir",
        str(out),
        *map(str, notebooks),
    ]
    subprocess.run(cmd, check=True, env=env)
    return f"wrote {len(notebooks)} executed notebooks to {out}"


def _video(ctx: Context) -> str:
    from dinokit.viz.video import build_video

    return f"wrote {build_video(ctx.run_dir)}"


def _run_config_key(ctx: Context) -> str:
    return _config_hash(ctx.run_dir)


def _at_iteration(ctx: Context) -> str:
    """The trained weights: which pre-training (a retrained run may end at the same iteration) and where."""
    return f"{_stamp(ctx, 'pretrain')} it{ctx.iteration()}"


def _supervised_seconds(ctx: Context) -> float | None:
    """The supervised reference's training time as it will be capped (None: not asked for)."""
    if ctx.supervised_minutes is None:
        return None
    trained = runs.run_info(ctx.run_dir).get("train_seconds", 0.0) if (ctx.run_dir / "run_info.json").is_file() else 0.0
    return round(min(60 * ctx.supervised_minutes, trained or float("inf")))


def _speed_file(ctx: Context) -> Path:
    return paths.report_dir() / "bench" / f"assignment-{ctx.run_dir.name}.json"


STAGES = [
    Stage("data", "data check: the dataset and its fixed split", _data_key, lambda c: True, _data),
    Stage(
        "pretrain", "pre-training, within the time budget", lambda c: _config_hash(c.run_dir), _pretrain_done, _pretrain
    ),
    Stage(
        "eval",
        "evaluation on the held-out split (kNN, linear probe, baselines, predictions.csv)",
        lambda c: f"{_stamp(c, 'pretrain')} it{c.iteration()} supervised={_supervised_seconds(c)}",
        lambda c: any((c.run_dir / "eval" / name).is_file() for name in ("metrics.json", "skipped.json")),
        _eval,
    ),
    Stage(
        "speed",
        "speed study of this run's recipe: FlashAttention on vs off, training and testing",
        lambda c: f"{_stamp(c, 'pretrain')} {_config_hash(c.run_dir)} iters={c.speed_iters}",
        lambda c: _speed_file(c).is_file(),
        _speed,
    ),
    Stage(
        "attention",
        "attention maps and patch PCA of held-out images",
        _at_iteration,
        lambda c: (c.run_dir / "attention" / "maps.pt").is_file(),
        _attention,
    ),
    Stage(
        "notebooks",
        "the six notebooks, executed, as HTML",
        _at_iteration,
        lambda c: (paths.report_dir() / "notebooks").is_dir(),
        _notebooks,
    ),
    Stage(
        "report",
        "report (from saved artifacts)",
        lambda c: _stamp(c, "eval", "speed", "attention", "notebooks"),
        _report_done,
        _report,
    ),
    Stage(
        "video",
        "demo video (from saved artifacts)",
        lambda c: _stamp(c, "report"),
        lambda c: any((paths.report_dir() / f"demo.{s}").is_file() for s in ("mp4", "gif")),
        _video,
    ),
]


class Interrupted(RuntimeError):
    """A stage stopped before its end (Ctrl-C, a time budget); its work so far is kept."""


# --- state and the plan ------------------------------------------------------------------------


def load_state(run_dir: Path) -> dict:
    path = run_dir / STATE
    try:
        return json.loads(path.read_text()).get("stages", {}) if path.is_file() else {}
    except (OSError, ValueError):
        return {}  # an unreadable state only costs re-running stages; their outputs are still checked


def _save_state(ctx: Context) -> None:
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    tmp = ctx.run_dir / (STATE + ".tmp")
    tmp.write_text(json.dumps({"stages": ctx.state}, indent=1) + "\n")
    tmp.replace(ctx.run_dir / STATE)


def applies(stage: Stage, ctx: Context) -> bool:
    return stage.name != "notebooks" or ctx.notebooks


def is_current(stage: Stage, ctx: Context) -> bool:
    """Finished before, from the same inputs, and its outputs still on disk."""
    return ctx.state.get(stage.name, {}).get("key") == stage.key(ctx) and stage.done(ctx)


def estimate_seconds(stage: str, ctx: Context) -> float | None:
    """Expected seconds for a stage on this machine: its own last duration, else from the run's timing."""
    if stage in ctx.state:
        return ctx.state[stage]["seconds"]
    info = runs.run_info(ctx.run_dir) if (ctx.run_dir / "run_info.json").is_file() else {}
    budget = info.get("time_budget") or {}
    if stage == "pretrain":
        minutes = budget.get("minutes") or ctx.cfg.train.time_budget_min
        done, total = runs.run_progress(ctx.run_dir)
        return 60 * minutes * (1 - done / total if total else 1) if minutes else None  # what is left of it
    step_s, knn_s = budget.get("step_s"), budget.get("knn_s")
    if not step_s and info.get("train_seconds") and info.get("total_iters"):  # no budget: the run's own pace
        step_s = info["train_seconds"] / info["total_iters"]
    if stage == "eval" and knn_s:  # features of 3-4 networks over every image, probes, Jaccard
        return 4 * knn_s + 30 + 60 * (ctx.supervised_minutes or 0)
    if stage == "speed" and step_s:
        return 2 * (ctx.speed_iters + min(5, max(1, ctx.speed_iters // 3))) * step_s + 2 * (knn_s or 0) + 40
    return {"data": 5, "attention": 10, "report": 15, "video": 15}.get(stage)


def _minutes(seconds: float | None) -> str:
    return "unknown" if seconds is None else f"{seconds / 60:.1f} min"


def plan_text(ctx: Context, stages: list[Stage]) -> str:
    done = [s.name for s in stages if applies(s, ctx) and is_current(s, ctx)]
    todo = [s for s in stages if applies(s, ctx) and s.name not in done]
    rest = [estimate_seconds(s.name, ctx) for s in todo]
    known = sum(r for r in rest if r is not None)
    lines = [f"done: {', '.join(done) or 'nothing yet'}"]
    if todo:
        parts = ", ".join(f"{s.name} ~{_minutes(r)}" for s, r in zip(todo, rest, strict=True))
        unknown = [s.name for s, r in zip(todo, rest, strict=True) if r is None]
        more = (
            f"at least {_minutes(known)} ({', '.join(unknown)}: not timed yet)"
            if unknown
            else f"about {_minutes(known)}"
        )
        lines.append(f"to do: {parts}; expected {more} more on this machine")
    return "\n".join(lines)


def _banner(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


# --- the pipeline ------------------------------------------------------------------------------


def run_assignment(
    preset: str | None = None,
    data: str | None = None,
    hours: float | None = None,
    device: str = "auto",
    out_dir: str | Path | None = None,
    overrides: list[str] | None = None,
    supervised_minutes: float | None = None,
    speed_iters: int = 30,
    notebooks: bool = False,
) -> dict:
    """Run every stage that is not current; returns ``{"status", "run_dir", "ran", "skipped", "timings"}``."""
    torch_device = resolve_device(device)  # fail early on a device this machine does not have
    kind = device_kind(torch_device)
    overrides = list(overrides or [])
    if data:
        overrides.append(f"data.root={data}")
    if preset is None:  # the run already started on this data (another session's GPU), else the device's
        preset = existing_preset(overrides, out_dir) or choose_preset(kind, _gpu_memory_gib(torch_device))
    if hours is not None:
        overrides.append(f"train.time_budget_min={pretrain_minutes(hours)}")
    cfg = make_config(preset, overrides)
    run_dir = Path(out_dir) if out_dir else runs.default_run_dir(cfg)
    if hours is not None and (run_dir / "config.json").is_file():
        print(f"note: {run_dir} already holds a run; it keeps its own budget and epochs (config.json), not --hours")
    ctx = Context(cfg, run_dir, str(torch_device), supervised_minutes, speed_iters, notebooks, load_state(run_dir))
    print(f"dinokit assignment: preset {preset} on {kind.name or kind.type}, run folder {run_dir}")
    print(plan_text(ctx, STAGES), flush=True)
    ran, skipped, timings = [], [], {}
    begin = time.perf_counter()
    for number, stage in enumerate(STAGES, 1):
        _banner(f"{number}/{len(STAGES)} {stage.title}")
        if not applies(stage, ctx):
            print("skipped (not asked: --notebooks executes them; minutes on a CPU, they train their own ablations)")
            continue
        if is_current(stage, ctx):
            print(f"current: finished {ctx.state[stage.name]['finished']}; skipped")
            skipped.append(stage.name)
            continue
        start = time.perf_counter()
        try:
            print(stage.run(ctx))
        except Interrupted as exc:
            print(str(exc))
            return {"status": "interrupted", "run_dir": str(run_dir), "ran": ran, "skipped": skipped}
        seconds = time.perf_counter() - start
        finished = datetime.now(timezone.utc).isoformat(timespec="microseconds")
        ctx.state[stage.name] = {"key": stage.key(ctx), "seconds": round(seconds, 1), "finished": finished}
        _save_state(ctx)
        ran.append(stage.name)
        timings[f"{stage.name}_s"] = seconds
        if number < len(STAGES):
            print(plan_text(ctx, STAGES), flush=True)
    timings["total_s"] = time.perf_counter() - begin
    print("timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    print(f"results in {run_dir} and {paths.report_dir()} (report.html, demo video)")
    return {"status": "finished", "run_dir": str(run_dir), "ran": ran, "skipped": skipped, "timings": timings}


def existing_preset(overrides: list[str], out_dir: str | Path | None) -> str | None:
    """The preset of the run this command would continue: ``--out``'s, else the newest run of any
    preset on this data that the pipeline has started (so a new session on another GPU continues it)."""
    from dinokit.data.source import data_tag

    if out_dir:
        folders = [Path(out_dir)]
    else:
        tag = data_tag(make_config("default", overrides))
        folders = sorted(paths.runs_dir().glob(f"*-{tag}"), key=lambda d: (d / STATE).stat().st_mtime
                         if (d / STATE).is_file() else 0.0, reverse=True)  # fmt: skip
        folders = [d for d in folders if (d / STATE).is_file() and d.name.removesuffix(f"-{tag}") in PRESETS]
    for folder in folders:
        if (folder / "config.json").is_file():
            return runs.run_config(folder).preset
    return None


def _gpu_memory_gib(device) -> float | None:
    if device.type != "cuda":
        return None
    import torch

    return torch.cuda.get_device_properties(device).total_memory / 2**30


def run_demo(
    preset: str = "cpu-demo",
    out_dir: str | Path | None = None,
    overrides: list[str] | None = None,
    device: str = "auto",
) -> dict:
    """``make demo``: the pipeline on the embedded data, with a supervised reference capped at 1.5 min."""
    return run_assignment(preset, None, None, device, out_dir, overrides, supervised_minutes=1.5)
