"""The host's bundled SigLIP plugin, reduced to a fake that says who it is."""

from visual_buffet.plugins.base import PluginBase
from visual_buffet.plugins.schemas import PluginInfo, Tag, TagResult


class SigLIPPlugin(PluginBase):
    def get_info(self):
        return PluginInfo(name="siglip", version="1.0.0", description="the host's bundled SigLIP plugin")

    def is_available(self):
        return True

    def setup(self):
        return True

    def configure(self, **kwargs):
        pass

    def tag(self, image_path):
        return TagResult(tags=[Tag("host's own siglip", 1.0)], model="host", version="1.0.0",
                         inference_time_ms=0.0)
