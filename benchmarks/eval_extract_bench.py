"""Feature extraction's rate before and after issue 19's uint8 loader and decoded-set cache.

``before`` is the extraction as it was (commit 825050c): each image decoded, resized, turned into
float and normalised in the main process (0 workers), no cache. The ``after`` variants are
:func:`dinokit.eval.features.extract_features` today: decoding in 0 or 1 loader workers with the
cache off, a first call that decodes and writes the cache, and a call that finds it (what the kNN
monitor does from its second check on), and two more readings of the cache: ``cached-full`` with
the full forward that the CLS path ran before its last block was cut to the CLS token, and
``cached-all-kinds``, the four feature kinds ``dinokit eval`` extracts (they need every token of
the last block). Each measurement runs in a fresh process, after one
untimed forward, with the variants' order alternating over rounds; median and range per variant,
and each round's ratio to ``before``. The data is the embedded dataset of ``--preset``, the
backbone that preset's architecture (random weights: the rate does not depend on them).

    python benchmarks/eval_extract_bench.py [--preset cpu-demo] [--set KEY=VALUE ...] [--rounds 4] [--passes 1] \\
        [--limit 0] [--variants before decode-w0 decode-w1 first-call cached cached-full cached-all-kinds]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

VARIANTS = {
    "before": "the extraction of commit 825050c: float per image, 0 workers, no cache",
    "decode-w0": "uint8 loader, 0 workers, cache off",
    "decode-w1": "uint8 loader, 1 worker, cache off",
    "first-call": "uint8 loader (default workers), decodes and writes the cache",
    "cached": "reads the cache back (the kNN monitor from its second check on)",
    "cached-full": "reads the cache back, the full forward (the CLS path before its CLS-only last block)",
    "cached-all-kinds": "reads the cache back, the four feature kinds of `dinokit eval` (full forward)",
}
DEFAULT_VARIANTS = ["before", "decode-w0", "first-call", "cached"]


def _old_extract(backbone, records, size: int, device: torch.device, precision: str, batch: int = 128) -> torch.Tensor:
    """The extraction loop of commit 825050c, cut to what the timing needs (cls features only, by
    the full forward ``backbone(images)``, as then)."""
    from torch.utils.data import DataLoader, Dataset

    from dinokit.data.crops import eval_transform
    from dinokit.data.images import BadImage, load_rgb
    from dinokit.precision import autocast

    class FloatEval(Dataset):
        transform = eval_transform(size)

        def __len__(self) -> int:
            return len(records)

        def __getitem__(self, i: int):
            try:
                return self.transform(load_rgb(records[i].source))
            except BadImage:
                return None

    def stack(items):
        return torch.stack([i for i in items if i is not None])

    feats = []
    with torch.no_grad():
        loader = DataLoader(
            FloatEval(), batch_size=batch, num_workers=0, collate_fn=stack, pin_memory=device.type == "cuda"
        )
        for images in loader:
            with autocast(precision, device):
                feats.append(backbone(images.to(device, non_blocking=True)).float().cpu())
    return torch.cat(feats)


def _records_and_backbone(preset: str, overrides: list[str], limit: int):
    from dinokit.config import make_config
    from dinokit.data.har import load_dataset
    from dinokit.data.source import resolve_data_root
    from dinokit.models.ssl import build_architecture

    cfg = make_config(preset, overrides)
    records = load_dataset(resolve_data_root(cfg)).labeled
    torch.manual_seed(0)
    backbone = build_architecture(cfg.model, cfg.crops.global_size).backbone.eval()
    return (records[:limit] if limit else records), backbone, cfg.crops.eval_size


def measure(
    variant: str,
    preset: str,
    overrides: list[str],
    limit: int,
    device: str,
    precision: str,
    cache_dir: str,
    passes: int = 1,
) -> dict:
    """Images per second of one variant, in this (fresh) process: the median of ``passes`` passes."""
    from dinokit.eval import features
    from dinokit.eval.features import FEATURE_KINDS

    if "fork" in multiprocessing.get_all_start_methods():  # a spawned child inherits "spawn": loader workers
        multiprocessing.set_start_method("fork", force=True)  # would re-import torch, unlike in a plain run

    records, backbone, size = _records_and_backbone(preset, overrides, limit)
    device_ = torch.device(device)
    backbone.to(device_)
    with torch.no_grad():  # one untimed forward: allocator and kernel set-up are not the loader's cost
        backbone(torch.zeros(8, 3, size, size, device=device_))
    os.environ["DINOKIT_CACHE"] = tempfile.mkdtemp(dir=cache_dir) if variant == "first-call" else cache_dir
    workers = {"decode-w0": 0, "decode-w1": 1}.get(variant)
    if variant == "cached-full":  # the CLS feature from every token's last block, as before
        features.features_of = lambda model, images, kinds: {"cls": model(images)}
    kinds = FEATURE_KINDS if variant == "cached-all-kinds" else ("cls",)

    def one_pass() -> float:
        start = time.perf_counter()
        if variant == "before":
            _old_extract(backbone, records, size, device_, precision)
        else:
            features.extract_features(
                backbone, records, size, kinds=kinds, device=device_, precision=precision, num_workers=workers,
                progress=False, cache=variant.startswith("cached") or variant == "first-call",
            )  # fmt: skip
        if device_.type == "cuda":
            torch.cuda.synchronize()
        return len(records) / (time.perf_counter() - start)

    rates = [one_pass() for _ in range(1 if variant == "first-call" else passes)]  # a 2nd first call finds the cache
    return {"images_per_s": statistics.median(rates), "passes": rates, "images": len(records)}


def _in_fresh_process(*args) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure, *args).result()


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _summary(rounds: list[dict], variants: list[str]) -> dict:
    """Per variant: images/s and its ratio to ``before`` in the same round, as median and range."""
    return {
        v: {
            "images_per_s": _spread([r[v]["images_per_s"] for r in rounds]),
            "vs_before": _spread([r[v]["images_per_s"] / r["before"]["images_per_s"] for r in rounds]),
        }
        for v in variants
    }


def main() -> None:
    from dinokit.device import device_name
    from dinokit.paths import checkout_commit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-demo")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. data.synth_size=256")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--passes", type=int, default=1, help="passes per process, median taken (a pass is seconds)")
    parser.add_argument("--limit", type=int, default=0, help="use the first N images only (0: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="", help="fp32 / bf16 / fp16; default: bf16 on a GPU, fp32 on a CPU")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, help="also write the rounds as JSON here")
    args = parser.parse_args()
    variants = ["before"] + [v for v in args.variants if v != "before"]  # the ratios' denominator

    precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    data = (args.preset, args.set, args.limit)
    records, _, size = _records_and_backbone(*data)  # generates the data once, here
    rounds = []
    with tempfile.TemporaryDirectory() as cache_dir:
        _in_fresh_process("cached", *data, args.device, precision, cache_dir, 1)  # fills the cache
        os.environ["DINOKIT_CACHE"] = cache_dir
        for i in range(args.rounds):
            order = variants if i % 2 == 0 else variants[::-1]
            r = {v: _in_fresh_process(v, *data, args.device, precision, cache_dir, args.passes) for v in order}
            rounds.append({"round": i + 1, "order": list(order), **r})
            rates = ", ".join(f"{v} {r[v]['images_per_s']:.0f}" for v in variants)
            print(f"round {i + 1}: {rates} img/s", flush=True)
    summary = _summary(rounds, variants)
    machine = device_name(args.device)
    what = " ".join([args.preset, *args.set])
    print(f"{len(records)} images at {size} px ({what}), {precision} on {machine}, {args.rounds} rounds:")
    for v, s in summary.items():
        rate, ratio = s["images_per_s"], s["vs_before"]
        print(
            f"  {v:10s} {rate['median']:6.0f} img/s ({rate['min']:.0f}-{rate['max']:.0f}), "
            f"{ratio['median']:.2f}x before ({ratio['min']:.2f}-{ratio['max']:.2f}x): {VARIANTS[v]}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "device": machine,
            "preset": args.preset,
            "set": args.set,
            "passes": args.passes,
            "commit": checkout_commit(),
            "precision": precision,
            "images": len(records),
            "size": size,
        }
        args.out.write_text(json.dumps({**record, "summary": summary, "rounds": rounds}, indent=1) + "\n")


if __name__ == "__main__":
    main()
