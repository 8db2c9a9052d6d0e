"""A small CNN for scikit-learn's bundled 8x8 digits (the demo's default model)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class DigitsCNN(nn.Module):
    """Conv 1->32, Conv 32->64, pool, Conv 64->64, Flatten (64 channels x 4x4), Linear 1024->128->10.

    No BatchNorm: the exported weights are then the module's own parameters, so Taylor scores
    computed with torch autograd map onto the ONNX initializers by value."""

    input_names = ("image",)

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU())
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(image))

    def example_inputs(self, batch: int = 4) -> tuple[torch.Tensor]:
        return (torch.zeros(batch, 1, 8, 8),)


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): images as float32 [N, 1, 8, 8] in [0, 1], labels int64."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    images = (data.images / 16.0).astype(np.float32)[:, None]
    labels = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    split = int(len(labels) * (1 - test_fraction))
    train, test = order[:split], order[split:]
    return images[train], labels[train], images[test], labels[test]


def train_digits(net: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int = 30, batch: int = 64,
                 lr: float = 2e-3, seed: int = 0) -> float:
    """Adam with cross entropy; returns the last epoch's mean training loss."""
    torch.manual_seed(seed)
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    loss_sum = 0.0
    for _ in range(epochs):
        order = torch.randperm(len(targets))
        loss_sum = 0.0
        for start in range(0, len(order), batch):
            index = order[start:start + batch]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(net(inputs[index]), targets[index])
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(index)
    net.eval()
    return loss_sum / len(targets)


def digits_cnn() -> DigitsCNN:
    """Factory for `graphprune export graphprune.models.digits:digits_cnn` (untrained)."""
    torch.manual_seed(0)
    return DigitsCNN()
