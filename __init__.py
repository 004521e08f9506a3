"""ComfyUI entry point of the SPARE node pack (clone this repository into ComfyUI/custom_nodes/).

ComfyUI imports this file as a package and reads NODE_CLASS_MAPPINGS / NODE_DISPLAY_NAME_MAPPINGS
(the V1 node API, which this ComfyUI still loads alongside V3's comfy_entrypoint). spare_core is
taken from the environment if installed (``pip install -e .``), else from this folder.
"""
import importlib.util
import os
import sys

if importlib.util.find_spec("spare_core") is None:
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
