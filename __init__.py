"""ComfyUI entry point of the BoLID node pack.

ComfyUI imports this folder as a package and reads the two mappings below. Importing it outside ComfyUI works
too (the node modules import ComfyUI lazily), so tools and tests can load the pack the same way.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
