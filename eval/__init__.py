"""Reconstruction metrics (PSNR, SSIM, LPIPS) and the side-by-side evaluation runner."""
