"""Stand-in discovery plugin: the same candidate labels for every image (as raw as a tagger gives them)."""

from visual_buffet.plugins.base import PluginBase
from visual_buffet.plugins.schemas import PluginInfo, Tag, TagResult

LABELS = ['Dog', ' golden Retriever ', 'beach', 'dog']


class RamPlusPlugin(PluginBase):
    def get_info(self):
        return PluginInfo(name="ram_plus", version="1.0.0", description="stand-in", provides_confidence=False)

    def is_available(self):
        return True

    def setup(self):
        return True

    def tag(self, image_path):
        return TagResult(tags=[Tag(label) for label in LABELS], model="ram_plus", version="1.0.0",
                         inference_time_ms=0.0)
