"""What users run: the CLI, bench, sweep, demo, charts, perplexity, generation."""
