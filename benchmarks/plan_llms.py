"""``sharelora plan`` for two LLM configs our users train (Llama-3-8B, Qwen2.5-1.5B; shapes only,
``benchmarks/configs/``) at 10^3, 10^5 and 10^6 users, bf16 frozen weights, every method, with
user tables on the device and on the host.

    python benchmarks/plan_llms.py [--output benchmarks/results/plan_llms.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sharelora.config import AdapterConfig
from sharelora.plan import plan_table

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["llama-3-8b", "qwen2.5-1.5b"]
USERS = [10**3, 10**5, 10**6]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "plan_llms.md"))
    args = p.parse_args()
    parts = []
    for name in CONFIGS:
        for users in USERS:
            backbone = str(ROOT / "benchmarks" / "configs" / name)
            table, _ = plan_table(backbone, AdapterConfig(), users, weight_bytes=2)
            parts.append(f"### {name}, {users:,} users\n\n" + table.split("\n", 1)[1].strip())
    text = "\n\n".join(parts) + "\n"
    Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
