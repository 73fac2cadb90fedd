from __future__ import annotations

import pytest
import torch

from core.data.datasets import DatasetSpec, TaskDataset, load_dataset
from core.learning.common import TrainConfig


@pytest.fixture(scope="session")
def digits32() -> TaskDataset:
    """sklearn's 8x8 digits at 32 px: a real, tiny task."""
    return load_dataset(DatasetSpec("digits", image_size=32, seed=0, train_limit=96,
                                    test_limit=64))


@pytest.fixture()
def tiny_train() -> TrainConfig:
    return TrainConfig(epochs=1, batch_size=16, warm_start_images=64, channels_last=False,
                       checkpoint_every=0)


def state_bytes(model: torch.nn.Module) -> dict[str, bytes]:
    return {k: v.detach().contiguous().numpy().tobytes() for k, v in model.state_dict().items()}
