"""molrmog: diffusion on mixtures of low-rank subspaces with mixture-of-Gaussian latents."""

__version__ = "0.1.0"
