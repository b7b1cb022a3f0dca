"""dinokit's pre-training step against a peer library's DINO step, on an identical configuration.

The peer is lightly (its DINO example: lightly's ``DINOProjectionHead``, ``DINOLoss`` and
``update_momentum`` around a timm ViT), installed on demand into ``~/.cache/dinokit/peer`` with
``--no-deps`` (torch, torchvision and timm come from this environment); it is never a kit
requirement. Both sides get the same pre-cut crops (random tensors), so only the step is timed:

* ViT-Ti/8 shaped as timm's (width 192, 12 blocks, 3 heads, no LayerScale, no stochastic depth);
* 2 x 64 px global + 4 x 32 px local crops, batch 64;
* head: 512 hidden, 64 bottleneck, 2,048 prototypes; AdamW; fp32; 2 threads;
* dinokit twice: ``like-for-like`` (iBOT and KoLeo off: the same work as the peer's DINO) and
  ``full`` (the DINOv2 objective: + iBOT on masked patches + KoLeo).

Each measurement runs in a fresh process; the order alternates over rounds; images/s are source
images per second (median of the timed steps), and the ratio is taken within each round.

``--profile`` also profiles two steps of each side (torch.profiler) and reports the share of the
step spent in matrix multiplies (``mm``/``addmm``/``bmm``): both sides multiply the same matrices,
so the peer's step time over dinokit's matmul time bounds the ratio any fp32 implementation of the
same step can reach here, however little it spends outside them.

    python benchmarks/peer_step.py [--rounds 3] [--steps 6] [--threads 2] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

PEER_DIR = Path.home() / ".cache" / "dinokit" / "peer"
SHAPE = {"embed_dim": 192, "depth": 12, "num_heads": 3, "patch": 8, "global_px": 64, "local_px": 32, "n_local": 4}
HEAD = {"hidden": 512, "bottleneck": 64, "prototypes": 2048}
BATCH = 64


def ensure_peer() -> None:
    """Install lightly (no dependencies: it needs only torch, torchvision and timm from here)."""
    if (PEER_DIR / "lightly").is_dir():
        return
    print(f"installing the peer (lightly) into {PEER_DIR} ...", flush=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(PEER_DIR), "lightly"]
    subprocess.run(cmd, check=True)


def _inputs(seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    s = SHAPE
    globals_ = torch.randn(2 * BATCH, 3, s["global_px"], s["global_px"], generator=g)
    locals_ = torch.randn(s["n_local"] * BATCH, 3, s["local_px"], s["local_px"], generator=g)
    return globals_, locals_


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def _time_steps(step, steps: int, warmup: int = 2, profile: bool = False) -> dict[str, float]:
    """``{"img_s"}``, and with ``profile`` ``{"step_s", "matmul_s"}`` per step from a profiled pair."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    result = {"img_s": BATCH / statistics.median(times)}
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                step()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMULS)
        result.update(step_s=total / 2e6, matmul_s=matmul / 2e6)  # microseconds over two steps
    return result


def measure_peer(steps: int, threads: int, profile: bool = False) -> dict[str, float]:
    """lightly's DINO example step (per-view forwards, as its documentation writes it)."""
    sys.path.insert(0, str(PEER_DIR))
    import copy

    import timm
    import torch
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    s = SHAPE
    backbone = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=s["global_px"], patch_size=s["patch"],
        dynamic_img_size=True,
    )  # fmt: skip
    head = DINOProjectionHead(s["embed_dim"], HEAD["hidden"], HEAD["bottleneck"], HEAD["prototypes"])
    teacher_backbone = copy.deepcopy(backbone)
    teacher_head = DINOProjectionHead(s["embed_dim"], HEAD["hidden"], HEAD["bottleneck"], HEAD["prototypes"])
    teacher_head.load_state_dict(head.state_dict())  # (weight_norm's head cannot be deep-copied)
    deactivate_requires_grad(teacher_backbone)
    deactivate_requires_grad(teacher_head)
    criterion = DINOLoss(output_dim=HEAD["prototypes"], warmup_teacher_temp_epochs=5)
    optimizer = torch.optim.AdamW(list(backbone.parameters()) + list(head.parameters()), lr=1e-4)
    globals_, locals_ = _inputs()
    views = list(globals_.chunk(2)) + list(locals_.chunk(s["n_local"]))

    def step() -> None:
        update_momentum(backbone, teacher_backbone, m=0.996)
        update_momentum(head, teacher_head, m=0.996)
        with torch.no_grad():
            teacher_out = [teacher_head(teacher_backbone(v)) for v in views[:2]]
        student_out = [head(backbone(v)) for v in views]
        loss = criterion(teacher_out, student_out, epoch=0)
        loss.backward()
        head.cancel_last_layer_gradients(current_epoch=0)
        optimizer.step()
        optimizer.zero_grad()

    return _time_steps(step, steps, profile=profile)


def measure_dinokit(full: bool, steps: int, threads: int, profile: bool = False) -> dict[str, float]:
    """dinokit's own ``train_step`` on the same shapes and crops."""
    import torch

    from dinokit.bench import STEP_SCHEDULE
    from dinokit.config import make_config
    from dinokit.data.synthetic_batch import synthetic_batch
    from dinokit.losses.objective import DINOv2Objective
    from dinokit.models.ssl import build_ssl_model
    from dinokit.precision import grad_scaler
    from dinokit.train.optimizer import build_optimizer
    from dinokit.train.step import train_step
    from dinokit.train.teacher import build_teacher

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    s = SHAPE
    cfg = make_config("default", {
        "model.embed_dim": s["embed_dim"], "model.depth": s["depth"], "model.num_heads": s["num_heads"],
        "model.patch_size": s["patch"], "model.layerscale": 0.0, "model.drop_path": 0.0,
        "model.head_hidden": HEAD["hidden"], "model.head_bottleneck": HEAD["bottleneck"],
        "model.head_prototypes": HEAD["prototypes"], "crops.global_size": s["global_px"],
        "crops.local_size": s["local_px"], "crops.n_local": s["n_local"],
        "loss.ibot_weight": 1.0 if full else 0.0, "loss.koleo_weight": 0.1 if full else 0.0,
    })  # fmt: skip
    student = build_ssl_model(cfg.model, s["global_px"])
    teacher = build_teacher(student)
    objective = DINOv2Objective(cfg.loss, cfg.model.head_prototypes)
    cpu = torch.device("cpu")
    optimizer = build_optimizer(student, cpu)
    globals_, locals_ = _inputs()
    cfg.masks.probability = 0.5 if full else 0.0
    batch = {**synthetic_batch(cfg, BATCH), "global": globals_, "local": locals_}
    scaler = grad_scaler("fp32", cpu)

    def step() -> None:
        train_step(student, teacher, objective, optimizer, scaler, batch, STEP_SCHEDULE, "fp32", cpu, 3.0)

    return _time_steps(step, steps, profile=profile)


def _fresh(fn, *args) -> dict[str, float]:
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="also the share of each step spent in matmuls")
    parser.add_argument("--out", type=Path, help="also write the rounds as JSON here")
    args = parser.parse_args()
    ensure_peer()
    peer = "peer (lightly DINO)"
    sides = {
        peer: (measure_peer, args.steps, args.threads, args.profile),
        "dinokit like-for-like": (measure_dinokit, False, args.steps, args.threads, args.profile),
        "dinokit full DINOv2": (measure_dinokit, True, args.steps, args.threads, args.profile),
    }
    rounds = []
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        result = {name: _fresh(*sides[name]) for name in order}
        rounds.append(result)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v['img_s']:.1f} img/s" for k, v in result.items()), flush=True)
    machine = os.popen("grep -m1 'model name' /proc/cpuinfo").read().split(":")[-1].strip() or "cpu"
    print(f"\n{machine}, {args.threads} threads, fp32, ViT-Ti/8, 2x64 + 4x32 crops, batch {BATCH}, fresh processes:")
    for name in sides:
        speeds = [x[name]["img_s"] for x in rounds]
        ratios = [x[name]["img_s"] / x[peer]["img_s"] for x in rounds]
        print(f"  {name:<24} {statistics.median(speeds):6.1f} img/s (range {min(speeds):.1f}-{max(speeds):.1f})   "
              f"{statistics.median(ratios):.2f}x the peer (range {min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip
    if args.profile:
        print("\nprofiled steps (median over rounds): time in matrix multiplies, and the ceiling it sets")
        peer_step_s = statistics.median(x[peer]["step_s"] for x in rounds)
        for name in sides:
            step_s = statistics.median(x[name]["step_s"] for x in rounds)
            matmul_s = statistics.median(x[name]["matmul_s"] for x in rounds)
            line = f"  {name:<24} step {step_s:.2f} s, matmuls {matmul_s:.2f} s ({100 * matmul_s / step_s:.0f} %)"
            if name != peer:
                line += f"; ceiling with nothing but its matmuls: {peer_step_s / matmul_s:.2f}x the peer"
            print(line)
    if args.out:
        args.out.write_text(
            json.dumps({"machine": machine, "threads": args.threads, "rounds": rounds}, indent=1) + "\n"
        )


if __name__ == "__main__":
    main()
