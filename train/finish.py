"""The end of a run: final validation, metrics.json, the fp16 check and latent statistics, the export, the push."""

import json
import os
import shutil
import signal
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

from autoencoder.config import Config, save_config
from autoencoder.data import collate
from autoencoder.errors import agreement
from autoencoder.folders import write_atomic
from autoencoder.models import half_check_latents, half_precision_decode_check, needs_force_upcast
from diffusion_bridge.publish import PublishError, prepare_folder, upload
from diffusion_bridge.stats import MIN_IMAGES, collect_latent_stats, describe, process_shard, too_few_images

from . import checkpoints
from .loop import Loop
from .run import Run, end_run, param_checksum
from .validation import ema_weights, summary, validate

logger = get_logger(__name__)


def interrupted(run: Run, loop: Loop) -> dict:
    """A stop request: checkpoint the last completed step and say how to continue."""
    step = run.state.global_step
    path = checkpoints.save(run.accelerator, run.model.module, run.cfg, run.folder, step)
    logger.warning(
        f"{signal.Signals(loop.interrupted).name} received: saved {path} at step {step}; "
        "continue with --resume_from_checkpoint latest"
    )
    end_run(run)
    return {"step": step, "interrupted": int(loop.interrupted), "checkpoint": str(path)}


def finish(run: Run, loop: Loop, initial: dict) -> dict:
    """Validate the final weights, checkpoint the end, export ``<output_dir>/vae`` and push; the metrics."""
    t, step = run.cfg.train, run.state.global_step
    results = loop.results
    if results.get("step") != step:
        with ema_weights(run.ema, run.vae_params):
            results = validate(run, step)
        logger.info(f"final: {summary(results)}")
    metrics = run_metrics(run, loop, results, initial)
    if t.checkpointing_steps and step % t.checkpointing_steps:  # the end is always resumable/extendable
        checkpoints.save(run.accelerator, run.model.module, run.cfg, run.folder, step)
    with ema_weights(run.ema, run.vae_params), torch.compiler.set_stance("force_eager"):  # no compiles for these shapes
        if run.accelerator.is_main_process:
            metrics["fp16_decode"] = set_force_upcast(run)
        if t.latent_stats:
            metrics["latent_stats"] = set_latent_stats(run)
        vae_dir = export(run, metrics)
    logger.info(f"exported {vae_dir}; metrics in {run.folder.path / 'metrics.json'}")
    if t.push_to_hub and run.accelerator.is_main_process:
        metrics["push_to_hub"] = push_to_hub(run, metrics, vae_dir)
        run.folder.write_text("metrics.json", json.dumps(metrics, indent=2))
    run.accelerator.wait_for_everyone()
    end_run(run)
    return metrics


def run_metrics(run: Run, loop: Loop, results: dict, initial: dict) -> dict:
    """metrics.json: the held-out figures, the latent report, the run's counters, timing and hardware."""
    t, acc, s = run.cfg.train, run.accelerator, run.state
    health = s.health()
    checksums = acc.gather(torch.tensor([param_checksum(run.vae)], dtype=torch.float64, device=acc.device))
    first = {k.split("/", 1)[1]: initial[k] for k in ("val/psnr", "val/ssim", "val/lpips")} if initial else None
    return {
        "step": s.global_step,
        "resolution": run.cfg.data.resolution,
        "data": run.data.splits.description,
        "n_images": results["val/n_images"],
        **few_images_warning(results["val/n_images"]),
        "lpips_net": t.val_lpips_net,
        "ema": t.use_ema,
        "psnr": results["val/psnr"],
        "ssim": results["val/ssim"],
        "lpips": results["val/lpips"],
        "colour_shift_rgb": [results[f"val/colour_shift_{c}"] for c in "rgb"],  # mean per-image |shift|, levels
        "val": {k: v for k, v in results.items() if k.startswith("val/")},
        "latent": results.get("latent"),  # rate, active units, prior gap of the held-out images (eval.latent)
        "initial": first,
        "skipped_images": health["skipped_images"],
        "nonfinite_steps": health["nonfinite_steps"],
        "startup_seconds": loop.started - run.called,  # checks, data, model, prepare, resume, first validation
        "train_seconds_this_run": loop.seconds,
        "data_wait_seconds": loop.waits.data,  # of train_seconds_this_run, blocked on the loader
        "device_wait_seconds": loop.waits.device,  # blocked on the device (GPU)
        # (step, seconds into the loop, data wait, device wait) at each logging step: benchmarks/train_throughput.py
        "log_marks": loop.log_marks,
        "num_processes": acc.num_processes,
        "mixed_precision": t.mixed_precision,
        "hardware": hardware(acc),
        # Trained (non-EMA) weights per rank: equal when gradients are synchronised.
        "param_checksum_per_rank": checksums.cpu().tolist(),
        "param_checksum_initial": run.initial_checksum,
    }


def few_images_warning(n: int) -> dict:
    """{'validation_warning': ...} when the held-out figures rest on fewer than MIN_IMAGES images, else {}."""
    if n >= MIN_IMAGES:
        return {}
    return {"validation_warning": f"the held-out figures come from only {n} image(s) (fewer than {MIN_IMAGES})"}


def set_force_upcast(run: Run) -> dict:
    """Main process: ``force_upcast`` in the VAE's config from a measured fp16 decode of held-out latents."""
    vae, val_ds = run.vae, run.data.validation
    x = torch.stack([val_ds[i]["pixel_values"] for i in range(min(4, len(val_ds)))]).to(run.accelerator.device)
    with torch.no_grad():
        latents = vae.encode(x).latent_dist.mode()
    check = half_precision_decode_check(vae, half_check_latents(latents))
    vae.register_to_config(force_upcast=needs_force_upcast(check))
    return {**check, "force_upcast": vae.config.force_upcast}


def set_latent_stats(run: Run) -> dict:
    """Collective: every rank encodes its share of the held-out images; the statistics go into the VAE's config."""
    t, acc = run.cfg.train, run.accelerator
    vae = run.vae
    shard = process_shard(run.data.validation, acc.process_index, acc.num_processes)
    stats_dl = torch.utils.data.DataLoader(shard, batch_size=t.validation_batch_size, collate_fn=collate)
    stats = collect_latent_stats(vae, stats_dl, acc, sample_posterior=True, seed=t.seed)
    vae.register_to_config(**stats.config_values(t.latent_convention))
    logger.info("latent statistics (validation split): " + describe(stats).replace("\n", "; "))
    warning = too_few_images(stats.num_images)
    if warning:
        logger.warning(warning)
    return {**stats.to_json(t.latent_convention), **({"warning": warning} if warning else {})}


def export(run: Run, metrics: dict) -> Path:
    """Write ``<output_dir>/vae`` (fp32 safetensors + config), the resolved config and metrics.json (collective).

    Written into ``.tmp-vae`` and swapped in whole; a full disk leaves the earlier export and metrics as they were.
    """
    folder = run.folder
    tmp = folder.path / ".tmp-vae"
    fix = "rerun with --resume_from_checkpoint latest (it exports without training again)"
    with agreement(), folder.guard(tmp, lambda: checkpoints.survivors(folder.path), fix, partial=tmp):
        if run.accelerator.is_main_process:
            vae = run.vae
            assert all(p.dtype == torch.float32 for p in vae.parameters()), "master weights must stay fp32"
            vae.register_to_config(sample_size=exported_sample_size(run))
            shutil.rmtree(tmp, ignore_errors=True)
            vae.save_pretrained(tmp, safe_serialization=True)
            save_config(run.cfg, tmp / "training_config.yaml")
            if "latent_stats" in metrics:
                (tmp / "latent_stats.json").write_text(json.dumps(metrics["latent_stats"], indent=2))
            folder.replace(tmp, "vae")
            write_atomic(folder.path / "metrics.json", json.dumps(metrics, indent=2))
    return folder.path / "vae"


def exported_sample_size(run: Run) -> int:
    """``sample_size`` of the export: the training resolution, the tile size diffusers' ``enable_tiling()`` takes
    from it (SD's VAEs carry 512, SDXL's 1024).  A fine-tune at a lower resolution keeps the pretrained model's
    own, larger value: the model was trained at that size before."""
    resolution, own = run.cfg.data.resolution, run.vae.config.sample_size
    own = max(own) if isinstance(own, list | tuple) else own
    return max(resolution, own) if run.cfg.model.pretrained_model_name_or_path else resolution


def hardware(accelerator: Accelerator) -> str:
    """What trained the model, for the model card: '2 x NVIDIA H100 ...' or '1 x CPU (2 cores)'."""
    device = accelerator.device
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{device.type.upper()} ({os.cpu_count()} cores)"
    return f"{accelerator.num_processes} x {name}"


def eval_payload(cfg: Config, metrics: dict, vae_dir: Path) -> dict:
    """The held-out validation figures in ``python -m eval``'s metrics.json format (what publishing reads)."""
    d = cfg.data
    name = d.dataset_name or (Path(d.train_data_dir).name if d.train_data_dir else "embedded held-out photographs")
    val = {k.split("/", 1)[1]: v for k, v in metrics["val"].items()}
    val = {k: v for k, v in val.items() if k in ("psnr", "ssim", "ms_ssim", "lpips")}
    return {
        "data": metrics["data"],
        "dataset": {"name": name, "hub_id": d.dataset_name, "split": "held-out validation"},
        "n_images": metrics["n_images"],
        "resolution": d.resolution,
        "preprocessing": "the training run's validation transform (resize shorter side, antialiased, centre crop; "
        "tiles of held-out photographs for the embedded data)",
        "lpips_net": metrics["lpips_net"],
        "rfid_status": "not computed during training (run `python -m eval` for rFID)",
        "models": {str(vae_dir): {**val, "n_images": metrics["n_images"], "resolution": d.resolution}},
    }


def push_to_hub(run: Run, metrics: dict, vae_dir: Path) -> dict:
    """Publish the export with its held-out figures (main process); failures are reported, the folder kept."""
    cfg, out = run.cfg, run.folder.path
    (out / "eval").mkdir(exist_ok=True)
    write_atomic(out / "eval" / "metrics.json", json.dumps(eval_payload(cfg, metrics, vae_dir), indent=2))
    try:
        folder = prepare_folder(vae_dir, out / "hub-upload", cfg.train.hub_model_id, eval_dir=str(out / "eval"))
        url = upload(
            folder,
            cfg.train.hub_model_id,
            private=cfg.train.hub_private,
            commit_message=f"AutoencoderKL after {metrics['step']} steps",
        )
    except PublishError as exc:
        logger.error(f"push_to_hub failed: {exc}")
        return {"error": str(exc)}
    logger.info(f"pushed to https://huggingface.co/{cfg.train.hub_model_id} ({url})")
    return {"repo_id": cfg.train.hub_model_id, "commit_url": url}
