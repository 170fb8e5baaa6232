"""Merging an adapter into its base: preflight checks and the verified fold."""
