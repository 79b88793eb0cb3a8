"""Does row-wise optimizer state lose accuracy? ``sharelora`` trained with full Adam state and
with row-wise state, same data, split and seed (paired), on the demo and on a UKPConvArg1 cell.

    python benchmarks/rowwise.py [--quick] [--json out.json]

Each setting is the demo's (MiniLM, top block adapted, frozen blocks cached, personal training
started from a trained ``shared`` model, strength chosen on validation). Prints macro test
accuracy per setting and the paired difference.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

from common import machine, parser, table, write_json

from sharelora import DEFAULT_BACKBONE, AdapterConfig, TrainConfig
from sharelora.compare import compare
from sharelora.data import Columns, SplitConfig, read_preferences, split_per_user

UKP = Path(__file__).resolve().parents[2] / "shared" / "data" / "ukp-convarg1" / "pairs.jsonl.gz"


def cells(quick: bool):
    demo, _ = read_preferences("builtin:demo")
    yield "demo", split_per_user(demo, SplitConfig(val=0.1, test=0.25, seed=0)), 128
    if UKP.exists():
        ukp, _ = read_preferences(str(UKP), Columns(group="pair_id"), "skip")
        cfg = SplitConfig(val=0.1, test=0.2, top_users=5, max_per_user=25 if quick else 50)
        yield "UKP K=5 n=" + str(cfg.max_per_user), split_per_user(ukp, cfg), 256


def main() -> None:
    args = parser(__doc__).parse_args()
    rows, payload = [], {"machine": machine()}
    for name, splits, max_length in cells(args.quick):
        base = TrainConfig(epochs=3, lr=2e-3, max_length=max_length, progress=False)
        accuracy, cache = {}, None
        for state in ("full", "rowwise"):
            results, cache = compare(
                splits,
                ["shared", "sharelora"],
                AdapterConfig(top_layers=1),
                replace(base, user_state=state),
                DEFAULT_BACKBONE,
                tempfile.mkdtemp(),
                log=lambda *a: None,
                prefix_cache=cache,
                from_shared=True,
            )
            accuracy[state] = results["sharelora"]["macro_accuracy"]
            accuracy["shared"] = results["shared"]["macro_accuracy"]
        diff = accuracy["rowwise"] - accuracy["full"]
        rows.append([name, accuracy["shared"], accuracy["full"], accuracy["rowwise"], diff])
        payload[name] = accuracy
    print(f"{machine()}; macro test accuracy, one seed, paired")
    print(table(["data", "shared", "sharelora, full Adam", "sharelora, row-wise", "Δ"], rows))
    write_json(args.json, payload)


if __name__ == "__main__":
    main()
