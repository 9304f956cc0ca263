"""Files `trainlab init` copies into a new project (``project/``; ``starter`` is renamed)."""
