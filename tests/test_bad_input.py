"""Every command answers a mistake with one line ``error: <what>; <fix>``, a documented exit status and no traceback.

Table-driven: each row runs the real command in a subprocess (offline, as a new user would) and
checks the exit status, a fragment of the message and the absence of "Traceback".  Rows that
point ``train`` at an output folder holding an earlier run check that nothing in it changed.
"""

import hashlib
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, SHARED, accelerate_launch, reset_accelerate
from PIL import Image

import train.trainer as trainer
from autoencoder.config import ModelConfig
from autoencoder.errors import EXIT_OOM, EXIT_USAGE
from autoencoder.folders import RunDir
from autoencoder.models import build_vae

CIFAR = SHARED / "data" / "cifar10" / "train.parquet"
TRAIN = ("train", "--config=tiny", "--max_train_steps=2")

# (id, module and arguments, exit status, fragment of the error line).  Placeholders: {M} a tiny
# diffusers VAE folder, {EMPTY} an empty folder, {CORRUPT} 3 unreadable .png files, {FEW} 5 good +
# 3 unreadable images, {FILE} a regular file, {OUT} an output folder holding an earlier run, {TMP} scratch.
# fmt: off
ROWS = [
    ("train-missing-data-dir", (*TRAIN, "--train_data_dir=/nonexistent"), 2, "--train_data_dir '/nonexistent' does not exist"),
    ("train-empty-dir", (*TRAIN, "--train_data_dir={EMPTY}"), 2, "holds no data files"),
    ("train-all-corrupt", (*TRAIN, "--train_data_dir={CORRUPT}"), 2, "training images probed from --train_data_dir could be read"),
    ("train-too-few-readable", (*TRAIN, "--train_data_dir={FEW}", "--train_batch_size=6"), 2, "of 7 unreadable"),
    ("train-offline-hub-dataset", (*TRAIN, "--dataset_name=no/such-dataset"), 2, "the Hugging Face Hub cannot be reached"),
    ("train-local-dataset-name", (*TRAIN, "--dataset_name=./no/such/folder"), 2, "does not exist"),
    ("train-wrong-image-column", (*TRAIN, f"--train_data_dir={CIFAR}", "--image_column=img"), 2, "image column 'img' not in"),
    ("train-missing-pretrained", (*TRAIN, "--pretrained_model_name_or_path=/nonexistent"), 2, "'/nonexistent' does not exist"),
    ("train-offline-hub-model", (*TRAIN, "--pretrained_model_name_or_path=no/such-model"), 2, "cannot be reached"),
    ("train-folder-without-config", (*TRAIN, "--pretrained_model_name_or_path={EMPTY}"), 2, "has no config.json"),
    ("train-resolution-vs-downsampling", (*TRAIN, "--resolution=33"), 2, "not a multiple of the VAE's downsampling 2"),
    ("train-unknown-key", (*TRAIN, "--learning_rte=1e-4"), 2, "did you mean: learning_rate"),
    ("train-wrong-type", (*TRAIN, "--learning_rate=fast"), 2, "expects float"),
    ("train-zero-steps", ("train", "--config=tiny", "--max_train_steps=0"), 2, "'max_train_steps' must be >= 1"),
    ("train-missing-config", ("train", "--config=no-such-preset"), 2, "config file 'no-such-preset' not found"),
    ("train-output-is-a-file", ("train", "--config=tiny", "--output_dir={FILE}"), 2, "is a file, not a folder"),
    ("train-missing-resume", (*TRAIN, "--resume_from_checkpoint={TMP}/nope"), 2, "is not a checkpoint folder"),
    ("train-bad-repo-id", (*TRAIN, "--push_to_hub", "--hub_model_id=bad id!!"), 2, "is not a Hub repository id"),
    ("train-both-sources", (*TRAIN, "--dataset_name=a/b", "--train_data_dir={EMPTY}"), 2, "give only one of them"),
    ("train-missing-lpips-weights", (*TRAIN, "--lpips_weights=/nonexistent"), 2, "LPIPS"),
    ("eval-missing-model", ("eval", "--model=/nonexistent", "--output_dir={TMP}/e"), 2, "--model '/nonexistent' does not exist"),
    ("eval-offline-hub-model", ("eval", "--model=no/such-model", "--output_dir={TMP}/e"), 2, "cannot be reached"),
    ("eval-corrupt-images", ("eval", "--model={M}", "--train_data_dir={CORRUPT}", "--output_dir={TMP}/e"), 2,
     "none of the 3 evaluation images"),
    ("eval-missing-data-dir", ("eval", "--model={M}", "--train_data_dir=/nonexistent", "--output_dir={TMP}/e"), 2, "does not exist"),
    ("eval-resolution", ("eval", "--model={M}", "--resolution=33", "--output_dir={TMP}/e"), 2, "not a multiple"),
    ("eval-output-is-a-file", ("eval", "--model={M}", "--output_dir={FILE}"), 2, "is a file, not a folder"),
    ("eval-missing-split", ("eval", "--model={M}", f"--train_data_dir={CIFAR}", "--split=validation",
                            "--output_dir={TMP}/e"), 2, "split 'validation' not in"),
    ("eval-zero-batch", ("eval", "--model={M}", "--batch_size=0", "--output_dir={TMP}/e"), 2, "--batch_size must be >= 1"),
    ("sweep-one-value", ("train.sweep", "--config=tiny", "--kl_weight=1e-6"), 2, "a sweep needs at least two runs"),
    ("sweep-not-numbers", ("train.sweep", "--config=tiny", "--kl_weight=small,large"), 2, "is not a list of floats"),
    ("sweep-axis-shared-by-eval", ("train.sweep", "--kl_weight=1e-6,1e-5", "--resolution=32,64"), 2, "--resolution cannot be a sweep axis"),
    ("sweep-output-dir", ("train.sweep", "--kl_weight=1e-6,1e-5", "--output_dir={TMP}/x"), 2, "use --sweep_dir"),
    ("sweep-bad-train-flag", ("train.sweep", "--kl_weight=1e-6,1e-5", "--max_train_step=5"), 2, "did you mean: max_train_steps"),
    ("bridge-stats-offline-dataset", ("diffusion_bridge", "stats", "--model={M}", "--dataset_name=no/such"), 2, "cannot be reached"),
    ("bridge-encode-missing-model", ("diffusion_bridge", "encode", "--model=/nonexistent", "--output_dir={TMP}/c"), 2,
     "--model '/nonexistent' does not exist"),
    ("bridge-stats-empty-dir", ("diffusion_bridge", "stats", "--model={M}", "--train_data_dir={EMPTY}"), 2, "holds no data files"),
    ("bridge-encode-shift-convention", ("diffusion_bridge", "encode", "--model={M}", "--shift_factor=0.1",
                                        "--output_dir={TMP}/c"), 2, "--shift_factor applies to --convention sd3"),
    ("bridge-encode-no-stats", ("diffusion_bridge", "encode", "--model={M}", "--output_dir={TMP}/c"), 2, "no latent statistics"),
    ("bridge-info-model-file", ("diffusion_bridge", "info", "--model={FILE}"), 2, "is a file, not a model folder"),
    ("bridge-publish-bad-repo-id", ("diffusion_bridge", "publish", "--model={M}", "--repo_id=bad id!!", "--dry_run={TMP}/p"),
     2, "is not a Hub repository id"),
    ("bridge-publish-into-a-run", ("diffusion_bridge", "publish", "--model={M}", "--repo_id=me/x", "--dry_run={OUT}", "--allow_missing_eval", "--allow_missing_stats"), 2, "was written by `python -m train`, not `python -m diffusion_bridge publish`"),
    ("bridge-publish-above-its-source", ("diffusion_bridge", "publish", "--model={OUT}/vae", "--repo_id=me/x", "--folder={OUT}", "--allow_missing_eval", "--allow_missing_stats"), 2, "is or holds the model folder"),
    ("bridge-publish-into-its-source", ("diffusion_bridge", "publish", "--model={OUT}/vae", "--repo_id=me/x", "--dry_run={OUT}/vae", "--allow_missing_eval", "--allow_missing_stats"), 2, "is or holds the model folder"),
    ("eval-into-a-run", ("eval", "--model={M}", "--output_dir={OUT}"), 2, "was written by `python -m train`, not `python -m eval`"),
    ("bridge-publish-no-eval", ("diffusion_bridge", "publish", "--model={M}", "--repo_id=me/x", "--dry_run={TMP}/p",
                                "--allow_missing_stats"), 2, "refusing to publish without an evaluation"),
    ("bridge-encode-sdxl-without-its-stats", ("diffusion_bridge", "encode", "--model={SD3}", "--convention=sdxl", "--output_dir={TMP}/c"), 2,
     "the sdxl convention needs latents_mean/latents_std in the VAE config, and this one has none; run `python -m diffusion_bridge stats --model DIR --write --convention sdxl` first"),
    ("bridge-encode-sd3-without-a-shift", ("diffusion_bridge", "encode", "--model={M}", "--convention=sd3", "--output_dir={TMP}/c"), 2,
     "the sd3 convention needs shift_factor"),
    ("bridge-stats-sdxl-of-16-channels", ("diffusion_bridge", "stats", "--model={M16}", "--resolution=32", "--num_images=4", "--write",
                                          "--convention=sdxl"), 2, "assumes 4 latent channels; this VAE has 16; use --convention sd3 or sd"),
    ("eval-truncated-weights", ("eval", "--model={TRUNCATED}", "--output_dir={TMP}/e"), 2,
     "diffusion_pytorch_model.safetensors' is damaged or incomplete"),
    ("bridge-info-corrupt-weights", ("diffusion_bridge", "info", "--model={CORRUPTED}"), 2,
     "diffusion_pytorch_model.safetensors' is damaged or incomplete"),
    ("bridge-publish-truncated-weights", ("diffusion_bridge", "publish", "--model={TRUNCATED}", "--repo_id=me/x", "--dry_run={TMP}/p",
                                          "--allow_missing_eval", "--allow_missing_stats"), 2, "is damaged or incomplete"),
    ("train-truncated-pretrained", (*TRAIN, "--pretrained_model_name_or_path={TRUNCATED}"), 2, "is damaged or incomplete"),
    ("eval-truncated-checkpoint", ("eval", "--model={CKPT}", "--output_dir={TMP}/e"), 2,
     "model.safetensors' is damaged or incomplete"),
]
# fmt: on


def _png(path: Path, seed: int) -> None:
    """A small random RGB image."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, str]:
    """The folders and files the rows' placeholders name."""
    root = tmp_path_factory.mktemp("bad-input")
    (root / "empty").mkdir()
    (root / "corrupt").mkdir()
    for i in range(3):
        (root / "corrupt" / f"img{i}.png").write_bytes(os.urandom(2000))
    (root / "few").mkdir()
    for i in range(5):
        _png(root / "few" / f"good{i}.png", i)
    for i in range(3):
        (root / "few" / f"bad{i}.png").write_bytes(b"not an image")
    (root / "a-file").write_text("not a folder")
    torch.manual_seed(0)
    build_vae(ModelConfig(preset="tiny")).save_pretrained(root / "M")
    sd3 = build_vae(ModelConfig(preset="tiny"))
    sd3.register_to_config(scaling_factor=0.5, shift_factor=0.1)  # what `stats --write` (sd3) leaves
    sd3.save_pretrained(root / "SD3")
    build_vae(ModelConfig(preset="tiny", latent_channels=16)).save_pretrained(root / "M16")
    for name, damage in (("truncated", lambda b: b[:1000]), ("corrupted", lambda b: b"\xff" * 8 + b[8:])):
        shutil.copytree(root / "M", root / name)
        weights = root / name / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(damage(weights.read_bytes()))
    ckpt = root / "run" / "checkpoints" / "checkpoint-1"  # a training checkpoint cut short in a copy
    ckpt.mkdir(parents=True)
    shutil.copy2(root / "M" / "config.json", ckpt / "config.json")
    (ckpt / "model.safetensors").write_bytes((root / "M" / "diffusion_pytorch_model.safetensors").read_bytes()[:1000])
    return {
        "SD3": str(root / "SD3"),
        "M16": str(root / "M16"),
        "TRUNCATED": str(root / "truncated"),
        "CORRUPTED": str(root / "corrupted"),
        "CKPT": str(ckpt),
        "M": str(root / "M"),
        "EMPTY": str(root / "empty"),
        "CORRUPT": str(root / "corrupt"),
        "FEW": str(root / "few"),
        "FILE": str(root / "a-file"),
        "TMP": str(root),
    }


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory, places) -> Path:
    """An output folder holding an earlier run's export, config and checkpoint."""
    out = tmp_path_factory.mktemp("earlier") / "run"
    shutil.copytree(places["M"], out / "vae")
    (out / "config.yaml").write_text("train:\n  max_train_steps: 7\n")
    (out / "checkpoints" / "checkpoint-7").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-7" / "model.safetensors").write_bytes(b"weights")
    RunDir(out, "python -m train", "--output_dir").claim()  # a run's folder: python -m train writes into it
    return out


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its sha256."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def _env(lpips_dir: Path) -> dict[str, str]:
    """Offline, with the verified LPIPS backbones, warnings silenced as a user's terminal would show them."""
    return {
        **os.environ,
        "LPIPS_WEIGHTS": str(lpips_dir),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
        "AUTOENCODER_DEBUG": "",
    }


# Rows run through the real ``python -m`` path in a subprocess: the Hub must look offline from the
# start (huggingface_hub and datasets read HF_HUB_OFFLINE at import), and a cold start proves the CLI.
SUBPROCESS_ROWS = {
    "train-offline-hub-dataset",
    "train-offline-hub-model",
    "eval-offline-hub-model",
    "bridge-stats-offline-dataset",
    "sweep-bad-train-flag",
}
MAINS = {
    "train": "train.trainer",
    "train.sweep": "train.sweep",
    "eval": "eval.runner",
    "diffusion_bridge": "diffusion_bridge.cli",
}


def _run(args: list[str], in_process: bool, lpips_dir: Path, monkeypatch, capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``python -m ARGS``: in this process (``main(argv)``) or a fresh one."""
    if not in_process:
        result = subprocess.run(
            [sys.executable, "-m", *args], cwd=REPO, env=_env(lpips_dir), capture_output=True, text=True, timeout=300
        )
        return result.returncode, result.stdout, result.stderr
    for key, value in _env(lpips_dir).items():
        if key in ("LPIPS_WEIGHTS", "AUTOENCODER_DEBUG"):
            monkeypatch.setenv(key, value)
    reset_accelerate()
    capsys.readouterr()
    code = importlib.import_module(MAINS[args[0]]).main(args[1:])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_mistake_gives_one_line_and_exit_status(row, places, earlier_run, lpips_dir, monkeypatch, capsys):
    name, command, status, fragment = row
    args = [a.format(**places, OUT=str(earlier_run)) for a in command]
    if args[0] == "train" and not any(a.startswith("--output_dir") for a in args):
        args.append(f"--output_dir={earlier_run}")
    before = _snapshot(earlier_run)
    code, stdout, stderr = _run(args, name not in SUBPROCESS_ROWS, lpips_dir, monkeypatch, capsys)
    output = stdout + stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == status, output[-3000:]
    assert "Traceback" not in output
    assert len(errors) == 1 and fragment in errors[0], output[-3000:]
    assert "; " in errors[0]  # what is wrong; how to fix it
    assert _snapshot(earlier_run) == before  # nothing lost or half-written


def test_debug_flag_shows_the_traceback(places, lpips_dir):
    result = subprocess.run(
        [sys.executable, "-m", "eval", "--model=/nonexistent", "--debug"],
        cwd=REPO,
        env=_env(lpips_dir),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == EXIT_USAGE
    assert "Traceback" in result.stderr and result.stderr.strip().splitlines()[-1].startswith("error: --model")


@pytest.mark.slow
def test_two_ranks_end_together_with_one_message(places, lpips_dir, tmp_path):
    """Under ``accelerate launch`` with 2 processes a data mistake ends both ranks, with one line from our code.

    What accelerate adds on top differs by release (README, "Errors"): with ``--quiet`` nothing, exit 1
    (1.1 to 1.16); without it a ``CalledProcessError`` traceback naming our status 2, and from 1.16 on a
    ``RuntimeError`` that repeats the child's stderr before it.  So the count of our lines is read from the
    ``--quiet`` run, and our process's status from accelerate's report of the other.
    """
    args = ("train", "--config=tiny", f"--train_data_dir={places['CORRUPT']}")

    def launch(*extra: str, out: str) -> subprocess.CompletedProcess:
        cmd = accelerate_launch(*args, f"--output_dir={tmp_path / out}", launcher_args=extra)
        return subprocess.run(cmd, cwd=REPO, env=_env(lpips_dir), capture_output=True, text=True, timeout=600)

    quiet = launch("--quiet", out="quiet")
    errors = [line for line in quiet.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "could be read" in errors[0], quiet.stderr[-3000:]
    assert errors[0].startswith("error: [rank 0] ") and "; " in errors[0]
    assert "Traceback" not in quiet.stderr and quiet.returncode == 1  # accelerate's own status under --quiet

    loud = launch(out="loud")
    assert loud.returncode == 1 and loud.stderr.rstrip().endswith("returned non-zero exit status 2."), loud.stderr[
        -3000:
    ]
    ours = ("/train/", "/eval/", "/autoencoder/", "/diffusion_bridge/")
    assert (
        not [  # every traceback is accelerate's: none passes through our code
            line
            for line in loud.stderr.splitlines()
            if line.strip().startswith("File") and any(p in line for p in ours)
        ]
    )


@pytest.mark.slow
def test_out_of_memory_checkpoints_then_names_the_batch_and_remedies(tmp_path, lpips_dir, monkeypatch, capsys):
    """An OOM in step 6's forward: the run saves step 5, exits 3 with the failing batch, and its resume trains on
    the failed batch and then on exactly the batches the uninterrupted run trains on."""
    from conftest import out_of_memory_at, record_batches

    from autoencoder.losses import VAELoss

    monkeypatch.setenv("LPIPS_WEIGHTS", str(lpips_dir))
    real_forward = VAELoss.forward

    args = ["--config=tiny", "--max_train_steps=8", "--checkpointing_steps=4", "--validation_steps=0"]
    trained = record_batches(monkeypatch)
    reset_accelerate()
    assert trainer.main([*args, f"--output_dir={tmp_path / 'plain'}"]) == 0
    uninterrupted = trained[:]
    trained.clear()
    out_of_memory_at(monkeypatch, 6)
    out = tmp_path / "oom"
    args.append(f"--output_dir={out}")
    reset_accelerate()
    assert trainer.main(args) == EXIT_OOM
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the in-process run trains where the GPU is
    assert line.startswith(f"error: out of memory at step 6 on {device}"), line
    assert "with --train_batch_size 4" in line
    assert "--gradient_checkpointing" in line and "--mixed_precision=bf16" in line
    assert f"saved {out / 'checkpoints' / 'checkpoint-5'} at step 5" in line
    assert not (out / "vae").exists()

    monkeypatch.setattr(VAELoss, "forward", real_forward)
    reset_accelerate()
    assert trainer.main([*args, "--resume_from_checkpoint=latest"]) == 0
    assert (out / "vae").is_dir()
    assert trained == uninterrupted  # steps 1-5, then (resumed) 6-8: the failed batch is trained on, none skipped


def test_an_unforeseen_crash_is_one_line_with_status_1_and_a_traceback_only_under_debug(monkeypatch, capsys):
    def broken(cfg):
        raise RuntimeError("boom")

    monkeypatch.setattr(trainer, "train", broken)
    assert trainer.main(["--config=tiny"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == (
        "error: unexpected RuntimeError: boom; this is a bug: rerun with --debug "
        "(or AUTOENCODER_DEBUG=1) for the traceback and report it"
    )
    monkeypatch.setenv("AUTOENCODER_DEBUG", "")
    assert trainer.main(["--config=tiny", "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and 'raise RuntimeError("boom")' in err and err.strip().endswith("report it")
    monkeypatch.delenv("AUTOENCODER_DEBUG")  # --debug exported it for relaunched ranks


def test_interrupt_is_130(monkeypatch, capsys):
    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train", interrupted)
    assert trainer.main(["--config=tiny"]) == 130
    assert capsys.readouterr().err.startswith("error: interrupted")
