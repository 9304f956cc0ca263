"""This project's own code: the configs in conf/ name it in their `_target_`s."""
