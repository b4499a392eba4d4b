"""Applications of trained runs: LOCO editing along the denoiser Jacobian's singular vectors (`editing`) and
latent watermarks (`watermark`)."""
