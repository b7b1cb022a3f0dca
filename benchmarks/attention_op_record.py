"""The attention operation alone, FlashAttention on vs off, as notebook 05 measures it: in fresh
processes, and (``--record``) into ``notebooks/expectations.json`` for this machine.

Each round runs :func:`dinokit.bench.attention_op_sweep` (6 heads of 64, ViT-S/8's token counts
at 96, 224, 320 and 448 px, fp32, forward) in a new Python process; the speed-up per token count
is reported as median and range over the rounds, and recorded as the range, in the latest
``cpu-demo`` entry of this machine's kind (CPU model and AVX-512 or not), where notebook 05's
"Expect" table reads it.

    python benchmarks/attention_op_record.py [--rounds 3] [--record]
"""

from __future__ import annotations

import argparse
import statistics

from dinokit.bench import attention_op_sweep, run_in_fresh_process
from dinokit.expectations import add_to_latest_entry


def sweep_on_cpu() -> dict:
    return {"rows": attention_op_sweep(device="cpu")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--record", action="store_true", help="write the ranges into notebooks/expectations.json")
    args = parser.parse_args()
    by_tokens: dict[int, list[float]] = {}
    for i in range(args.rounds):
        rows = run_in_fresh_process(sweep_on_cpu)["rows"]
        print(f"round {i + 1}: " + ", ".join(f"{r['tokens']} tokens {r['speedup']:.2f}x" for r in rows), flush=True)
        for r in rows:
            by_tokens.setdefault(r["tokens"], []).append(r["speedup"])
    for n, values in by_tokens.items():
        print(f"{n:>5} tokens: on / off {statistics.median(values):.2f}x (range {min(values):.2f}-{max(values):.2f})")
    if args.record:
        ranges = {f"op_{n}": [round(min(v), 2), round(max(v), 2)] for n, v in by_tokens.items()}
        how = f"attention op: benchmarks/attention_op_record.py, {args.rounds} fresh processes"
        entry = add_to_latest_entry(ranges, how)
        print(f"recorded in the {entry['machine']['cpu']} entry of {entry['commit']}")


if __name__ == "__main__":
    main()
