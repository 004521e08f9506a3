"""Model families: what differs between the networks the engine edits, one module per family.

Each family module answers, for its networks, the questions the methods must not answer
themselves: which modules an adapter may address (:func:`adaptable_modules`), which are never
adapted by SPARE (input/output layers), and which make up ESD's module sets. Today's family is
:mod:`.unet` (SD1.x / SD2.x UNets in diffusers and in CompVis / ComfyUI naming); the next ones
(SDXL, SD3, Flux) add their conditioning, forward process and training target here, so adding a
family touches one file and the methods none.
"""
