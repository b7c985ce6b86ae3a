"""Bridge from a trained VAE to latent diffusion: latent facts/statistics, caching, pipelines, publishing."""
