"""SigLIP / SigLIP 2 zero-shot image tagging for the Visual Buffet host.

Importing the package is cheap: torch and transformers load only when a
tagger first needs the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import ConfigError, ModelSettings, Settings

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .engine import SiglipTagger


def __getattr__(name: str) -> Any:
    if name == "SiglipTagger":  # lazy: importing the engine imports torch
        from .engine import SiglipTagger

        return SiglipTagger
    raise AttributeError(name)


__all__ = ["ConfigError", "ModelSettings", "Settings", "SiglipTagger", "__version__"]
