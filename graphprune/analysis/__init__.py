"""What the graph is: dependencies, state (KV caches), shapes, costs."""
