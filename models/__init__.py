"""Small model builders for tests, benchmarks and the demo (importable as graphprune.models)."""

from graphprune.models.mlp import MLP, SimpleNet, make_regression_data, simple_net, train, zero_hidden_units

__all__ = ["MLP", "SimpleNet", "make_regression_data", "simple_net", "train", "zero_hidden_units"]
