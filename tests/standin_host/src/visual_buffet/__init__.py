"""Stand-in for the Visual Buffet host (tests only): the plugin interface of DESIGN section 6."""

__version__ = "0.0.0-standin"
