"""ComfyUI entry point of the SPARE node pack (clone this repository into ComfyUI/custom_nodes/).

ComfyUI imports this file as a package and reads NODE_CLASS_MAPPINGS / NODE_DISPLAY_NAME_MAPPINGS
(the V1 node API, which this ComfyUI still loads alongside V3's comfy_entrypoint).

spare_core is taken from the environment if it is importable (``pip install -e .``), else this
pack's own ``spare_core/`` folder is loaded as the top-level package ``spare_core``. Only that one
name is added: the pack folder is never put on ``sys.path``, so its ``tests``, ``benchmarks`` and
``nodes`` folders do not become top-level modules for every other custom node.
"""
import importlib.util
import os
import sys


def _provide_spare_core() -> None:
    if "spare_core" in sys.modules or importlib.util.find_spec("spare_core") is not None:
        return
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "spare_core")
    spec = importlib.util.spec_from_file_location(
        "spare_core", os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])
    if spec is None or spec.loader is None:
        raise ImportError(f"SPARE node pack: no spare_core package in {folder}; re-clone the "
                          "repository or `pip install -r requirements.txt` next to it")
    module = importlib.util.module_from_spec(spec)
    sys.modules["spare_core"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        for name in [n for n in sys.modules if n == "spare_core" or n.startswith("spare_core.")]:
            del sys.modules[name]  # no half-imported package left for the next importer
        raise


_provide_spare_core()

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

WEB_DIRECTORY = "./web"
"""Served by ComfyUI at /extensions/spare-unlearn/; the frontend's node help opens
``web/docs/<NodeName>.md`` (one page per node of NODE_CLASS_MAPPINGS)."""

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
