"""The ``dinokit`` command: one subcommand per job, each a thin call into the package."""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

from dinokit import paths


def _cmd_data_check(args: argparse.Namespace) -> int:
    from dinokit.data.check import check_dataset

    report = check_dataset(args.root, decode=not args.no_decode, val_fraction=args.val_fraction, seed=args.seed)
    print(report.text())
    return 0 if report.usable else 1


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from dinokit.data.synth import generate

    start = time.perf_counter()
    out = generate(args.out, per_class=args.per_class, size=args.size, seed=args.seed)
    print(f"wrote the embedded dataset to {out} in {time.perf_counter() - start:.1f} s")
    return 0


def _cmd_data_split(args: argparse.Namespace) -> int:
    from dinokit.data.har import load_dataset
    from dinokit.data.split import make_split

    data = load_dataset(args.root)
    split = make_split(data, args.val_fraction, args.seed)
    out = Path(args.out) if args.out else paths.data_dir() / "splits" / f"{Path(args.root).resolve().name}.csv"
    sha = split.write_manifest(out)
    print(split.summary())
    print(f"manifest: {out}")
    print(f"sha256:   {sha}")
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from dinokit.config import make_config
    from dinokit.device import resolve_device
    from dinokit.runs import default_run_dir
    from dinokit.train.dist import close_distributed
    from dinokit.train.loop import pretrain

    device = resolve_device(args.device)  # before any work: a clear error if the device is missing
    overrides = list(args.set or [])
    if args.data:
        overrides.append(f"data.root={args.data}")
    cfg = make_config(args.preset, overrides)
    if args.resume:
        cfg = _resume_config(Path(args.out) if args.out else default_run_dir(cfg), overrides)
    result = pretrain(cfg, out_dir=args.out, resume=args.resume, device=device)
    close_distributed()  # under torchrun (after an error, torchrun stops the other processes)
    print(f"run directory: {result.run_dir} ({result.status})")
    return 0 if result.status in ("finished", "interrupted") else 1


def _resume_config(run_dir: Path, overrides: list[str]):
    """A resumed run keeps its own config; only settings that change how it computes may change."""
    from dinokit.config import Config, apply_override
    from dinokit.train.loop import RESUMABLE_KEYS

    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"--resume: {run_dir} holds no run (no config.json); start it without --resume")
    cfg = Config.load(run_dir / "config.json")
    for text in overrides:
        key, _, value = (part.strip() for part in text.partition("="))
        if key not in RESUMABLE_KEYS:
            asked_cfg = copy.deepcopy(cfg)
            apply_override(asked_cfg, key, value)
            stored, asked = _setting(cfg, key), _setting(asked_cfg, key)
            if _same_setting(key, stored, asked) or asked == _chosen_before(run_dir, cfg, key):
                continue  # the original command again, with --resume: nothing changes
            raise ValueError(
                f"{key} cannot change when resuming {run_dir} (it would make a different run): the run has "
                f"{stored!r}, this command asks for {asked!r}. These can change: {', '.join(RESUMABLE_KEYS)}. "
                "Start a new run with --out for other changes."
            )
        apply_override(cfg, key, value)
    return cfg


def _setting(cfg, key: str):
    section, name = key.split(".", 1)
    return getattr(getattr(cfg, section), name)


def _chosen_before(run_dir: Path, cfg, key: str):
    """What the original command said for a setting the time budget then rewrote in config.json:
    the budget's minutes (stored as 0 once spent) and the recipe's epochs (stored as those that fit)."""
    from dinokit.runs import run_info

    if key == "train.time_budget_min":
        return run_info(run_dir).get("time_budget", {}).get("minutes")
    if key == "optim.epochs":
        return cfg.optim.recipe_epochs or None
    return None


def _same_setting(key: str, stored, asked) -> bool:
    """Equal values, or the same folder written two ways (relative, absolute, a trailing slash)."""
    if key == "data.root" and stored and asked:
        return Path(stored).expanduser().resolve() == Path(asked).expanduser().resolve()
    return stored == asked


def _cmd_demo(args: argparse.Namespace) -> int:
    from dinokit.assignment import run_demo

    results = run_demo(args.preset, args.out, args.set, device=args.device)
    return 0 if results["status"] == "finished" else 1


def _cmd_assignment(args: argparse.Namespace) -> int:
    from dinokit.assignment import run_assignment

    results = run_assignment(
        args.preset, args.data, args.hours, args.device, args.out, args.set, args.supervised, args.speed_iters,
        args.notebooks,
    )  # fmt: skip
    return 0 if results["status"] == "finished" else 1


def _cmd_bench(args: argparse.Namespace) -> int:
    from dinokit.bench import PRESETS, format_table, run_bench, save_records

    cases = PRESETS[args.preset]
    if args.modes:
        for case in cases:
            case.modes = tuple(m for m in case.modes if m in args.modes)
    records = run_bench(cases, backends=args.backends, warmup=args.warmup, repeats=args.repeats, device=args.device)
    print(format_table(records))
    out = save_records(records, args.out or paths.report_dir() / "bench" / f"{args.preset}.json")
    print(f"\nwrote {out}")
    return 0 if all(r.status in ("ok", "oom") for r in records) else 1


def _cmd_eval(args: argparse.Namespace) -> int:
    from dinokit.eval.run_eval import evaluate_run, results_table

    both = not (args.knn or args.linear)
    metrics = evaluate_run(
        args.run_dir, args.data, args.which, baselines=not args.no_baselines,
        knn=args.knn or both, linear=args.linear or both, device=args.device,
        supervised=True if args.supervised else None,
    )  # fmt: skip
    print(results_table(metrics))
    if "linear" in metrics:
        print(f"\nlinear probe: {metrics['linear']['feature']} features, lr {metrics['linear']['lr']:g}")
    print(f"evaluation took {metrics['seconds']:.0f} s")
    print(f"wrote {Path(args.run_dir) / 'eval'}/{{metrics.json, per_class.csv, confusion.npy, predictions.csv}}")
    return 0


def _default_run(run_dir: str | None) -> Path:
    """The run of ``DINOKIT_PROFILE`` on the data in use: ``runs/<profile>-<dataset>``."""
    from dinokit.runs import profile_run_dir

    return Path(run_dir) if run_dir else profile_run_dir()


def _cmd_attention(args: argparse.Namespace) -> int:
    from dinokit.viz.attention_run import compute_run_attention

    out = compute_run_attention(_default_run(args.run_dir), args.images, args.size, device=args.device)
    print(f"wrote {out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from dinokit.report import build_report

    start = time.perf_counter()
    out = build_report(_default_run(args.run_dir), args.out)
    print(f"wrote {out} and {out.with_suffix('.md')} in {time.perf_counter() - start:.1f} s")
    return 0


def _cmd_video(args: argparse.Namespace) -> int:
    from dinokit.viz.video import build_video, probe

    start = time.perf_counter()
    out = build_video(_default_run(args.run_dir), args.out)
    info = probe(out) if out.suffix == ".mp4" else {}
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s {info}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from dinokit.export import export_run

    out = export_run(_default_run(args.run_dir), args.out)
    print(f"wrote {out}/model.safetensors, timm_kwargs.json and MODEL_CARD.md (it shows the timm call)")
    return 0


def _cmd_expectations(args: argparse.Namespace) -> int:
    from dinokit.expectations import expectations_path, record_run

    entry = record_run(_default_run(args.run_dir), args.source, commit=args.commit)
    print(f"recorded {entry['profile']} on {entry['machine']['cpu']} ({entry['commit']}) in {expectations_path()}")
    return 0


def _cmd_student(args: argparse.Namespace) -> int:
    from dinokit.student import build_student_copy

    out = build_student_copy(args.out)
    print(f"wrote the students' notebooks (solutions replaced by stubs, outputs cleared) to {out}")
    return 0


def _device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto", metavar="auto|cpu|cuda|cuda:N", help="where to compute (auto: CUDA when present)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinokit", description="DINOv2 self-supervised pre-training kit.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="dataset tools: check, synth, split").add_subparsers(
        dest="data_command", required=True
    )
    check = data.add_parser("check", help="report layout, class counts, split and bad files of a data root")
    check.add_argument("root", help="HAR root (Kaggle layout, HF parquet or class folders)")
    check.add_argument("--no-decode", action="store_true", help="skip decoding every image (faster)")
    check.add_argument("--val-fraction", type=float, default=0.2)
    check.add_argument("--seed", type=int, default=0)
    check.set_defaults(func=_cmd_data_check)

    synth = data.add_parser("synth", help="generate the embedded dataset (Kaggle layout)")
    synth.add_argument("out", help="output folder")
    synth.add_argument("--per-class", type=int, default=300)
    synth.add_argument("--size", type=int, default=64, help="image side in pixels")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=_cmd_data_synth)

    split = data.add_parser("split", help="write the fixed split manifest and print its sha256")
    split.add_argument("root")
    split.add_argument("--out", help="manifest path (default: data/splits/<root name>.csv)")
    split.add_argument("--val-fraction", type=float, default=0.2)
    split.add_argument("--seed", type=int, default=0)
    split.set_defaults(func=_cmd_data_split)

    from dinokit.config import PRESETS

    pretrain = sub.add_parser("pretrain", help="DINOv2 self-supervised pre-training")
    pretrain.add_argument("--preset", default="cpu-demo", choices=["default", *PRESETS])
    pretrain.add_argument("--data", help="data root (default: DINOKIT_DATA or the embedded dataset)")
    pretrain.add_argument("--out", help="run directory (default: runs/<preset>-<dataset>)")
    pretrain.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.epochs=10")
    pretrain.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    _device_option(pretrain)
    pretrain.set_defaults(func=_cmd_pretrain)

    evaluate = sub.add_parser("eval", help="kNN + linear probe of a run, with baselines, on the held-out split")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--data", help="data root (default: the one the run was trained on)")
    evaluate.add_argument("--which", default="teacher", choices=["teacher", "student"])
    evaluate.add_argument("--no-baselines", action="store_true", help="skip random-init and pixel baselines")
    evaluate.add_argument("--knn", action="store_true", help="kNN only (default: kNN and linear)")
    evaluate.add_argument("--linear", action="store_true", help="linear probe only (default: kNN and linear)")
    evaluate.add_argument(
        "--supervised", action="store_true",
        help="also train the supervised reference for the run's training time (default: time-budgeted runs only)",
    )  # fmt: skip
    _device_option(evaluate)
    evaluate.set_defaults(func=_cmd_eval)

    from dinokit.bench import MODES
    from dinokit.bench import PRESETS as BENCH_PRESETS

    bench = sub.add_parser("bench", help="FlashAttention on vs off: inference and training speed, memory")
    bench.add_argument("--preset", default="cpu-quick", choices=list(BENCH_PRESETS))
    bench.add_argument("--backends", nargs="*", help="default: naive, sdpa (+ sdpa-efficient, flash-attn on CUDA)")
    bench.add_argument("--modes", nargs="*", choices=MODES, help="default: each case's modes")
    bench.add_argument("--warmup", type=int, default=1)
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--out", help="JSON path (default: report/bench/<preset>.json)")
    _device_option(bench)
    bench.set_defaults(func=_cmd_bench)

    attention = sub.add_parser("attention", help="CLS attention maps of held-out images, per checkpoint")
    attention.add_argument("run_dir", nargs="?", help="default: runs/$DINOKIT_PROFILE-<dataset>")
    attention.add_argument("--images", type=int, default=8)
    attention.add_argument(
        "--size",
        type=int,
        help="image size (rounded to a patch multiple); default: crops.attention_size, else the eval size",
    )
    _device_option(attention)
    attention.set_defaults(func=_cmd_attention)

    report = sub.add_parser("report", help="rebuild report/figures and report/report.{md,html} from saved results")
    report.add_argument("run_dir", nargs="?", help="default: runs/$DINOKIT_PROFILE-<dataset>")
    report.add_argument("--out", help="report folder (default: report/)")
    report.set_defaults(func=_cmd_report)

    video = sub.add_parser("video", help="the demo video (MP4, GIF fallback) from saved results")
    video.add_argument("run_dir", nargs="?", help="default: runs/$DINOKIT_PROFILE-<dataset>")
    video.add_argument("--out", help="default: report/demo.mp4")
    video.set_defaults(func=_cmd_video)

    export = sub.add_parser("export", help="the run's teacher as timm-loadable safetensors, with a model card")
    export.add_argument("run_dir", nargs="?", help="default: runs/$DINOKIT_PROFILE-<dataset>")
    export.add_argument("--out", help="default: RUN/export/")
    export.set_defaults(func=_cmd_export)

    assignment = sub.add_parser(
        "assignment",
        help="the whole deliverable: data check, pre-training, evaluation, speed study, maps, report, video; "
        "stages already done are skipped, an interrupted one resumes",
    )
    assignment.add_argument(
        "--data", help="data root (default: DINOKIT_DATA, else HAR under /kaggle/input, else the embedded dataset)"
    )
    assignment.add_argument(
        "--hours", type=float, help="the whole budget; 85 %% of it goes to pre-training (default: the preset's own)"
    )
    assignment.add_argument(
        "--preset",
        choices=["default", *PRESETS],
        help="default: this data's existing run, else har-vits8 on a 40/80 GB GPU, har-vits8-16gb below, "
        "cpu-demo on a CPU",
    )
    assignment.add_argument("--out", help="run directory (default: runs/<preset>-<dataset>)")
    assignment.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="config overrides")
    assignment.add_argument(
        "--supervised",
        type=float,
        nargs="?",
        const=10.0,
        metavar="MINUTES",
        help="also train the supervised reference, for at most MINUTES (default 10)",
    )
    assignment.add_argument("--speed-iters", type=int, default=30, help="training steps timed each way (default 30)")
    assignment.add_argument("--notebooks", action="store_true", help="also execute the six notebooks to HTML")
    _device_option(assignment)
    assignment.set_defaults(func=_cmd_assignment)

    record = sub.add_parser("expectations", help="record a finished, evaluated run as the notebooks' expected results")
    record.add_argument("run_dir", nargs="?", help="default: runs/$DINOKIT_PROFILE-<dataset>")
    record.add_argument("--source", required=True, help="how the run was made, e.g. 'time make demo, fresh clone'")
    record.add_argument("--commit", help="the code the run was made with (default: this checkout's)")
    record.set_defaults(func=_cmd_expectations)

    student = sub.add_parser("student", help="the students' copy of the notebooks (nbgrader generate_assignment)")
    student.add_argument("--out", help="default: release/notebooks")
    student.set_defaults(func=_cmd_student)

    demo = sub.add_parser("demo", help="the assignment pipeline on the embedded dataset with cpu-demo (resumable)")
    demo.add_argument("--preset", default="cpu-demo", choices=["default", *PRESETS])
    demo.add_argument("--out", help="run directory (default: runs/<preset>-<dataset>)")
    demo.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="config overrides")
    _device_option(demo)
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    from dinokit.data.har import DatasetError
    from dinokit.runs import RunError

    try:
        return args.func(args)
    except (DatasetError, RunError, KeyError, ValueError, FileNotFoundError, FileExistsError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"dinokit: error: {message}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # training diverged or ran out of memory: the message says what to do
        if type(exc).__name__ not in ("TrainingDiverged", "TrainingOutOfMemory"):
            raise
        print(f"dinokit: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
