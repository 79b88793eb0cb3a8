"""Train a tiny model with the library's loop; run directly or under `accelerate launch`.

Usage: python ddp_job.py BACKBONE_DIR OUTPUT_DIR   (used by test_distributed.py)
"""

import sys

import torch
from conftest import opposite_tastes

from sharelora import AdapterConfig, PersonalizedRewardModel
from sharelora.recipe import TrainConfig, train

if __name__ == "__main__":
    backbone, output = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = PersonalizedRewardModel.from_backbone(
        backbone, ["sunny", "rainy"], AdapterConfig(rank=2)
    )
    cfg = TrainConfig(epochs=2, lr=5e-3, batch_size=8, progress=False, max_length=32)
    result = train(model, opposite_tastes(12), opposite_tastes(5, seed=1), cfg, output)
    print(f"processes: {result['summary']['processes']}")
