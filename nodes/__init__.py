"""SPARE node pack for ComfyUI, on the V1 node API (``NODE_CLASS_MAPPINGS``).

Why V1: ComfyUI (Oct 2025) loads both V1 mappings and V3 ``comfy_entrypoint``; its docs steer
new features to V3, but call the V3 schema (``comfy_api.latest`` / ``v0_0_2``) unstable, "more
changes will be made without warning", and a V3 node class cannot even be defined without
importing ComfyUI. V1 keeps every node class importable and testable outside ComfyUI and uses
only what all current ComfyUI versions load. The whole pack uses V1; no V3 entry point.

The node modules import spare_core but never ComfyUI; ``comfy_bridge`` is the only module that
talks to the host, and only when a node runs.
"""
from .adapter_nodes import ApplyUnlearnAdapter, SparseLoRAInit
from .data_unlearn_node import DataUnlearn
from .file_nodes import LoadUnlearnAdapter, SaveUnlearnAdapter
from .probe_node import ProbeErasure
from .saliency_nodes import ComputeSaliency, SaliencyPreview
from .uce_node import UCEErase
from .unlearn_node import SelfDistillUnlearn

NODE_CLASS_MAPPINGS = {
    "ComputeSaliency": ComputeSaliency,
    "SaliencyPreview": SaliencyPreview,
    "SparseLoRAInit": SparseLoRAInit,
    "SelfDistillUnlearn": SelfDistillUnlearn,
    "DataUnlearn": DataUnlearn,
    "UCEErase": UCEErase,
    "ApplyUnlearnAdapter": ApplyUnlearnAdapter,
    "SaveUnlearnAdapter": SaveUnlearnAdapter,
    "LoadUnlearnAdapter": LoadUnlearnAdapter,
    "ProbeErasure": ProbeErasure,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "ComputeSaliency": "SPARE Compute Saliency",
    "SaliencyPreview": "SPARE Saliency Preview",
    "SparseLoRAInit": "SPARE Sparse LoRA Init",
    "SelfDistillUnlearn": "SPARE Self-Distill Unlearn",
    "DataUnlearn": "SPARE Data Unlearn (SISS)",
    "UCEErase": "SPARE UCE Erase (closed form)",
    "ApplyUnlearnAdapter": "SPARE Apply Unlearn Adapter",
    "SaveUnlearnAdapter": "SPARE Save Unlearn Adapter",
    "LoadUnlearnAdapter": "SPARE Load Unlearn Adapter",
    "ProbeErasure": "SPARE Probe Erasure",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
