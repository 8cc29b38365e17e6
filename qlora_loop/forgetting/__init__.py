"""Against forgetting: replay rows (the base's own replies) trained beside the data, and drift (how far
the adapter's replies move from the base's)."""
