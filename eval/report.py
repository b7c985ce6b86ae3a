"""report.md of ``python -m eval``: the side-by-side tables and how each figure was made."""


def _fmt(value, digits: int) -> str:
    """A table cell: a number, or '–' when absent."""
    return "–" if value is None else f"{value:.{digits}f}"


def _half_cell(check: dict | None) -> str:
    """'finite (NN dB)' / 'NON-FINITE' / 'error' for the fp16/bf16 columns."""
    if check is None:
        return "–"
    if check.get("finite") is None:
        return "error"
    return f"finite ({check['psnr_vs_fp32']:.0f} dB)" if check["finite"] else "**NON-FINITE**"


def _kid_cell(kid: dict | None) -> str:
    """'0.0123 ± 0.0004' (mean ± std over subsets), '0.0123 (all 68)' when the subsets are the whole sets, or '–'."""
    if kid is None:
        return "–"
    spread = f"(all {kid['subset_size']})" if kid["std"] is None else f"± {kid['std']:.4f}"
    return f"{kid['mean']:.4f} {spread}"


def colour_cell(r: dict) -> str:
    """'3.1 / 2.0 / 4.4': the mean per-image |channel shift| in 8-bit levels, or '–'."""
    shifts = [r.get(f"colour_shift_{c}") for c in "rgb"]
    return "–" if None in shifts else " / ".join(f"{v:.1f}" for v in shifts)


def reconstruction_table(payload: dict) -> list[str]:
    """The side-by-side table: reconstruction figures, rFID/KID, named FDs, speed, half precision, tiling."""
    models = payload["models"]
    fd_names = sorted({k for r in models.values() for k in r if k.startswith("fd_")})
    head = ["model", "PSNR ↑", "SSIM ↑", "MS-SSIM ↑", f"LPIPS-{payload['lpips_net']} ↓", "colour shift R/G/B ↓"]
    head += ["rFID ↓", "KID ↓"]
    head += [f"{n} ↓" for n in fd_names]
    head += ["enc img/s", "dec img/s", "peak MB", "fp16 decode", "bf16 decode", "tiled vs untiled (dB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in models.items():
        half, tiling = r.get("half_precision_decode", {}), r.get("tiling")
        cells = [f"`{name}`", _fmt(r.get("psnr"), 2), _fmt(r.get("ssim"), 4), _fmt(r.get("ms_ssim"), 4)]
        cells += [_fmt(r.get("lpips"), 4), colour_cell(r), _fmt(r.get("rfid"), 2), _kid_cell(r.get("kid"))]
        cells += [_fmt(r.get(n), 2) for n in fd_names]
        cells += [_fmt(r["encode_img_per_s"], 1), _fmt(r["decode_img_per_s"], 1), _fmt(r["peak_memory_mb"], 0)]
        cells += [_half_cell(half.get("float16")), _half_cell(half.get("bfloat16"))]
        cells.append(_fmt(tiling and tiling["decode_psnr"], 1))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_report(payload: dict) -> str:
    """report.md: the side-by-side table and how the numbers were made."""
    models = payload["models"]
    first = next(iter(models.values()))
    warning = next((r["fid_warning"] for r in models.values() if "fid_warning" in r), None)
    lines = [
        "# VAE reconstruction report",
        "",
        f"- data: {payload['data']} — {payload['n_images']} images at {payload['resolution']} px "
        f"(resize shorter side, bicubic antialiased, centre crop)",
        "- PSNR/SSIM/MS-SSIM on 8-bit images (data range 255), mean over images; reconstructions use the "
        "posterior mode; colour shift: per image and channel |mean(x̂ − x)| in 8-bit levels, mean over images "
        "(a colour cast)",
        f"- rFID and KID: {payload['rfid_status']}",
        *([f"- **{warning}**"] if warning else []),
        "",
        *reconstruction_table(payload),
        "",
        f"Throughput is per process ({first['num_processes']}), including host-to-device time; peak memory is "
        f"{first['peak_memory_kind'].replace('_', ' ')}. fp16/bf16 decode: real latents of the first batch decoded "
        "in that dtype (finite? PSNR vs fp32; on CPU one 8x8-latent crop, as CPUs emulate fp16 slowly). Tiled vs "
        "untiled: one image at twice the resolution decoded with "
        "`enable_tiling()` and without (PSNR between the two; higher = fewer seams).",
        "",
        "`reconstructions.png`: first row the originals, then one row per model in the order above.",
        *latent_section(models),
        *diffusability_section(models),
    ]
    return "\n".join(lines) + "\n"


# Spearman's ρ with the generation FID of SiT-B/2 / SiT-XL/2 trained on 22 public tokenizers' latents, oriented so
# that positive means "predicts gFID"; computed from the iFID paper's own data (Xu et al. 2026, assets/ifid_data.py).
PUBLISHED_RHO = (
    "Published evidence, across 22 public tokenizers (Spearman's ρ with the gFID of SiT-B/2 / SiT-XL/2 trained on "
    "their latents, positive = predicts gFID; Xu et al. 2026): iFID +0.82 / +0.84, linear-probe accuracy +0.75 / "
    "+0.82; scale-equivariance loss −0.56 / −0.53, PSNR −0.58 / −0.54, rFID −0.24 / −0.17 (across families these "
    "point the wrong way). The columns are in that order: iFID and the probe rank latent spaces; PSNR ↓s and the "
    "HF fraction are within-family diagnostics (one base VAE, fine-tuned), not rankings across VAEs. This project "
    "has not yet measured on its own data which of them track a diffusion model trained on the latents."
)


def diffusability_section(models: dict) -> list[str]:
    """report.md's diffusability table, the figures in the order of the evidence that they predict generation."""
    reports = {m: r["diffusability"] for m, r in models.items() if r.get("diffusability")}
    if not reports:
        return []
    fd = "ifid" if any("ifid" in d for d in reports.values()) else "ifd_vgg16"
    probe = any("linear_probe" in models[m] for m in reports)
    head = [
        "model",
        f"{fd} ↓",
        *(["probe top-1 ↑"] if probe else []),
        "PSNR",
        "PSNR ↓2",
        "PSNR ↓4",
        "LPIPS",
        "LPIPS ↓2",
        "LPIPS ↓4",
        "HF fraction (image)",
    ]
    lines = ["", "## Diffusability", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, d in reports.items():
        eq = d["equivariance"]
        cells = [f"`{m}`", _fmt(d.get(fd), 2)]
        cells += [_fmt(models[m].get("linear_probe", {}).get("top1"), 4)] if probe else []
        cells += [_fmt(models[m].get("psnr"), 2)] + [_fmt(eq.get(s, {}).get("psnr"), 2) for s in ("2", "4")]
        cells += [_fmt(models[m].get("lpips"), 4)] + [_fmt(eq.get(s, {}).get("lpips"), 4) for s in ("2", "4")]
        cells.append(f"{d['hf_fraction']:.4f} ({d['image_hf_fraction']:.4f})")
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [
        "",
        PUBLISHED_RHO,
        "",
        f"{fd} (Xu et al. 2026): each evaluation latent (a posterior sample) is interpolated (slerp at ½) with one of "
        "its 10 nearest reference latents (cosine similarity, drawn by softmax(−MSE); channel-normalised), decoded, "
        "and the FD of the decodings to the real images is taken on "
        + ("the FID Inception" if fd == "ifid" else "VGG16 features (not FID)")
        + f"; reference: {next(iter(reports.values())).get('ifid_reference', 'the evaluation images')}. "
        + (
            "Probe top-1: a linear classifier (L2-regularised logistic regression) fit on the reference split's "
            "posterior means, scored on the evaluation images. "
            if probe
            else ""
        )
        + "PSNR ↓s / LPIPS ↓s: D(↓ₛz) against ↓ₛx (z the posterior mode, the same antialiased bilinear downsampling "
        "for both; LPIPS on both resized back to the evaluation size) next to the plain reconstruction (scale "
        "equivariance, Skorokhodov et al. 2025). HF fraction: share of the latents' power above half the Nyquist "
        "radius (DC removed; the images resized to the latent size in brackets). `spectrum_N.png`: both radial "
        "spectra on log axes.",
    ]


def _per_channel(values: list[float], digits: int = 3) -> str:
    """A per-channel list as 'c0 v, c1 v, ...'."""
    return ", ".join(f"{v:.{digits}g}" for v in values)


def latent_row(name: str, lat: dict) -> str:
    """One model's row of the latent-space table."""
    cells = [f"`{name}`", f"{lat['rate_bpp']:.4f}", f"{lat['kl_per_latent_nats']:.4f}"]
    cells += [f"{lat['active_units']}/{lat['units']}", f"{lat['active_channels']}/{lat['latent_shape'][0]}"]
    cells += [str(lat["collapsed_channels"] or "none"), f"{lat['prior_fd']:.3f}"]
    cells += [_fmt(lat.get("neg_elbo_bpd"), 4), _fmt(lat.get("iwae_nll_bpd"), 4)]
    return "| " + " | ".join(cells) + " |"


def per_channel_line(name: str, lat: dict) -> str:
    """One model's per-channel detail, its decoder scale and its picture."""
    return (
        f"`{name}` per channel: KL (nats/elem) {_per_channel(lat['kl_per_channel_nats'])}; active fraction "
        f"{_per_channel(lat['active_fraction_per_channel'], 2)}; posterior std "
        f"{_per_channel(lat['posterior_std_per_channel'])}; aggregate mean "
        f"{_per_channel(lat['aggregate_mean_per_channel'])}, std {_per_channel(lat['aggregate_std_per_channel'])}"
        + (f"; Laplace scale {lat['laplace_scale_levels']:.3g} levels" if "laplace_scale_levels" in lat else "")
        + (f". Pictures: `{lat['figure']}`" if "figure" in lat else "")
    )


def latent_section(models: dict) -> list[str]:
    """report.md's latent-space part: rate, active units, prior gap, likelihood, per-channel detail, pictures."""
    head = ["model", "rate (bits/px)", "KL/elem (nats)", "active units", "active channels", "collapsed"]
    head += ["prior FD", "−ELBO (bpd)", "IWAE NLL (bpd)"]
    lines = ["", "## Latent space", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [latent_row(name, r["latent"]) for name, r in models.items()]
    first = next(iter(models.values()))["latent"]
    likelihood = (
        "discretised Laplace decoder over the 256 levels with one scale per model: the grid point (steps of 2^¼ "
        "levels) nearest the maximum-likelihood scale of its mode reconstructions (mean |x − x̂|), listed below; "
        f"prior N(0, I); IWAE with k = {first['iwae_samples']} posterior samples; bits per dimension over the "
        "3·H·W 8-bit values"
        if "iwae_samples" in first
        else "not computed (--iwae_samples 0)"
    )
    lines += [
        "",
        "- rate: KL(q(z|x) ‖ N(0, I)) per latent element, and per image in bits per input pixel (KL / (H·W·ln 2))",
        "- active unit (Burda et al. 2016): Var over images of the posterior mean of one latent unit (channel, "
        "row, column) > 0.01; a channel active at < 1 % of its positions is collapsed",
        "- prior FD: Gaussian Fréchet distance between the aggregate posterior of the C-dim latent vector at a "
        "position (posterior samples pooled over images and positions) and N(0, I); 0 = the prior's moments",
        f"- likelihood: {likelihood}",
        "",
    ]
    for name, r in models.items():
        lines += [per_channel_line(name, r["latent"]), ""]
    lines.append(
        "Pictures: traversals (one row per channel, moved over ±2σ of its aggregate distribution), linear and "
        "spherical interpolation between two held-out images, samples from the aggregate-matched prior."
    )
    return lines
