"""inpaintd: ROI-sliced Stable Diffusion inpainting for CPU-only edge devices."""

__version__ = "0.1.0"
