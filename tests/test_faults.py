"""The fault table: faults that must never cost a user complete work (like test_bad_input's table).

Each row injects one fault into a real run: a damaged file of each kind in a checkpoint, a SIGKILL at
several points inside a checkpoint write or an export, a full disk or an unwritable folder at each kind
of write, a second run into the same folder, another architecture on resume, a broken config file, a
small validation set.  Each checks the exit status, the message, and that nothing complete was lost:
every checkpoint complete before still verifies and loads, an earlier export still loads, an earlier
``metrics.json`` is unchanged.
"""

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TINY_FAST, _metrics, reset_accelerate, stopped_at
from PIL import Image

import train.trainer
from autoencoder.folders import HOLDER, MARKER, RunDir
from autoencoder.models import load_vae
from train.checkpoints import checkpoint_dirs, damage, latest_checkpoint

BASE = ("--use_ema=true", "--disc_enabled=true", "--checkpointing_steps=5", "--max_train_steps=10")


@pytest.fixture(scope="module", autouse=True)
def _lpips_weights(lpips_dir):
    """The verified LPIPS backbones for every command of this module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LPIPS_WEIGHTS", str(lpips_dir))
        yield


def _train(out: Path, lpips_dir: Path, *args: str) -> int:
    """``python -m train`` in this process on the tiny preset (EMA and discriminator on), into ``out``."""
    reset_accelerate()
    return train.trainer.main([*TINY_FAST, *BASE, f"--output_dir={out}", *args])


@pytest.fixture(scope="module")
def base(tmp_path_factory, lpips_dir) -> Path:
    """A finished run: checkpoint-5 and checkpoint-10 (VAE, discriminator, EMA, both optimizers and schedules,
    RNG, training state), the export and metrics.json."""
    out = tmp_path_factory.mktemp("faults") / "run"
    assert _train(out, lpips_dir) == 0
    return out


def _tree(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative names)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def _intact(run: Path, *steps: int) -> None:
    """The checkpoints of ``steps`` verify against their manifests and their VAE weights load."""
    for step in steps:
        path = run / "checkpoints" / f"checkpoint-{step}"
        assert damage(path) is None, (path, damage(path))
        load_vae(str(path))


def _error(capsys) -> str:
    """The one ``error:`` line of the last command."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0][lines[0].index("error:") :]


# --- damaged checkpoint files ---------------------------------------------------------------------

KINDS = {
    "model.safetensors": "VAE weights",
    "model_1.safetensors": "discriminator weights",
    "optimizer.bin": "VAE optimizer",
    "optimizer_1.bin": "discriminator optimizer",
    "scheduler.bin": "LR schedule",
    "random_states_0.pkl": "RNG states",
    "custom_checkpoint_0.pkl": "training state",
    "custom_checkpoint_1.pkl": "EMA",
    "config.json": "VAE config",
    "manifest.json": "manifest",
}
DAMAGE = [(name, how) for name in KINDS for how in ("truncated", "zero-length")] + [
    ("model.safetensors", "one byte flipped")
]


def _damage(path: Path, how: str) -> None:
    """Cut ``path`` to half, to nothing, or flip one byte in its middle."""
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "zero-length":
        path.write_bytes(b"")
    else:
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("name,how", DAMAGE, ids=[f"{n}-{h.replace(' ', '-')}" for n, h in DAMAGE])
def test_damaged_checkpoint_file(name, how, base, tmp_path, lpips_dir, capsys, caplog):
    run = tmp_path / "run"
    shutil.copytree(base, run)
    bad = run / "checkpoints" / "checkpoint-10"
    _damage(bad / name, how)
    before = _tree(run)
    # named explicitly: exit 2, naming the bad file and the intact alternative
    assert _train(run, lpips_dir, f"--resume_from_checkpoint={bad}") == 2
    line = _error(capsys)
    assert "is damaged" in line and ("manifest.json is unreadable" if name == "manifest.json" else name) in line
    assert "checkpoint-5" in line, line
    # 'latest' skips it with a warning naming it, and resumes from the newest intact one
    assert latest_checkpoint(run / "checkpoints") == run / "checkpoints" / "checkpoint-5"
    assert any("skipping damaged checkpoint" in r.message and str(bad) in r.message for r in caplog.records)
    assert _tree(run) == before  # the refused run changed nothing
    _intact(run, 5)


def test_a_checkpoint_without_its_manifest_is_never_taken(base, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base, run)
    path = run / "checkpoints" / "checkpoint-10"
    assert damage(path) is None
    (path / "manifest.json").unlink()  # a copy that lost it: nothing says the rest was written whole
    assert damage(path) == "manifest.json is missing (the folder was never completed)"
    assert latest_checkpoint(run / "checkpoints") == run / "checkpoints" / "checkpoint-5"


def test_the_total_limit_never_prunes_the_checkpoint_just_written(tmp_path):
    from train.checkpoints import prune

    root = tmp_path / "checkpoints"
    for step in (200, 1000, 1500, 2000):  # a run rewound to step 200 in a folder holding later checkpoints
        (root / f"checkpoint-{step}").mkdir(parents=True)
    removed = prune(root, 3, keep=root / "checkpoint-200")
    assert [p.name for p in removed] == ["checkpoint-1000"]
    assert [p.name for _, p in checkpoint_dirs(root)] == ["checkpoint-200", "checkpoint-1500", "checkpoint-2000"]


def test_latest_resumes_past_a_damaged_checkpoint_end_to_end(base, tmp_path, lpips_dir, caplog):
    run = tmp_path / "run"
    shutil.copytree(base, run)
    _damage(run / "checkpoints" / "checkpoint-10" / "optimizer.bin", "truncated")
    assert _train(run, lpips_dir, "--resume_from_checkpoint=latest") == 0
    assert any(f"resumed from {run / 'checkpoints' / 'checkpoint-5'} at step 5" in r.message for r in caplog.records)
    assert _metrics(run)["step"] == 10
    _intact(run, 5, 10)  # checkpoint-10 written again, whole


# --- SIGKILL inside a checkpoint write or an export -----------------------------------------------

# (id, module, attribute, condition on the call's arguments, setup): the process SIGKILLs itself at that call.
# setup: "stopped" = a run stopped at step 5 writes checkpoint-10; "rewound" = a finished run resumed
# from checkpoint-5 writes checkpoint-10 again (over the old one); "extended" = a finished run trained
# 2 steps more replaces its export.
KILL_POINTS = [
    ("inside-save-state", "torch", "save", "'tmp-checkpoint-10' in str(args[1])", "stopped"),
    (
        "inside-save-state-weights",
        "accelerate.utils.other",
        "safe_save_file",
        "'tmp-checkpoint-10' in str(args[1])",
        "stopped",
    ),
    ("before-the-manifest", "autoencoder.folders.RunDir", "seal", "kwargs.get('step') == 10", "stopped"),
    ("before-the-rename", "train.checkpoints", "swap_in", "args[1].name == 'checkpoint-10'", "stopped"),
    (
        "between-the-renames-of-a-resaved-checkpoint",
        "pathlib.Path",
        "rename",
        "args[0].name == '.tmp-checkpoint-10'",
        "rewound",
    ),
    (
        "inside-the-export",
        "diffusers.AutoencoderKL",
        "save_pretrained",
        "str(args[1]).endswith('.tmp-vae')",
        "extended",
    ),
    ("between-the-export-renames", "pathlib.Path", "rename", "args[0].name == '.tmp-vae'", "extended"),
]
HOOK = """
import importlib, os, signal, sys
split = {module!r}.startswith(("diffusers.", "pathlib.", "autoencoder.folders."))
module, _, cls = {module!r}.rpartition(".") if split else ({module!r}, "", "")
owner = getattr(importlib.import_module(module), cls) if cls else importlib.import_module(module)
original = getattr(owner, {attribute!r})
def killed(*args, **kwargs):
    if {condition}:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
setattr(owner, {attribute!r}, killed)
import train.trainer
sys.exit(train.trainer.main(sys.argv[1:]))
"""


def _killed_run(run: Path, lpips_dir: Path, point: tuple, *args: str) -> None:
    """Run training in a subprocess that SIGKILLs itself at ``point``."""
    name, module, attribute, condition, _ = point
    hook = HOOK.format(module=module, attribute=attribute, condition=condition)
    argv = [*TINY_FAST, *BASE, f"--output_dir={run}", *args]
    env = {**os.environ, "LPIPS_WEIGHTS": str(lpips_dir), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-c", hook, *argv], cwd=REPO, env=env, capture_output=True, timeout=600)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-3000:]


@pytest.mark.parametrize("point", KILL_POINTS, ids=[p[0] for p in KILL_POINTS])
def test_sigkill_inside_a_write(point, base, tmp_path, lpips_dir, caplog):
    setup, run = point[-1], tmp_path / "run"
    if setup == "stopped":
        stopped_at(base, 5, run)
        args = ["--resume_from_checkpoint=latest"]
    else:
        shutil.copytree(base, run)
        args = ["--resume_from_checkpoint=latest", "--max_train_steps=12", "--checkpointing_steps=0"]
    earlier = (
        {"vae": _tree(run / "vae"), "checkpoint-10": _tree(run / "checkpoints" / "checkpoint-10")}
        if setup != "stopped"
        else {}
    )
    first = [f"--resume_from_checkpoint={run / 'checkpoints' / 'checkpoint-5'}"] if setup == "rewound" else args
    _killed_run(run, lpips_dir, point, *first)
    if setup == "stopped":
        assert not (run / "checkpoints" / "checkpoint-10").exists()  # never a half-written one that looks done
        _intact(run, 5)
    else:  # the earlier export and checkpoint-10 survive whole: in place, or moved aside by the first rename
        for name, folder in (("vae", run / "vae"), ("checkpoint-10", run / "checkpoints" / "checkpoint-10")):
            kept = folder if folder.is_dir() else folder.with_name(f".old-{folder.name}")
            assert _tree(kept) == earlier[name], name
    # the killed run resumes: leftovers cleaned, moved-aside folders restored, the dead process's lock no obstacle
    assert _train(run, lpips_dir, *args) == 0
    resumed = 5 if setup == "stopped" else 10
    assert any(f"checkpoint-{resumed} at step {resumed}" in r.message for r in caplog.records)
    assert _metrics(run)["step"] == (10 if setup == "stopped" else 12)
    assert not list(run.rglob(".tmp-*")) and not list(run.rglob(".old-*"))
    _intact(run, 5, 10)
    if setup != "stopped":
        assert _tree(run / "checkpoints" / "checkpoint-10") == earlier["checkpoint-10"]
    load_vae(str(run / "vae"))


# --- full disks and unwritable folders ------------------------------------------------------------

ZIP_WRITER = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 63616 vs 63504")


def _failing(monkeypatch, owner, attribute: str, exc: BaseException, when) -> None:
    """Make ``owner.attribute`` raise ``exc`` on the calls where ``when(*args)`` holds."""
    original = getattr(owner, attribute)

    def fails(*args, **kwargs):
        if when(*args):
            raise exc
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, attribute, fails)


def _enospc(path: str = "") -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", path)


CHECKPOINT_FAULTS = [
    ("torch-zip-writer", "torch", "save", ZIP_WRITER, "no space left on the device"),
    ("enospc-safetensors", "accelerate.utils.other", "safe_save_file", _enospc(), "no space left on the device"),
    ("enospc-rng", "torch", "save", _enospc(), "no space left on the device"),
    ("read-only-midway", "torch", "save", OSError(errno.EROFS, "Read-only file system"), "Read-only file system"),
    ("permission-midway", "torch", "save", PermissionError(errno.EACCES, "Permission denied"), "Permission denied"),
]


@pytest.mark.parametrize("row", CHECKPOINT_FAULTS, ids=[r[0] for r in CHECKPOINT_FAULTS])
def test_checkpoint_write_fails(row, base, tmp_path, lpips_dir, monkeypatch, capsys):
    name, module, attribute, exc, fragment = row
    run = stopped_at(base, 5, tmp_path / "run")
    owner = __import__(module, fromlist=["_"])
    last = "random_states" if name == "enospc-rng" else ""  # the RNG file is the last one save_state writes
    _failing(
        monkeypatch,
        owner,
        attribute,
        exc,
        lambda *a: len(a) > 1 and "tmp-checkpoint-10" in str(a[1]) and last in str(a[1]),
    )
    assert _train(run, lpips_dir, "--resume_from_checkpoint=latest") == 2
    line = _error(capsys)
    assert fragment in line and ".tmp-checkpoint-10" in line and "the partial write was removed" in line, line
    assert "checkpoint-5 is the newest complete checkpoint" in line and "--resume_from_checkpoint latest" in line
    assert [p.name for _, p in checkpoint_dirs(run / "checkpoints")] == ["checkpoint-5"]
    assert not (run / "checkpoints" / ".tmp-checkpoint-10").exists()
    _intact(run, 5)


def test_export_fails_on_a_full_disk(base, tmp_path, lpips_dir, monkeypatch, capsys):
    from diffusers import AutoencoderKL

    run = tmp_path / "run"
    shutil.copytree(base, run)
    earlier, metrics = _tree(run / "vae"), (run / "metrics.json").read_bytes()
    _failing(monkeypatch, AutoencoderKL, "save_pretrained", _enospc(), lambda self, path, *a: ".tmp-vae" in str(path))
    assert _train(run, lpips_dir, "--resume_from_checkpoint=latest", "--max_train_steps=12") == 2
    line = _error(capsys)
    assert "no space left on the device writing" in line and ".tmp-vae" in line, line
    assert "checkpoint-12 is the newest complete checkpoint" in line and f"{run / 'vae'} is a complete export" in line
    assert _tree(run / "vae") == earlier and (run / "metrics.json").read_bytes() == metrics
    assert not (run / ".tmp-vae").exists()
    _intact(run, 10, 12)


def test_metrics_json_write_fails_on_a_full_disk(base, tmp_path, lpips_dir, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(base, run)
    metrics = (run / "metrics.json").read_bytes()
    _failing(monkeypatch, Path, "write_text", _enospc(), lambda self, *a: self.name.endswith("-metrics.json"))
    assert _train(run, lpips_dir, "--resume_from_checkpoint=latest", "--max_train_steps=12") == 2
    line = _error(capsys)
    assert "no space left on the device" in line and "checkpoint-12 is the newest complete checkpoint" in line, line
    assert (run / "metrics.json").read_bytes() == metrics  # the old one, whole
    assert not list(run.glob(".tmp-*"))
    load_vae(str(run / "vae"))


def _bridge(*args: str) -> int:
    """``python -m diffusion_bridge ARGS`` in this process."""
    from diffusion_bridge.cli import main

    reset_accelerate()
    return main(list(args))


def test_latent_cache_shard_fails_on_a_full_disk_and_the_rerun_completes(base, tmp_path, monkeypatch, capsys):
    import datasets

    cache = tmp_path / "cache"
    encode = ("encode", f"--model={base / 'vae'}", f"--output_dir={cache}", "--resolution=32", "--shard_size=4")
    calls = []
    _failing(
        monkeypatch,
        datasets.Dataset,
        "to_parquet",
        _enospc(),
        lambda self, path, *a: calls.append(path) or len(calls) == 2,
    )
    assert _bridge(*encode) == 2
    line = _error(capsys)
    assert "no space left on the device writing" in line and "1 of" in line and "shards are complete" in line, line
    shards = sorted((cache / "data").iterdir())
    assert len(shards) == 1 and not shards[0].name.startswith(".tmp")
    first = shards[0].read_bytes()
    monkeypatch.undo()
    assert _bridge(*encode) == 0  # continues with the missing shards
    assert (cache / "data" / shards[0].name).read_bytes() == first
    assert (
        len(list((cache / "data").glob("shard-*.parquet")))
        == json.loads((cache / "cache_info.json").read_text())["num_shards"]
    )


def test_publish_folder_fails_on_a_full_disk(base, tmp_path, monkeypatch, capsys):
    from diffusers import AutoencoderKL

    folder = tmp_path / "repo"
    publish = ("publish", f"--model={base / 'vae'}", "--repo_id=me/x", f"--dry_run={folder}", "--allow_missing_eval")
    assert _bridge(*publish) == 0
    earlier = _tree(folder)
    capsys.readouterr()
    _failing(monkeypatch, AutoencoderKL, "save_pretrained", _enospc(), lambda *a, **k: True)
    assert _bridge(*publish) == 2
    line = _error(capsys)
    assert "no space left on the device writing" in line and f"{folder} is unchanged" in line, line
    assert _tree(folder) == earlier and not (tmp_path / ".tmp-repo").exists()


def _small_filesystem(path: Path) -> bool:
    """Mount a 1 MiB tmpfs at ``path`` (needs root); whether it worked."""
    path.mkdir()
    return (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], capture_output=True).returncode
        == 0
    )


def test_a_real_full_disk(tmp_path, lpips_dir):
    small = tmp_path / "small"
    if os.geteuid() != 0 or not _small_filesystem(small):
        pytest.skip("needs root to mount a 1 MiB tmpfs (the monkeypatched rows above cover the same paths)")
    try:
        run = small / "run"
        args = [*TINY_FAST, f"--output_dir={run}", "--checkpointing_steps=2", "--max_train_steps=40"]
        env = {**os.environ, "LPIPS_WEIGHTS": str(lpips_dir), "PYTHONWARNINGS": "ignore"}
        result = subprocess.run([sys.executable, "-m", "train", *args, "--checkpoints_total_limit=none"],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
        line = [x for x in result.stderr.splitlines() if "error:" in x][-1]
        assert result.returncode == 2 and "no space left on the device writing" in line, result.stderr[-3000:]
        found = checkpoint_dirs(run / "checkpoints")
        assert found and f"{found[-1][1]} is the newest complete checkpoint" in line
        assert all(damage(p) is None for _, p in found) and not list((run / "checkpoints").glob(".tmp-*"))
    finally:
        subprocess.run(["umount", str(small)], check=False)


# --- one run per folder ---------------------------------------------------------------------------


def test_a_second_run_into_the_same_folder_is_refused_and_a_killed_holder_does_not_block(tmp_path, lpips_dir, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / MARKER).write_text(json.dumps({"command": "python -m train"}))
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from autoencoder.folders import RunDir
            lock = RunDir({str(run)!r}, "python -m train", "--output_dir").lock()  # held while this process lives
            print("held", flush=True)
            time.sleep(600)
        """)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        assert _train(run, lpips_dir, "--max_train_steps=2") == 2
        line = _error(capsys)
        assert f"is in use by another run (pid {holder.pid} on host" in line and "started 20" in line, line
        assert not (run / "checkpoints").exists() and not (run / "config.yaml").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run / HOLDER).is_file()  # what the killed holder left: a stale holder file, no lock
    assert _train(run, lpips_dir, "--max_train_steps=2") == 0
    assert not (run / HOLDER).exists()  # the finished run removed its own


def test_the_lock_is_held_for_the_run_and_released_after(tmp_path, lpips_dir, monkeypatch):
    import train.loop

    run, seen = tmp_path / "run", []
    original = train.loop.after_step

    def probe(*args, **kwargs):
        seen.append(json.loads((run / HOLDER).read_text())["pid"])
        with pytest.raises(Exception, match="in use by another run"):
            RunDir(run, "python -m train", "--output_dir").lock()
        return original(*args, **kwargs)

    monkeypatch.setattr(train.loop, "after_step", probe)
    assert _train(run, lpips_dir, "--max_train_steps=2") == 0
    assert seen == [os.getpid()] * 2
    RunDir(run, "python -m train", "--output_dir").lock().release()  # free again


# --- resuming with another architecture -----------------------------------------------------------

ARCHITECTURES = [
    ("preset", "--preset=cpu-small", "block_out_channels [4, 8] -> [32, 64, 128, 128]"),
    ("latent-channels", "--latent_channels=8", "latent_channels 4 -> 8"),
    ("discriminator-off", "--disc_enabled=false", "loss.disc_enabled True -> False"),
    ("ema-off", "--use_ema=false", "train.use_ema True -> False"),
    ("learned-logvar", "--learn_logvar=true", "loss.learn_logvar False -> True"),
    ("decoder-only", "--train_decoder_only=true", "model.train_decoder_only False -> True"),
]


@pytest.mark.parametrize("row", ARCHITECTURES, ids=[r[0] for r in ARCHITECTURES])
def test_resume_with_another_architecture(row, base, tmp_path, lpips_dir, capsys):
    name, flag, fragment = row
    run = tmp_path / "run"
    shutil.copytree(base, run)
    before = _tree(run)
    assert _train(run, lpips_dir, "--resume_from_checkpoint=latest", flag) == 2
    line = _error(capsys)
    assert "holds another architecture than this run" in line and fragment in line, line
    assert f"--config {run / 'config.yaml'}" in line and "--pretrained_model_name_or_path" in line
    assert _tree(run) == before


def test_the_second_fix_starts_from_the_checkpoint_weights(base, tmp_path, lpips_dir):
    from train.run import param_checksum

    checkpoint = base / "checkpoints" / "checkpoint-10"
    out = tmp_path / "new"
    assert _train(out, lpips_dir, f"--pretrained_model_name_or_path={checkpoint}", "--max_train_steps=1") == 0
    assert _metrics(out)["param_checksum_initial"] == pytest.approx(
        param_checksum(load_vae(str(checkpoint))), rel=1e-12
    )


# --- config files ---------------------------------------------------------------------------------

YAML = [
    ("syntax-error", "train:\n  max_train_steps: [1, 2\n  seed: 3\n", "line 3, column 7: not valid YAML"),
    ("tab-indent", "train:\n\tseed: 1\n", "line 2, column 1: not valid YAML"),
    ("a-list", "- tiny\n- cpu-small\n", "line 1, column 1: a YAML list, not a mapping of sections"),
    ("a-string", "tiny\n", "a YAML str, not a mapping of sections"),
]


@pytest.mark.parametrize("row", YAML, ids=[r[0] for r in YAML])
def test_a_broken_config_file(row, tmp_path, capsys):
    name, text, fragment = row
    path = tmp_path / "my.yaml"
    path.write_text(text)
    assert train.trainer.main([f"--config={path}"]) == 2
    line = _error(capsys)
    assert f"config file {path}" in line and fragment in line, line


# --- small validation sets ------------------------------------------------------------------------


def test_a_small_validation_set_is_said_aloud(tmp_path, lpips_dir, caplog, capsys):
    from diffusion_bridge.cli import main as bridge_main

    images = tmp_path / "img16"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(images / f"{i:02d}.png")
    run = tmp_path / "run"
    args = (f"--train_data_dir={images}", "--num_validation_images=4", "--max_train_steps=2", "--use_ema=false")
    assert _train(run, lpips_dir, *args) == 0
    m = _metrics(run)
    assert m["n_images"] == 1 and "4 asked, but at most a tenth of the 16 images is held out" in m["data"]
    assert m["validation_warning"] == "the held-out figures come from only 1 image(s) (fewer than 16)"
    stats = m["latent_stats"]
    assert stats["num_images"] == 1 and stats["std_ci95"] is None  # unavailable, not nan
    assert "python -m diffusion_bridge stats" in stats["warning"] and "--write" in stats["warning"]
    log = "\n".join(r.message for r in caplog.records)
    assert "only 1 validation images" in log and "95% CI unavailable: 1 image(s)" in log
    assert "at most a tenth" in log
    saved = json.loads((run / "vae" / "latent_stats.json").read_text())
    assert saved["std_ci95"] is None and "nan" not in (run / "vae" / "latent_stats.json").read_text().lower()
    capsys.readouterr()
    card = tmp_path / "repo"
    assert (
        bridge_main(
            ["publish", f"--model={run / 'vae'}", "--repo_id=me/x", f"--dry_run={card}", "--allow_missing_eval"]
        )
        == 0
    )
    text = (card / "README.md").read_text()
    assert "95% CI unavailable: 1 image(s)" in text and "**only 1 images**" in text  # the statistics
    assert "held-out validation at 32 px (1 images; **only 1 images**" in text  # the held-out figures


# --- folders a command did not write --------------------------------------------------------------

OWNERSHIP = [
    ("eval-into-a-run", ("eval", "--model={RUN}/vae", "--output_dir={RUN}", "--no_fid"), "was written by `python -m train`"),
    ("encode-into-a-run", ("diffusion_bridge", "encode", "--model={RUN}/vae", "--output_dir={RUN}"), "was written by `python -m train`"),
    ("sweep-into-a-run", ("train.sweep", "--kl_weight=1e-6,1e-5", "--sweep_dir={RUN}", "--config=tiny"), "was written by `python -m train`"),
    ("train-into-an-eval-folder", ("train", "--config=tiny", "--output_dir={EVAL}"), "was written by `python -m eval`"),
    ("publish-into-an-eval-folder", ("diffusion_bridge", "publish", "--model={RUN}/vae", "--repo_id=me/x", "--dry_run={EVAL}",
                                     "--allow_missing_eval"), "was written by `python -m eval`"),
    ("publish-over-a-users-file", ("diffusion_bridge", "publish", "--model={RUN}/vae", "--repo_id=me/x", "--dry_run={REPO}",
                                   "--allow_missing_eval"), "did not write (notes.txt); it replaces the folder whole"),
    ("train-into-a-users-folder", ("train", "--config=tiny", "--output_dir={USER}"), "did not write (my-model/, notes.txt)"),
]  # fmt: skip


@pytest.fixture(scope="module")
def folders(base, tmp_path_factory) -> dict[str, str]:
    """A finished run, an eval folder, a prepared repo folder with a user's file added, a user's own folder."""
    from diffusion_bridge.cli import main as bridge_main
    from eval.runner import main as eval_main

    root = tmp_path_factory.mktemp("owners")
    run = root / "run"
    shutil.copytree(base, run)
    reset_accelerate()
    assert eval_main([f"--model={run / 'vae'}", f"--output_dir={root / 'eval'}", "--no_fid", "--num_images=4"]) == 0
    reset_accelerate()
    assert (
        eval_main([f"--model={run / 'vae'}", f"--output_dir={root / 'eval'}", "--no_fid", "--num_images=4"]) == 0
    )  # its own
    assert bridge_main(["publish", f"--model={run / 'vae'}", "--repo_id=me/x", f"--dry_run={root / 'repo'}",
                        "--allow_missing_eval"]) == 0  # fmt: skip
    (root / "repo" / "notes.txt").write_text("mine")
    (root / "user" / "my-model").mkdir(parents=True)
    (root / "user" / "notes.txt").write_text("mine")
    return {"RUN": str(run), "EVAL": str(root / "eval"), "REPO": str(root / "repo"), "USER": str(root / "user")}


def test_a_folder_without_a_marker_is_refused_whatever_it_holds(tmp_path, folders):
    """No folder is recognised by its file names: only the marker says which command wrote it."""
    from diffusion_bridge.publish import PUBLISH
    from eval.runner import EVAL

    unmarked = tmp_path / "unmarked-eval"
    shutil.copytree(folders["EVAL"], unmarked)
    (unmarked / MARKER).unlink()  # an evaluation's own files, but no marker
    with pytest.raises(Exception, match="did not write"):
        RunDir(unmarked, EVAL, "--output_dir").check()
    RunDir(folders["EVAL"], EVAL, "--output_dir").check()  # the marked original is the command's own
    run = tmp_path / "run"
    (run / "hub-upload").mkdir(parents=True)
    (run / "config.yaml").write_text("train: {}\n")
    (run / "hub-upload" / "README.md").write_text("card")
    with pytest.raises(Exception, match="did not write"):
        RunDir(run / "hub-upload", PUBLISH, "--dry_run/--folder").check()


@pytest.mark.parametrize("row", OWNERSHIP, ids=[r[0] for r in OWNERSHIP])
def test_a_folder_the_command_did_not_write_is_refused(row, folders, lpips_dir, monkeypatch, capsys):
    import importlib

    name, command, fragment = row
    args = [a.format(**folders) for a in command]
    before = {k: _tree(Path(v)) for k, v in folders.items()}
    monkeypatch.setenv("LPIPS_WEIGHTS", str(lpips_dir))
    reset_accelerate()
    capsys.readouterr()
    module = {"train": "train.trainer", "train.sweep": "train.sweep", "eval": "eval.runner"}.get(
        args[0], "diffusion_bridge.cli"
    )
    assert importlib.import_module(module).main(args[1:]) == 2
    line = _error(capsys)
    assert fragment in line and "empty or new folder" in line, line
    assert {k: _tree(Path(v)) for k, v in folders.items()} == before
