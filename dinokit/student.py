"""``make student``: the students' copy of the notebooks, with the exercises' solutions taken out.

The notebooks in ``notebooks/`` are the instructor's version: every exercise is a code cell whose
solution sits between nbgrader's ``### BEGIN SOLUTION`` / ``### END SOLUTION`` markers, followed
by a locked, graded check cell of asserts. nbgrader's own ``generate_assignment`` builds the
release: solutions become ``raise NotImplementedError()``, outputs are cleared, checks locked.
Each exercise is self-contained (its cell imports what it uses; its check builds its own inputs),
so :func:`run_exercise` can run one solution, or one stub, against its check in isolation.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dinokit import paths

ASSIGNMENT = "dinokit"


@dataclass
class Exercise:
    notebook: str
    grade_id: str  # the solution cell's nbgrader id
    solution: str  # the cell's source (the solution, or in a release the stub)
    check: str  # the graded check cell that follows it


def exercises(notebook: Path) -> list[Exercise]:
    """The notebook's exercises: each solution cell with the first graded cell after it."""
    cells = json.loads(Path(notebook).read_text())["cells"]
    out = []
    for i, cell in enumerate(cells):
        meta = cell.get("metadata", {}).get("nbgrader", {})
        if not meta.get("solution") or cell["cell_type"] != "code":
            continue
        check = next(c for c in cells[i + 1 :] if c.get("metadata", {}).get("nbgrader", {}).get("grade"))
        out.append(Exercise(Path(notebook).stem, meta["grade_id"], "".join(cell["source"]), "".join(check["source"])))
    return out


def run_exercise(exercise: Exercise) -> None:
    """Run the exercise cell, then its check, in a fresh namespace; raises what the check raises."""
    namespace: dict = {"__name__": "__exercise__"}
    exec(compile(exercise.solution, f"<{exercise.grade_id}>", "exec"), namespace)  # noqa: S102
    exec(compile(exercise.check, f"<{exercise.grade_id} check>", "exec"), namespace)  # noqa: S102


def build_student_copy(out_dir: str | Path | None = None, notebooks: str | Path | None = None) -> Path:
    """Write the release notebooks to ``out_dir`` (default ``release/notebooks``) with nbgrader."""
    src = Path(notebooks) if notebooks else paths.repo_root() / "notebooks"
    out = Path(out_dir) if out_dir else paths.repo_root() / "release" / "notebooks"
    with tempfile.TemporaryDirectory(prefix="dinokit-course-") as tmp:
        course = Path(tmp)
        source = course / "source" / ASSIGNMENT
        source.mkdir(parents=True)
        for nb in sorted(src.glob("0*.ipynb")):
            shutil.copy(nb, source / nb.name)
        cmd = [
            sys.executable, "-m", "nbgrader", "generate_assignment", ASSIGNMENT, "--force", "--no-db",
            f"--CourseDirectory.root={course}", "--log-level=WARN",
        ]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"nbgrader generate_assignment failed:\n{result.stdout}\n{result.stderr}")
        out.mkdir(parents=True, exist_ok=True)
        for nb in sorted((course / "release" / ASSIGNMENT).glob("*.ipynb")):
            shutil.copy(nb, out / nb.name)
    return out
