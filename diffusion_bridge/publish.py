"""Publish a trained VAE to the Hugging Face Hub as a diffusers ``AutoencoderKL`` with a model card.

``prepare_folder`` builds the repo folder locally (diffusers layout in fp32 plus an fp16 variant,
``latent_stats.json``, the training config, the reconstruction grid, ``eval_results.json`` and a
``README.md`` model card whose ``model-index`` carries the evaluation numbers); ``upload`` sends
it with ``HfApi.create_repo(exist_ok=True)`` + ``upload_folder``.  Preparing first means a failed
upload leaves a complete folder to retry with.  Evaluation numbers are read from the
``metrics.json`` that ``python -m eval`` writes (its format, not its code).
"""

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from diffusers import AutoencoderKL
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import HfHubHTTPError

from autoencoder.errors import UsageError
from autoencoder.folders import MARKER, RunDir
from autoencoder.models import cast, count_parameters, downsampling_factor

from .stats import MIN_IMAGES, ci_text

# model-index metric types and display names, in table order.
CARD_METRICS = (
    ("psnr", "PSNR (dB)", "↑"),
    ("ssim", "SSIM", "↑"),
    ("ms_ssim", "MS-SSIM", "↑"),
    ("lpips", "LPIPS", "↓"),
    ("rfid", "rFID", "↓"),
)


class PublishError(UsageError):
    """Publishing was refused or failed; the message says why and what to do."""


@dataclass
class EvalEntry:
    """One model's entry of an eval ``metrics.json`` with the run-wide facts next to it."""

    metrics: dict
    run: dict
    source: Path


def check_finite(vae: AutoencoderKL) -> None:
    """Refuse weights with NaN/Inf, or that overflow when cast to the fp16 variant."""
    bad = [name for name, p in vae.state_dict().items() if not torch.isfinite(p).all()]
    if bad:
        raise PublishError(
            f"refusing to publish: {len(bad)} weight tensors contain NaN/Inf (first: {bad[:3]}); "
            "resume from an earlier checkpoint"
        )
    overflow = [name for name, p in vae.state_dict().items() if not torch.isfinite(p.to(torch.float16)).all()]
    if overflow:
        raise PublishError(
            f"refusing to publish: weights {overflow[:3]} overflow float16, so the fp16 variant would hold inf",
            "resume from an earlier checkpoint, or train with weight decay",
        )


def read_latent_stats(model_dir: Path, vae: AutoencoderKL, allow_missing: bool) -> dict | None:
    """``latent_stats.json`` of the model; refuse (unless allowed) a model with no computed statistics."""
    path = model_dir / "latent_stats.json"
    if path.is_file():
        return json.loads(path.read_text())
    if allow_missing:
        return None
    raise PublishError(
        f"refusing to publish: {model_dir} has no latent statistics (no latent_stats.json; scaling_factor is "
        f"{vae.config.scaling_factor}), so a diffusion model would be trained on wrongly scaled latents",
        f"run `python -m diffusion_bridge stats --model {model_dir} --write` first, or pass --allow_missing_stats",
    )


def read_eval(eval_dir: str | None, model_dir: Path, allow_missing: bool) -> EvalEntry | None:
    """This model's entry in ``eval_dir/metrics.json``; refuse (unless allowed) when there is none."""
    how = (
        f"run `python -m eval --model {model_dir} --train_data_dir/--dataset_name ... --output_dir DIR` and pass "
        "--eval_dir DIR, or pass --allow_missing_eval"
    )
    if eval_dir is None:
        if allow_missing:
            return None
        raise PublishError("refusing to publish without an evaluation", how)
    path = Path(eval_dir) / "metrics.json"
    if not path.is_file():
        raise PublishError(f"refusing to publish: {path} does not exist", how)
    run = json.loads(path.read_text())
    models = run.get("models", {})
    key = next((k for k in models if Path(k).expanduser().resolve() == model_dir.resolve()), None)
    if key is None and len(models) == 1:
        key = next(iter(models))  # a single-model evaluation, e.g. run on a copy of the folder
    if key is None:
        raise PublishError(f"{path} evaluates {list(models)}, not {model_dir}", f"evaluate this model: {how}")
    return EvalEntry(metrics=models[key], run=run, source=path)


def eval_results(entry: EvalEntry, model_name: str) -> list[EvalResult]:
    """model-index entries: one per metric, each citing its dataset, split and resolution."""
    ds, res = entry.run.get("dataset", {}), entry.run["resolution"]
    lpips_net = entry.run.get("lpips_net", "alex")
    out = []
    for key, label, _ in CARD_METRICS:
        value = entry.metrics.get(key)
        if value is None:
            continue
        label = f"LPIPS ({lpips_net})" if key == "lpips" else label
        out.append(
            EvalResult(
                task_type="image-to-image",
                task_name="Image reconstruction",
                dataset_type=ds.get("hub_id") or ds.get("name", "custom"),
                dataset_name=ds.get("name", entry.run["data"]),
                dataset_split=ds.get("split"),
                dataset_args={"resolution": res, "num_images": entry.metrics["n_images"]},
                metric_type=key,
                metric_name=f"{label} @ {res}px",
                metric_value=round(float(value), 4),
            )
        )
    return out


def _stats_section(vae: AutoencoderKL, stats: dict | None) -> list[str]:
    """The latent-space facts and the three scaling conventions, with the one this config is written for."""
    c = vae.config
    lines = [
        "## Latent space",
        "",
        f"- {c.latent_channels} latent channels, {downsampling_factor(vae)}× spatial downsampling "
        f"(an H×W image → {c.latent_channels}×H/{downsampling_factor(vae)}×W/{downsampling_factor(vae)} latents)",
        f"- `scaling_factor` = {c.scaling_factor:.6g}, `shift_factor` = "
        f"{c.shift_factor if c.shift_factor is None else f'{c.shift_factor:.6g}'}",
        f"- `force_upcast` = {c.force_upcast} (pipelines decode in fp32 when true)",
    ]
    if stats is None:
        lines += [
            "",
            "**No latent statistics were measured for this VAE**: the scaling factors above are not "
            "calibrated to its latents.",
        ]
        return lines + [""]
    lines += [
        f"- measured over {stats['num_latents']:,} latent values of {stats['num_images']} images: mean "
        f"{stats['mean']:.4f}, std {stats['std']:.4f} ({ci_text(stats['std_ci95'], stats['num_images'])}); the "
        f"config is written for the **{stats.get('convention', 'sd3')}** convention below"
        + (
            f"; **only {stats['num_images']} images** (fewer than {MIN_IMAGES}): the scaling is rough"
            if stats["num_images"] < MIN_IMAGES
            else ""
        ),
        "",
        "| channel | " + " | ".join(str(i) for i in range(len(stats["channel_mean"]))) + " |",
        "|---|" + "---|" * len(stats["channel_mean"]),
        "| mean (`latents_mean`) | " + " | ".join(f"{v:.3f}" for v in stats["channel_mean"]) + " |",
        "| std (`latents_std`) | " + " | ".join(f"{v:.3f}" for v in stats["channel_std"]) + " |",
        "",
        "The three conventions in diffusers (`python -m diffusion_bridge stats --write --convention ...` rewrites "
        "the config for another; `encode --convention ...` caches latents in one):",
        "",
        "- `sd` — SD / DiT pipelines, and SDXL when the config has no `latents_mean`: `latents = z * scaling_factor`, "
        "decode `vae.decode(latents / scaling_factor)` (`shift_factor` ignored);",
        "- `sd3` — SD3 / FLUX pipelines: `latents = (z - shift_factor) * scaling_factor`, decode "
        "`vae.decode(latents / scaling_factor + shift_factor)`; a config written for `sd3` also serves `sd`;",
        "- `sdxl` — `StableDiffusionXLPipeline` when the config has `latents_mean`/`latents_std` (4 channels): "
        "`latents = (z - latents_mean) / latents_std * scaling_factor`, decode "
        "`vae.decode(latents * latents_std / scaling_factor + latents_mean)`.",
        "",
    ]
    return lines


def _scaling_line(vae: AutoencoderKL) -> str:
    """The usage line that scales z the way this config is written (see ``diffusion_bridge.stats.LatentScaling``)."""
    c = vae.config
    if c.latents_mean is not None and c.latents_std is not None:
        return (
            "mean, std = (torch.tensor(v).view(1, -1, 1, 1)\n"
            "             for v in (vae.config.latents_mean, vae.config.latents_std))\n"
            "latents = (z - mean) / std * vae.config.scaling_factor  # sdxl convention"
        )
    if c.latent_channels == 16 and c.shift_factor is not None:
        return "latents = (z - vae.config.shift_factor) * vae.config.scaling_factor  # sd3 (SD3/FLUX) convention"
    return "latents = z * vae.config.scaling_factor  # sd (SD/DiT) convention: what the denoiser sees"


def _usage_section(repo_id: str, vae: AutoencoderKL) -> list[str]:
    """How to load the VAE and put it into a pipeline."""
    c = vae.config.latent_channels
    pipe = ("StableDiffusion3Pipeline", "transformer") if c == 16 else ("DiTPipeline", "transformer")
    return [
        "## Usage",
        "",
        "```python",
        "import torch",
        f"from diffusers import AutoencoderKL, {pipe[0]}",
        "",
        f'vae = AutoencoderKL.from_pretrained("{repo_id}")  # fp32',
        f'vae16 = AutoencoderKL.from_pretrained("{repo_id}", variant="fp16", torch_dtype=torch.float16)',
        "",
        "# images in [-1, 1], shape [B, 3, H, W]; H and W multiples of the downsampling factor",
        "z = vae.encode(images).latent_dist.sample()",
        _scaling_line(vae),
        "reconstruction = vae.decode(z).sample",
        "",
        f"# a denoiser trained on this VAE's latents ({c} channels) plugs in with vae=",
        f'pipe = {pipe[0]}.from_pretrained("your/{"sd3" if c == 16 else "dit"}-model", vae=vae)',
        "```",
        "",
        f"A diffusion model must be trained on *this* VAE's latents (its denoiser's input channels must equal {c}); "
        "an existing Stable Diffusion UNet expects Stable Diffusion's own latent space, not this one.",
        "",
    ]


def _eval_section(entry: EvalEntry | None) -> list[str]:
    """The reconstruction table and how it was measured."""
    if entry is None:
        return ["## Evaluation", "", "**This VAE was published without an evaluation.**", ""]
    m, run = entry.metrics, entry.run
    head = [label if key != "lpips" else f"LPIPS ({run.get('lpips_net', 'alex')})" for key, label, _ in CARD_METRICS]
    arrows = [a for *_, a in CARD_METRICS]
    cells = ["–" if m.get(k) is None else f"{m[k]:.{2 if k in ('psnr', 'rfid') else 4}f}" for k, *_ in CARD_METRICS]
    ds = run.get("dataset", {})
    data = ds.get("name", run["data"]) + (f" (split `{ds['split']}`)" if ds.get("split") else "")
    lines = [
        "## Evaluation",
        "",
        f"Reconstruction of {m['n_images']} images of {data} at {run['resolution']} px from the posterior mode; "
        f"preprocessing: {run.get('preprocessing', 'resize + centre crop')}; PSNR/SSIM on 8-bit images.",
        "",
        "| " + " | ".join(f"{h} {a}" for h, a in zip(head, arrows)) + " |",
        "|" + "---|" * len(head),
        "| " + " | ".join(cells) + " |",
        "",
    ]
    if m.get("rfid") is None:
        reason = m.get("rfid_unavailable") or run.get("rfid_status", "not computed")
        lines += [f"rFID: not reported — {reason.split(';')[0]}.", ""]  # the reason, without local remedies
    fds = {k: v for k, v in m.items() if k.startswith("fd_")}
    if fds:
        lines += [
            "Fréchet distances on other feature extractors (not FID): "
            + ", ".join(f"`{k}` = {v:.2f}" for k, v in fds.items()),
            "",
        ]
    if "encode_img_per_s" in m:
        lines += [
            f"Speed in that evaluation: encode {m['encode_img_per_s']:.1f} img/s, decode "
            f"{m['decode_img_per_s']:.1f} img/s per process, peak memory {m['peak_memory_mb']:.0f} MB "
            f"({m.get('peak_memory_kind', '').replace('_', ' ')}).",
            "",
        ]
    if (Path(entry.source).parent / "reconstructions.png").is_file():
        rows = ", ".join(f"`{k}`" for k in run.get("models", {}))
        lines += [
            "![originals and reconstructions](reconstructions.png)",
            "",
            f"`reconstructions.png`: originals (top row), then one row per evaluated model: {rows}.",
            "",
        ]
    return lines


def _latent_section(entry: EvalEntry | None, train_metrics: dict | None) -> list[str]:
    """Rate, active units and prior gap of the latent space (the evaluation's, else the training validation's)."""
    latent, where = None, ""
    if entry is not None and entry.metrics.get("latent"):
        latent, where = entry.metrics["latent"], f"the evaluation images ({entry.run.get('resolution')} px)"
    elif train_metrics and train_metrics.get("latent"):
        latent, where = train_metrics["latent"], f"the held-out validation images ({train_metrics['resolution']} px)"
    if latent is None:
        return []
    collapsed = latent["collapsed_channels"]
    lines = [
        "## Rate, active units and prior gap",
        "",
        f"On {where}: rate {latent['rate_bpp']:.4f} bits per pixel ({latent['kl_per_latent_nats']:.4f} nats per latent "
        f"element); active units {latent['active_units']}/{latent['units']} (Burda et al.: Var over images of the "
        f"posterior mean > 0.01), {latent['active_channels']}/{latent['latent_shape'][0]} channels active"
        + (f", channels {collapsed} collapsed" if collapsed else "")
        + "; prior gap (Gaussian Fréchet distance of the "
        f"aggregate posterior per position to N(0, I)) {latent['prior_fd']:.3f}.",
    ]
    if latent.get("iwae_nll_bpd") is not None:
        lines.append(
            f"Likelihood: −ELBO {latent['neg_elbo_bpd']:.4f} bits/dim, IWAE (k = {latent['iwae_samples']}) "
            f"{latent['iwae_nll_bpd']:.4f} bits/dim under a {latent['likelihood']}."
        )
    return lines + [""]


def _training_section(vae: AutoencoderKL, training_config: dict | None, train_metrics: dict | None) -> list[str]:
    """Preset, steps, data, objective, hardware and wall time, from the run's own files."""
    lines = ["## Training", ""]
    if training_config is None:
        return lines + ["No training configuration was found next to the weights.", ""]
    m, lo, d, t = (training_config[k] for k in ("model", "loss", "data", "train"))
    source = m.get("pretrained_model_name_or_path") or f"preset `{m['preset']}`"
    data = d.get("dataset_name") or d.get("train_data_dir") or "the embedded scikit-image photographs"
    disc = f", PatchGAN ({lo['disc_loss']}) from step {lo['disc_start']}" if lo.get("disc_enabled") else ""
    lines += [
        f"- model: {source}, {count_parameters(vae):,} parameters"
        + (" (decoder-only fine-tuning)" if m.get("train_decoder_only") else ""),
        f"- data: {data}, {d['resolution']} px crops",
        f"- objective: {lo['rec_loss'].upper()} × {lo['rec_weight']} + LPIPS-{lo['lpips_net']} × {lo['lpips_weight']} "
        f"+ KL × β={lo['kl_weight']:g} ({lo['kl_schedule']}){disc}",
        f"- optimisation: {t['max_train_steps']} steps, batch {t['train_batch_size']} × "
        f"{t['gradient_accumulation_steps']} "
        f"accumulation per process, AdamW lr {t['learning_rate']:g} ({t['lr_scheduler']}), mixed precision "
        f"{t['mixed_precision']}, EMA {t['use_ema']}",
    ]
    if train_metrics:
        hw = train_metrics.get("hardware") or f"{train_metrics.get('num_processes', 1)} process(es)"
        lines.append(
            f"- hardware: {hw}; training wall time {train_metrics['train_seconds_this_run'] / 60:.1f} min "
            "(the last run segment if resumed)"
        )
        lines.append(held_out_line(train_metrics))
    lines += ["", "The resolved configuration is `training_config.yaml` in this repo.", ""]
    return lines


def held_out_line(m: dict) -> str:
    """The training run's held-out figures (from step 0 where measured) and how many images they rest on."""
    n = m["n_images"]
    few = f"; **only {n} images**: compare with care" if n < MIN_IMAGES else ""
    head = f"- held-out validation at {m['resolution']} px ({n} images{few})"
    if m.get("initial"):
        i = m["initial"]
        return (
            f"{head}, step 0 → {m['step']}: PSNR {i['psnr']:.2f} → {m['psnr']:.2f} dB, "
            f"SSIM {i['ssim']:.3f} → {m['ssim']:.3f}, LPIPS {i['lpips']:.3f} → {m['lpips']:.3f}"
        )
    return f"{head}, step {m['step']}: PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.3f}, LPIPS {m['lpips']:.3f}"


def render_card(
    repo_id: str,
    vae: AutoencoderKL,
    stats: dict | None,
    entry: EvalEntry | None,
    training_config: dict | None,
    train_metrics: dict | None,
    license: str,
) -> ModelCard:
    """The model card: metadata (library, tags, license, datasets, model-index) and a readable body."""
    name = repo_id.split("/")[-1]
    datasets_meta = None
    if entry is not None and entry.run.get("dataset", {}).get("hub_id"):
        datasets_meta = [entry.run["dataset"]["hub_id"]]
    data = ModelCardData(
        library_name="diffusers",
        license=license,
        model_name=name,
        datasets=datasets_meta,
        tags=["diffusers", "autoencoderkl", "vae", "latent-diffusion", "image-to-image"],
        eval_results=eval_results(entry, name) if entry is not None else None,
    )
    c = vae.config
    headline = ""
    if entry is not None:
        m = entry.metrics
        headline = (
            f" On {entry.run.get('dataset', {}).get('name', entry.run['data'])} at {entry.run['resolution']} px it "
            f"reconstructs with PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.3f}, LPIPS {m['lpips']:.3f}"
            + (f", rFID {m['rfid']:.2f}" if m.get("rfid") is not None else "")
            + "."
        )
    body = [
        f"# {name}",
        "",
        f"A KL-regularised convolutional VAE (diffusers `AutoencoderKL`) for latent diffusion: "
        f"{downsampling_factor(vae)}× downsampling to {c.latent_channels} latent channels, "
        f"{count_parameters(vae) / 1e6:.1f}M parameters.{headline}",
        "",
        "Files: `diffusion_pytorch_model.safetensors` (fp32) and `diffusion_pytorch_model.fp16.safetensors` "
        '(`variant="fp16"`), `config.json` (with the latent statistics), `latent_stats.json`, '
        "`training_config.yaml`, `eval_results.json`.",
        "",
        *_usage_section(repo_id, vae),
        *_stats_section(vae, stats),
        *_eval_section(entry),
        *_latent_section(entry, train_metrics),
        *_training_section(vae, training_config, train_metrics),
        "Trained with autoencoder-kl-trainer (Hugging Face Accelerate; L1/L2 + LPIPS + β-KL, optional PatchGAN).",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")


def _read_yaml(path: Path) -> dict | None:
    """A YAML file's content, or None if absent."""
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def _training_metrics(model_dir: Path) -> dict | None:
    """The training run's metrics.json (``<output_dir>/metrics.json`` beside ``<output_dir>/vae``), if any."""
    path = model_dir.parent / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    return metrics if "train_seconds_this_run" in metrics else None


def check_repo_id(repo_id: str) -> None:
    """Refuse a repository id the Hub would reject, before any work."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise PublishError(
            f"--repo_id {repo_id!r} is not a Hub repository id ({str(exc).splitlines()[0]})",
            "write USER/NAME, e.g. --repo_id me/my-vae",
        ) from None


PUBLISH = "python -m diffusion_bridge publish"  # the marker of a prepared folder (autoencoder.folders)
# Everything a prepared repo folder holds (what prepare_folder writes; .cache: huggingface_hub's upload state).
PUBLISH_WRITES = (
    "README.md",
    "config.json",
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "latent_stats.json",
    "training_config.yaml",
    "eval_results.json",
    "reconstructions.png",
    ".cache",
)


def publish_folder(folder: Path, model_dir: Path) -> RunDir:
    """The repo folder, checked: it is replaced whole, so never the model folder, a folder above it, or anyone's."""
    source, target = model_dir.resolve(), folder.resolve()
    if target == source or target in source.parents:
        raise PublishError(
            f"the folder to prepare, {str(folder)!r}, is or holds the model folder {str(model_dir)!r} being published",
            "give --dry_run/--folder a new folder, e.g. OUT/hub-upload",
        )
    repo = RunDir(folder, PUBLISH, "--dry_run/--folder", only=lambda n: n in PUBLISH_WRITES, error=PublishError)
    repo.check()
    return repo


def prepare_folder(
    model_dir: str | Path,
    folder: str | Path,
    repo_id: str,
    eval_dir: str | None = None,
    allow_missing_stats: bool = False,
    allow_missing_eval: bool = False,
    license: str = "apache-2.0",
) -> Path:
    """Check the model and write the complete repo folder; returns it. Refusals raise PublishError."""
    model_dir, folder = Path(model_dir), Path(folder)
    check_repo_id(repo_id)
    if not (model_dir / "config.json").is_file():
        raise PublishError(
            f"{model_dir} is not a diffusers model folder (no config.json)",
            "give the exported vae/ folder of a training run (save_pretrained output)",
        )
    vae = AutoencoderKL.from_pretrained(model_dir).float()
    check_finite(vae)
    stats = read_latent_stats(model_dir, vae, allow_missing_stats)
    entry = read_eval(eval_dir, model_dir, allow_missing_eval)
    training_config = _read_yaml(model_dir / "training_config.yaml")
    train_metrics = _training_metrics(model_dir)

    return publish_folder(folder, model_dir).rewrite(
        lambda tmp: write_folder(tmp, vae, model_dir, repo_id, stats, entry, training_config, train_metrics, license)
    )


def write_folder(tmp: Path, vae, model_dir: Path, repo_id: str, stats, entry, training_config, train_metrics, license):
    """Write the repo files into ``tmp``: fp32 + fp16 weights, config, statistics, evaluation, card (its marker,
    written by ``RunDir.rewrite``, is not uploaded: see ``upload``)."""
    cast(copy.deepcopy(vae), torch.float16).save_pretrained(tmp, variant="fp16", safe_serialization=True)
    vae.save_pretrained(tmp, safe_serialization=True)  # fp32 weights; config.json is the same for both
    for name in ("latent_stats.json", "training_config.yaml"):
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, tmp / name)
    if entry is not None:
        (tmp / "eval_results.json").write_text(json.dumps({**entry.run, "models": {repo_id: entry.metrics}}, indent=2))
        grid = entry.source.parent / "reconstructions.png"
        if grid.is_file():
            shutil.copy2(grid, tmp / "reconstructions.png")
    render_card(repo_id, vae, stats, entry, training_config, train_metrics, license).save(tmp / "README.md")


def upload(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    api: HfApi | None = None,
) -> str:
    """Create the repo (exist_ok) and upload ``folder``; returns the commit URL. Failures keep the folder."""
    token = token or get_token()  # HF_TOKEN or the saved `hf auth login`
    retry = f"The prepared folder is kept at {folder}; retry the same command (or `hf upload {repo_id} {folder} .`)."
    if token is None:
        raise PublishError("no Hugging Face token", f"set HF_TOKEN or run `hf auth login`. {retry}")
    api = api or HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            revision=revision,
            repo_type="model",
            commit_message=commit_message or "Upload AutoencoderKL",
            ignore_patterns=[MARKER],  # our folder marker stays local
        )
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        hint = "check that the token has write access to this namespace. " if status in (401, 403) else ""
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise PublishError(f"the Hub refused the upload to {repo_id} (HTTP {status}): {first}", hint + retry) from exc
    except Exception as exc:  # network: connection errors, timeouts, DNS
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise PublishError(f"upload to {repo_id} failed ({type(exc).__name__}: {first})", retry) from exc
    return getattr(info, "commit_url", str(info))
