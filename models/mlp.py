"""Multi-layer perceptrons: the seed's SimpleNet and a configurable MLP, with a tiny trainer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class SimpleNet(nn.Module):
    """The seed network: Linear 10->20, ReLU, Linear 20->10."""

    input_names = ("x",)

    def __init__(self, in_features: int = 10, hidden: int = 20, out_features: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(x)))

    def example_inputs(self, batch: int = 4) -> tuple[torch.Tensor]:
        return (torch.randn(batch, self.fc1.in_features),)


class MLP(nn.Module):
    """Linear layers of the given widths with an activation between them."""

    input_names = ("x",)

    def __init__(self, widths: Sequence[int] = (16, 64, 32, 8), activation: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(activation())
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def linears(self) -> list[nn.Linear]:
        return [m for m in self.layers if isinstance(m, nn.Linear)]

    def example_inputs(self, batch: int = 4) -> tuple[torch.Tensor]:
        return (torch.randn(batch, self.linears()[0].in_features),)


def simple_net() -> SimpleNet:
    """Factory for `graphprune export graphprune.models.mlp:simple_net`."""
    torch.manual_seed(0)
    return SimpleNet()


def make_regression_data(samples: int = 512, in_features: int = 10, out_features: int = 10,
                         seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs and targets from a fixed random nonlinear teacher (learnable, not noise)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, in_features, generator=gen)
    w1 = torch.randn(in_features, 32, generator=gen) / in_features ** 0.5
    w2 = torch.randn(32, out_features, generator=gen) / 32 ** 0.5
    y = torch.relu(x @ w1) @ w2 + 0.01 * torch.randn(samples, out_features, generator=gen)
    return x, y


def train(module: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 200, lr: float = 1e-2,
          seed: int = 0) -> float:
    """Full-batch Adam on MSE; returns the final training loss."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    loss_fn = nn.MSELoss()
    module.train()
    loss = torch.tensor(0.0)
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = loss_fn(module(x), y)
        loss.backward()
        optimizer.step()
    module.eval()
    return float(loss.detach())


@torch.no_grad()
def zero_hidden_units(producer: nn.Linear, consumer: nn.Linear, units: Sequence[int]) -> None:
    """Make `units` dead: producer rows and biases and consumer columns become zero."""
    index = torch.as_tensor(list(units), dtype=torch.long)
    producer.weight[index] = 0.0
    if producer.bias is not None:
        producer.bias[index] = 0.0
    consumer.weight[:, index] = 0.0
