"""Fuzz (25 cases per family in CI): random MLP-style graphs, conv stacks and attention blocks
pruned with random options end in a verified model or a clean refusal, never an unexpected
exception."""

from __future__ import annotations

from hypothesis import given, settings

from graphprune.testing.fuzz import attention_graphs, conv_graphs, mlp_graphs, prune_options, run_case

SETTINGS = settings(max_examples=25, deadline=None)


@SETTINGS
@given(text=mlp_graphs(), options=prune_options())
def test_random_mlp_graphs_verify_or_refuse(text: str, options: dict) -> None:
    outcome = run_case(text, options)
    assert outcome.verdict == "verified" or outcome.verdict.startswith("refused: ")


@SETTINGS
@given(text=conv_graphs(), options=prune_options())
def test_random_conv_graphs_verify_or_refuse(text: str, options: dict) -> None:
    outcome = run_case(text, options)
    assert outcome.verdict == "verified" or outcome.verdict.startswith("refused: ")


@SETTINGS
@given(text=attention_graphs(), options=prune_options())
def test_random_attention_graphs_verify_or_refuse(text: str, options: dict) -> None:
    outcome = run_case(text, options)
    assert outcome.verdict == "verified" or outcome.verdict.startswith("refused: ")
