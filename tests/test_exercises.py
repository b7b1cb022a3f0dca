"""The exercises: each check passes on the instructor's solution and fails on the student's stub
and on a typical mistake.

The student copy is built by nbgrader's own ``generate_assignment`` (``make student``), so this
also proves the release builds, and that no check is vacuous.
"""

import dataclasses
import json
from pathlib import Path

import pytest

from dinokit import paths
from dinokit.student import build_student_copy, exercises, run_exercise

NOTEBOOKS = sorted((paths.repo_root() / "notebooks").glob("0*.ipynb"))
# the exercises the course asks for, per notebook (issue: 02 x3, 03 x3, 05 x1, 06 x1)
EXPECTED = {
    "02_dino_loss_walkthrough": {"dino_loss_by_hand", "update_centre", "sinkhorn_by_hand"},
    "03_dinov2_pretraining": {"ema_by_hand", "koleo_by_hand", "ibot_weights_by_hand"},
    "05_flashattention_speed": {"online_softmax_attention"},
    "06_attention_maps": {"cls_attention_by_hand"},
}


# One plausible mistake per exercise: its check must reject it (a check that only catches the stub's
# NotImplementedError would prove nothing).
MISTAKES = {
    "dino_loss_by_hand": ("(teacher_logits - centre)", "teacher_logits"),  # centering forgotten
    "update_centre": ("momentum * centre + (1 - momentum)", "(1 - momentum) * centre + momentum"),
    "sinkhorn_by_hand": ("teacher_logits.max()", "teacher_logits.max(dim=-1, keepdim=True).values"),  # per image
    "ema_by_hand": (
        "mul_(momentum).add_(s.detach(), alpha=1 - momentum)",
        "mul_(1 - momentum).add_(s.detach(), alpha=momentum)",
    ),
    "koleo_by_hand": ('distances.fill_diagonal_(float("inf"))', "pass"),  # each feature its own neighbour
    "ibot_weights_by_hand": ("masks.sum(dim=1, keepdim=True)", "masks.sum()"),  # one weight for the batch
    "online_softmax_attention": ("denominator = rescale * denominator", "denominator = denominator"),  # no rescale
    "cls_attention_by_hand": ("[:, :, 0, n_prefix:]", "[:, :, 0, 1:]"),  # registers kept
}


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_student_copy(tmp_path_factory.mktemp("release"))


def test_the_instructor_notebooks_hold_the_exercises_the_course_asks_for() -> None:
    found = {nb.stem: {e.grade_id for e in exercises(nb)} for nb in NOTEBOOKS}
    for name, wanted in EXPECTED.items():
        assert wanted <= found[name], f"{name}: missing {wanted - found[name]}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_each_check_passes_on_the_solution_and_fails_on_the_stub(notebook: Path, release: Path) -> None:
    solved = {e.grade_id: e for e in exercises(notebook)}
    stubbed = {e.grade_id: e for e in exercises(release / notebook.name)}
    assert stubbed.keys() == solved.keys()
    for grade_id, exercise in solved.items():
        run_exercise(exercise)  # the solution passes its check
        stub = stubbed[grade_id]
        assert "### BEGIN SOLUTION" not in stub.solution and "raise NotImplementedError()" in stub.solution
        assert stub.check == exercise.check  # the check itself is released unchanged
        with pytest.raises((NotImplementedError, AssertionError)):
            run_exercise(stub)
        old, new = MISTAKES[grade_id]
        assert old in exercise.solution, f"{grade_id}: the mistake no longer applies to the solution"
        with pytest.raises(AssertionError):
            run_exercise(dataclasses.replace(exercise, solution=exercise.solution.replace(old, new)))


def test_the_release_has_no_outputs_and_no_solutions(release: Path) -> None:
    for notebook in NOTEBOOKS:
        cells = json.loads((release / notebook.name).read_text())["cells"]
        assert not any("BEGIN SOLUTION" in "".join(c["source"]) for c in cells)
        assert all(c.get("outputs", []) == [] for c in cells)
