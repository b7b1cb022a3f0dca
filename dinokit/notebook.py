"""What the notebooks share, so that their cells stay about the lesson.

Every notebook's parameters cell names a profile, an optional run name, overrides and a device.
:func:`run_for` turns those into a run folder and config the same way in 03, 04 and 06, so an
ablation trained in 03 (two changed lines) is the run that 04 evaluates and 06 draws.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from pathlib import Path

from dinokit import paths, runs
from dinokit.config import Config, make_config


def run_for(profile: str, run_name: str = "", overrides: Sequence[str] = ()) -> tuple[Path, Config]:
    """(run folder, config) for a notebook's parameters.

    * ``run_name`` given: ``runs/<run_name>``, with that run's own config when it exists;
    * else ``runs/<profile>-<dataset>``, plus a short hash of ``overrides`` when there are any, so a
      variant never reuses (or overwrites) the default run's folder.
    """
    cfg = make_config(profile, list(overrides))
    if run_name:
        run_dir = paths.runs_dir() / run_name
        if (run_dir / runs.CONFIG).is_file():
            cfg = runs.run_config(run_dir)
        return run_dir, cfg
    run_dir = runs.default_run_dir(cfg)
    if overrides:
        digest = hashlib.sha1("\n".join(sorted(overrides)).encode()).hexdigest()[:8]
        run_dir = run_dir.with_name(f"{run_dir.name}-{digest}")
    return run_dir, cfg


def ensure_trained(cfg: Config, run_dir: Path, device: str = "auto") -> str:
    """Train the run, resume it, or open it when finished (checking that it was trained on this data).

    Interrupting the kernel during training saves a checkpoint and returns ``"interrupted"``: the
    following cells then show the partial run.
    """
    from dinokit.data.source import prepare_split, resolve_data_root
    from dinokit.train.loop import pretrain

    done, total = runs.run_progress(run_dir)
    if total and done >= total:
        runs.check_data(run_dir, prepare_split(cfg, progress=False).sha256, resolve_data_root(cfg))
        print(f"opening the finished run in {run_dir.name} ({done} iterations)")
        return "finished"
    if done:
        print(f"resuming {run_dir.name} at iteration {done} of {total}")
    result = pretrain(cfg, out_dir=run_dir, resume=done > 0, device=device)
    if result.status == "interrupted":
        print(f"interrupted at iteration {result.iteration}: the cells below show the partial run; run this "
              "cell again to continue")  # fmt: skip
    return result.status


def report_dir_for(run_dir: Path) -> Path:
    """``report/`` for the profile's own run; ``report/runs/<run>/`` for a variant or the ``ci``
    profile, so a notebook run never overwrites the student's report or demo video."""
    if run_dir == runs.profile_run_dir() and paths.profile() != "ci":
        return paths.report_dir()
    return paths.report_dir() / "runs" / run_dir.name


def expect(condition: bool, message: str) -> bool:
    """A learning expectation: a warning when it fails (a student's ablation may learn less), not an error."""
    if not condition:
        warnings.warn(message, stacklevel=2)
    return bool(condition)


def show_expected(profile: str, keys: list[str]) -> str:
    """Display the recorded runs' results for ``keys`` as a table (``notebooks/expectations.json``):
    the notebooks' "Expect" numbers, never typed by hand."""
    from dinokit.expectations import expected_table

    return _show_markdown(expected_table(profile, keys))


def show_gpu_expected() -> str:
    """Display the recorded GPU sweeps (``report/bench/gpu-*.json``) as one table: notebook 05's
    GPU expectations, each row with its device."""
    from dinokit.expectations import gpu_sweep_table

    return _show_markdown(gpu_sweep_table(sorted((paths.report_dir() / "bench").glob("gpu-*.json"))))


def _show_markdown(table: str) -> str:
    try:
        from IPython.display import Markdown, display

        display(Markdown(table))
    except ImportError:
        print(table)
    return table
