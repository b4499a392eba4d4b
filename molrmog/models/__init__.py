"""Models: the score models (`experts`, `smd`), the VAEs (`vae`) and their layouts (`layouts`), and the registry
of latent expert kinds (`kinds`). Imports `molrmog.core` (and nothing above this package)."""
