"""BoLID (Body Lightning ID Diffusion), pure PyTorch: the method, file formats and runners.

Imports neither ComfyUI nor the training code, so it is usable from any script, from diffusers, or from nodes/.
Submodules are imported on demand to keep ``import bolid`` cheap.
"""

__version__ = "0.1.0"
