"""Stand-in for the Visual Buffet host (tests only): today's host's plugin interface (README section of that name)."""

__version__ = "0.0.0-standin"
