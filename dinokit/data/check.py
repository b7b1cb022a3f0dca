"""``dinokit data check``: is this data root usable, and what is in it?"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from dinokit.data.har import HarData, load_dataset
from dinokit.data.images import BadImage, ProblemLog, load_rgb
from dinokit.data.split import Split, make_split


@dataclass
class CheckReport:
    data: HarData
    split: Split | None
    problems: ProblemLog
    sizes: Counter = field(default_factory=Counter)  # (width, height) -> count
    usable: bool = True
    reason: str = ""

    def text(self) -> str:
        d = self.data
        lines = [
            f"root:      {d.root}",
            f"layout:    {d.layout}",
            f"classes:   {len(d.classes)}",
            f"labelled:  {len(d.labeled)}   unlabelled: {len(d.unlabeled)}",
            "images per class:",
        ]
        lines += [f"  {name:<22} {count}" for name, count in d.class_counts().items()]
        if self.sizes:
            common = ", ".join(f"{w}x{h} ({n})" for (w, h), n in self.sizes.most_common(3))
            lines.append(f"image sizes: {len(self.sizes)} distinct; most common {common}")
        if self.split is not None:
            lines.append(f"split:     {self.split.summary()}")
            lines.append(f"split sha256: {self.split.sha256}")
        lines.append(f"problems:  {self.problems.summary()}")
        lines.append("usable:    yes" if self.usable else f"usable:    NO ({self.reason})")
        return "\n".join(lines)


def check_dataset(root: str | Path, decode: bool = True, val_fraction: float = 0.2, seed: int = 0) -> CheckReport:
    """Read ``root``, decode every image (unless ``decode`` is False) and build the split."""
    data = load_dataset(root)
    problems = ProblemLog()
    problems.merge(data.problems)
    sizes: Counter = Counter()
    good_labeled = []
    if decode:
        for rec in tqdm(data.labeled + data.unlabeled, desc="decoding images", leave=False):
            try:
                sizes[load_rgb(rec.source).size] += 1
                if rec.label >= 0:
                    good_labeled.append(rec)
            except BadImage as exc:
                problems.add(rec.name, str(exc))
        data.labeled = good_labeled
    report = CheckReport(data, None, problems, sizes)
    counts = data.class_counts()
    too_small = [name for name, n in counts.items() if 0 < n < 2]
    if not data.labeled:
        report.usable, report.reason = False, "no readable labelled images"
    elif too_small:
        report.usable, report.reason = False, f"classes with fewer than 2 images cannot be split: {too_small}"
    else:
        report.split = make_split(data, val_fraction, seed)
    return report
