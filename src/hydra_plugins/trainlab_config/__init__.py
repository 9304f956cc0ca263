"""Registers trainlab's config search path with Hydra's plugin scan (see trainlab.app)."""

from trainlab.app import ProjectConfigSource, ProjectSearchPath

__all__ = ["ProjectConfigSource", "ProjectSearchPath"]
