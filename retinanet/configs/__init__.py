"""The YAML configs shipped inside the package. Imports nothing heavy (the CLI lists them)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def names() -> list[str]:
    """Names of the shipped configs (file names without `.yaml`)."""
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))


def path(name: str) -> Path:
    return Path(str(resources.files(__name__) / f"{name}.yaml"))
