"""Stand-in discovery plugin that always fails, as a helper whose model is missing would."""

from visual_buffet.plugins.base import PluginBase
from visual_buffet.plugins.schemas import PluginInfo


class YoloPlugin(PluginBase):
    def get_info(self):
        return PluginInfo(name="yolo", version="1.0.0", description="stand-in", provides_confidence=True)

    def is_available(self):
        return True

    def setup(self):
        return True

    def tag(self, image_path):
        raise RuntimeError("yolo weights not found")
