"""Plans and the rewrite that applies them."""
