"""Training that holds: DDP sync, exact resume, kill/terminate, mixed precision, non-finite steps."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import (
    REPO,
    TINY_FAST,
    _metrics,
    _nan_at,
    _run_inprocess,
    accelerate_launch,
    deterministic_cudnn,
    reset_accelerate,
    same,
    stopped_at,
)
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

import train.step
from autoencoder.models import VAEForTraining


def _env(lpips_dir):
    return {**os.environ, "LPIPS_WEIGHTS": str(lpips_dir), "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_two_processes_keep_identical_parameters(tmp_path, lpips_dir):
    """accelerate launch --num_processes 2 --cpu: ranks see different data, yet end with equal weights."""
    out = tmp_path / "ddp"
    cmd = accelerate_launch(
        "train",
        *TINY_FAST,
        f"--output_dir={out}",
        "--max_train_steps=4",
        "--checkpointing_steps=2",
    )
    result = subprocess.run(cmd, cwd=REPO, env=_env(lpips_dir), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = _metrics(out)
    assert metrics["num_processes"] == 2
    rank0, rank1 = metrics["param_checksum_per_rank"]
    assert rank0 == rank1  # bit-identical: gradients were all-reduced through the prepared model
    assert rank0 != metrics["param_checksum_initial"]  # and training moved them


@pytest.mark.slow
def test_resume_is_exact(tmp_path, lpips_dir, monkeypatch):
    """k steps -> checkpoint -> resume to n equals an uninterrupted n-step run, bit for bit (CPU; `same` on CUDA)."""
    deterministic_cudnn(monkeypatch)
    args = [
        "--max_train_steps=6",
        "--checkpointing_steps=3",
        "--use_ema",
        "--learn_logvar",
        "--checkpoints_total_limit=5",
        "--lr_scheduler=cosine",
    ]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert _run_inprocess(full, lpips_dir, monkeypatch, *args) == 0
    # "stop" after k=3: a fresh run directory holding only the step-3 checkpoint
    stopped_at(full, 3, resumed)
    assert _run_inprocess(resumed, lpips_dir, monkeypatch, *args, "--resume_from_checkpoint=latest") == 0

    a, b = (load_file(d / "checkpoints" / "checkpoint-6" / "model.safetensors") for d in (full, resumed))
    assert a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    ea, eb = (load_file(d / "vae" / "diffusion_pytorch_model.safetensors") for d in (full, resumed))  # EMA export
    assert all(same(ea[k], eb[k]) for k in ea)
    oa, ob = (
        torch.load(d / "checkpoints" / "checkpoint-6" / "optimizer.bin", weights_only=False) for d in (full, resumed)
    )
    for pa, pb in zip(oa["state"].values(), ob["state"].values()):
        assert all(same(pa[k], pb[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    sa, sb = (
        torch.load(d / "checkpoints" / "checkpoint-6" / "custom_checkpoint_0.pkl", weights_only=True)
        for d in (full, resumed)
    )
    assert sa == sb and sa["global_step"] == 6
    ema_a, ema_b = (
        torch.load(d / "checkpoints" / "checkpoint-6" / "custom_checkpoint_1.pkl", weights_only=False)
        for d in (full, resumed)
    )
    assert all(same(x, y) for x, y in zip(ema_a["shadow_params"], ema_b["shadow_params"]))
    # the EMA really differs from the raw weights (so the export above compared EMA weights)
    assert not torch.equal(ea["decoder.conv_out.weight"], a["vae.decoder.conv_out.weight"])


@pytest.mark.slow
def test_streamed_run_stopped_and_resumed_ends_with_the_uninterrupted_weights(tmp_path, lpips_dir, shared, monkeypatch):
    """A stream cannot seek: the resumed run re-reads and drops the batches trained on, and ends bit-equal."""
    deterministic_cudnn(monkeypatch)
    data = f"--train_data_dir={shared / 'data' / 'cifar10' / 'train.parquet'}"
    args = [
        data,
        "--streaming",
        "--shuffle_buffer=64",
        "--num_validation_images=8",
        "--max_train_steps=4",
        "--checkpointing_steps=2",
        "--latent_stats=false",
    ]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert _run_inprocess(full, lpips_dir, monkeypatch, *args) == 0
    assert "streaming" in _metrics(full)["data"]
    stopped_at(full, 2, resumed)
    assert _run_inprocess(resumed, lpips_dir, monkeypatch, *args, "--resume_from_checkpoint=latest") == 0
    assert _metrics(resumed)["step"] == 4
    a, b = (load_file(d / "checkpoints" / "checkpoint-4" / "model.safetensors") for d in (full, resumed))
    assert a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_workers_train_as_the_main_process_across_epochs_and_a_resume(tmp_path, lpips_dir, shared, monkeypatch):
    """Two persistent workers give the weights of 0 workers over two epochs, also resumed mid-run (CPU: bit for bit).

    62 training photos in batches of 4: 15 steps per epoch, 20 steps cross into the second.
    """
    deterministic_cudnn(monkeypatch)
    args = [
        f"--train_data_dir={shared / 'data' / 'cbsd68'}",
        "--resolution=32",
        "--max_train_steps=20",
        "--checkpointing_steps=10",
        "--checkpoints_total_limit=5",
        "--latent_stats=false",
    ]
    runs = {"main": "--dataloader_num_workers=0", "workers": "--dataloader_num_workers=2"}
    for name, workers in runs.items():
        assert _run_inprocess(tmp_path / name, lpips_dir, monkeypatch, *args, workers) == 0
    resumed = tmp_path / "resumed"
    stopped_at(tmp_path / "workers", 10, resumed)
    assert (
        _run_inprocess(resumed, lpips_dir, monkeypatch, *args, runs["workers"], "--resume_from_checkpoint=latest") == 0
    )
    main, workers, again = (
        load_file(tmp_path / d / "checkpoints" / "checkpoint-20" / "model.safetensors")
        for d in ("main", "workers", "resumed")
    )
    assert all(same(main[k], workers[k]) and same(workers[k], again[k]) for k in main)


class HostReads(TorchDispatchMode):
    """Counts the ops that copy a tensor's value to the host: on a GPU each is a host synchronisation."""

    READS = (
        torch.ops.aten._local_scalar_dense.default,
        torch.ops.aten.nonzero.default,
        torch.ops.aten.is_nonzero.default,
    )  # item()/bool()/float()/int(), nonzero, truth value

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.READS
        return func(*args, **(kwargs or {}))


def _host_reads(tmp_path, lpips_dir, monkeypatch, steps: int) -> int:
    """Host reads of a whole run of ``steps`` steps that logs only at its last (loading in a worker process)."""
    with HostReads() as reads:
        assert (
            _run_inprocess(
                tmp_path / f"{steps}",
                lpips_dir,
                monkeypatch,
                f"--max_train_steps={steps}",
                "--checkpointing_steps=0",
                "--log_every=1000",
                "--dataloader_num_workers=1",
                "--latent_stats=false",
            )
            == 0
        )
    return reads.count


@pytest.mark.slow
def test_no_host_read_in_a_step_that_does_not_log(tmp_path, lpips_dir, monkeypatch):
    """Three more non-logging steps add no host read (measured: 41 reads for 3 steps and for 6).

    The control: deciding the skip of a non-finite step on the host (``bool`` of the flag, as the
    loop did before) makes the count grow by exactly the three steps.
    """
    assert _host_reads(tmp_path / "a", lpips_dir, monkeypatch, 3) == _host_reads(
        tmp_path / "a", lpips_dir, monkeypatch, 6
    )
    monkeypatch.setattr(train.step, "guarded_step", lambda optimizer, bad: bool(bad) or optimizer.step())
    on_host = [_host_reads(tmp_path / "b", lpips_dir, monkeypatch, n) for n in (3, 6)]
    assert on_host[1] - on_host[0] == 3


@pytest.mark.slow
def test_time_blocked_on_the_loader_is_counted(tmp_path, lpips_dir, monkeypatch):
    """Each training image read costs 30 ms on an injected clock, each training step 1 s: the loop's data wait
    is exactly 30 ms per read.

    Loading in the main process (0 workers), so every read happens inside the loop's wait for a batch
    (accelerate's prepared loader fetches one batch ahead, inside that wait too); validation reads and the
    steps are outside it.  The clock moves only at those events: the figure is a count, not a machine's speed.
    """
    import train.loop
    from autoencoder.data import ImageDataset

    reads = {"train": 0, "steps": 0}
    # 30 ms per training image read, and 1 s per micro-batch the loop trains on (which is not a wait for data)
    monkeypatch.setattr(train.loop, "wait_clock", lambda: 0.03 * reads["train"] + 1.0 * reads["steps"])
    real_step = train.loop.train_step

    def step(*args, **kwargs):
        reads["steps"] += 1
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train.loop, "train_step", step)
    args = ["--max_train_steps=3", "--checkpointing_steps=0", "--dataloader_num_workers=0", "--latent_stats=false"]
    assert _run_inprocess(tmp_path / "plain", lpips_dir, monkeypatch, *args) == 0
    assert _metrics(tmp_path / "plain")["data_wait_seconds"] == 0.0  # the steps' seconds are not data wait
    original = ImageDataset.__getitem__

    def slow(self, index):
        if self.seed is not None:  # the training set (validation has no augmentation seed)
            reads["train"] += 1
        return original(self, index)

    monkeypatch.setattr(ImageDataset, "__getitem__", slow)
    assert _run_inprocess(tmp_path / "slow", lpips_dir, monkeypatch, *args) == 0
    slowed = _metrics(tmp_path / "slow")
    assert reads["train"] >= 3 * 4  # 3 steps of 4 images, and what the loader fetched ahead
    assert slowed["data_wait_seconds"] == pytest.approx(0.03 * reads["train"], abs=1e-9)
    if not torch.cuda.is_available():
        assert slowed["device_wait_seconds"] == 0.0  # on a CPU nothing is waited for on a device


@pytest.mark.slow
def test_compiled_run_updates_like_eager_and_resumes_eager(tmp_path, lpips_dir, monkeypatch):
    """--compile with the GAN's adaptive weight on: eager's updates up to float reordering, each region
    compiled once (no recompile at a checkpoint, a validation or the end), plain checkpoint keys, and
    an eager run resumes from them.

    The posterior noise is drawn outside the compiled regions, so both runs draw the same noise.
    """
    import torch._dynamo
    from torch._dynamo.utils import counters

    # the adaptive GAN weight differentiates w.r.t. the decoder's last layer with retain_graph: through
    # one whole-model graph this raised (AOTAutograd's donated buffers); validation runs mid-run too
    args = [
        "--max_train_steps=4",
        "--checkpointing_steps=2",
        "--checkpoints_total_limit=5",
        "--validation_steps=2",
        "--disc_enabled=true",
        "--disc_start=0",
    ]
    eager, compiled, resumed = tmp_path / "eager", tmp_path / "compiled", tmp_path / "resumed"
    assert _run_inprocess(eager, lpips_dir, monkeypatch, *args) == 0
    torch._dynamo.reset()
    counters.clear()
    try:
        assert _run_inprocess(compiled, lpips_dir, monkeypatch, *args, "--compile") == 0
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    # the encoder, the decoder's mid block and its 2 up blocks, once each (measured 8 when validation
    # ran the compiled regions instead of eager ones)
    assert graphs == 4, dict(counters["stats"])
    weights = lambda d, k: load_file(d / "checkpoints" / f"checkpoint-{k}" / "model.safetensors")  # noqa: E731
    e2, e4, c4 = weights(eager, 2), weights(eager, 4), weights(compiled, 4)
    assert c4.keys() == e4.keys()  # no "_orig_mod." prefixes from the compiled wrapper
    update = sum((e4[k] - e2[k]).abs().sum().item() for k in e4)  # what steps 3 and 4 moved, eager
    apart = sum((e4[k] - c4[k]).abs().sum().item() for k in e4)
    # not the same kernels, the same training: measured 3.4e-5 of the update on a CPU
    assert 0 < apart < 0.01 * update, (apart, update)
    assert _metrics(compiled)["psnr"] == pytest.approx(_metrics(eager)["psnr"], abs=0.05)

    stopped_at(compiled, 2, resumed)
    assert _run_inprocess(resumed, lpips_dir, monkeypatch, *args, "--resume_from_checkpoint=latest") == 0
    r4 = weights(resumed, 4)
    assert sum((r4[k] - e4[k]).abs().sum().item() for k in e4) < 0.01 * update


def _start(out, lpips_dir, *args):
    cmd = [sys.executable, "-m", "train", *TINY_FAST, f"--output_dir={out}", "--max_train_steps=100000", *args]
    return subprocess.Popen(
        cmd, cwd=REPO, env=_env(lpips_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _read_until(proc, text: str) -> list[str]:
    """The run's output lines up to the first holding ``text``: waits on the run's own events, not on a clock."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"the run ended (status {proc.wait()}) before printing {text!r}:\n{''.join(lines)[-3000:]}")


@pytest.mark.slow
def test_sigterm_checkpoints_then_a_sigkilled_resume_resumes_from_its_last_checkpoint(tmp_path, lpips_dir):
    """One long run: SIGTERM writes a fresh checkpoint and exits 143; its resume, killed with SIGKILL
    two checkpoints later, resumes again from the last complete checkpoint."""
    from train.checkpoints import checkpoint_dirs, damage

    out, ckpt = tmp_path / "run", ["--checkpointing_steps=5", "--checkpoints_total_limit=5"]
    root = out / "checkpoints"
    proc = _start(out, lpips_dir, *ckpt)
    _read_until(proc, f"saved {root / 'checkpoint-5'}")  # training is under way
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "Traceback" not in output
    (line,) = [line for line in output.splitlines() if "SIGTERM received: saved" in line]
    newest, fresh = checkpoint_dirs(root)[-1]
    assert f"SIGTERM received: saved {fresh} at step {newest}" in line  # the stop wrote the newest checkpoint
    assert newest >= 5 and damage(fresh) is None

    proc = _start(out, lpips_dir, *ckpt, "--resume_from_checkpoint=latest")
    target = (newest // 5 + 2) * 5
    _read_until(proc, f"saved {root / f'checkpoint-{target}'}")
    proc.kill()
    proc.wait()
    last, _ = checkpoint_dirs(root)[-1]
    assert last >= target
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            *TINY_FAST,
            f"--output_dir={out}",
            f"--max_train_steps={last + 3}",
            *ckpt,
            "--resume_from_checkpoint=latest",
        ],
        cwd=REPO,
        env=_env(lpips_dir),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {root / f'checkpoint-{last}'} at step {last}" in result.stderr
    assert _metrics(out)["step"] == last + 3


@pytest.mark.slow
def test_bf16_keeps_fp32_master_and_exported_weights(tmp_path, lpips_dir, monkeypatch):
    out = tmp_path / "bf16"
    seen = []
    original = VAEForTraining.forward

    def spy(self, pixel_values, *args, **kwargs):
        device = pixel_values.device.type  # the autocast of the device the run is on (cpu or cuda)
        seen.append(torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None)
        assert all(p.dtype == torch.float32 for p in self.parameters())  # fp32 master weights during training
        return original(self, pixel_values, *args, **kwargs)

    monkeypatch.setattr(VAEForTraining, "forward", spy)
    assert (
        _run_inprocess(
            out,
            lpips_dir,
            monkeypatch,
            "--mixed_precision=bf16",
            "--max_train_steps=3",
            "--checkpointing_steps=2",
            "--validation_steps=2",
        )
        == 0
    )
    assert seen and all(dtype == torch.bfloat16 for dtype in seen)  # every forward ran under bf16 autocast
    ckpt = load_file(out / "checkpoints" / "checkpoint-2" / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in ckpt.values())
    exported = load_file(out / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == torch.float32 for v in exported.values())


@pytest.mark.slow
def test_nan_loss_step_is_skipped_and_counted(tmp_path, lpips_dir, monkeypatch):
    out = tmp_path / "nan"
    _nan_at({1}, monkeypatch)  # the second optimizer step (global_step 1 -> 2)
    assert (
        _run_inprocess(
            out, lpips_dir, monkeypatch, "--max_train_steps=3", "--checkpointing_steps=1", "--checkpoints_total_limit=5"
        )
        == 0
    )
    assert _metrics(out)["nonfinite_steps"] == 1
    w1, w2, w3 = (load_file(out / "checkpoints" / f"checkpoint-{i}" / "model.safetensors") for i in (1, 2, 3))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # step 2 changed nothing
    assert not all(torch.equal(w2[k], w3[k]) for k in w2)  # step 3 trained again
    s1, s2, s3 = (
        torch.load(out / "checkpoints" / f"checkpoint-{i}" / "scheduler.bin", weights_only=False) for i in (1, 2, 3)
    )
    # the LR schedule follows global_step (no host sync decides a skip); AdamW's own step count skipped with the update
    assert s1["last_epoch"] + 1 == s2["last_epoch"] == s3["last_epoch"] - 1
    o1, o2, o3 = (
        torch.load(out / "checkpoints" / f"checkpoint-{i}" / "optimizer.bin", weights_only=False)["state"]
        for i in (1, 2, 3)
    )
    assert [float(o[0]["step"]) for o in (o1, o2, o3)] == [1.0, 1.0, 2.0]
    assert all(torch.equal(o1[k]["exp_avg"], o2[k]["exp_avg"]) for k in o1)  # the moments did not move either


@pytest.mark.slow
def test_consecutive_nan_steps_stop_the_run(tmp_path, lpips_dir, monkeypatch, capsys):
    out = tmp_path / "nan-stop"
    _nan_at(set(range(2, 100)), monkeypatch)
    code = _run_inprocess(
        out, lpips_dir, monkeypatch, "--max_train_steps=50", "--checkpointing_steps=2", "--max_consecutive_nonfinite=3"
    )
    message = capsys.readouterr().err
    assert code == 2
    assert "3 consecutive steps with a non-finite loss" in message and "up to step 5" in message
    assert f"Last good checkpoint: {out / 'checkpoints' / 'checkpoint-4'}" in message


# The loop's three stand-ins for APIs that do not exist (train.step, train.loop): each test fails if
# the internal it relies on changes.


def test_fused_adamw_skips_its_update_and_step_count_where_found_inf_is_set(fresh_accelerator):
    """``guarded_step``: fused AdamW honours ``found_inf`` (no host sync); unset, it is a plain AdamW step."""
    from train.step import guarded_step

    acc = fresh_accelerator()

    def stepped(bad: bool, fused: bool) -> tuple[torch.Tensor, float]:
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(8))
        opt = acc.prepare(torch.optim.AdamW([w], lr=0.1, fused=fused))
        (w**2).sum().backward()
        guarded_step(opt, torch.tensor(bad))
        return w.detach().clone(), float(opt.optimizer.state[w].get("step", 0.0))

    torch.manual_seed(0)
    start = torch.randn(8)
    w_bad, step_bad = stepped(True, fused=True)
    assert torch.equal(w_bad, start) and step_bad == 0.0  # nothing moved, the step not counted
    w_ok, step_ok = stepped(False, fused=True)
    w_plain, _ = stepped(False, fused=False)
    assert not torch.equal(w_ok, start) and step_ok == 1.0
    assert torch.allclose(w_ok, w_plain, atol=1e-6)  # the fused update is AdamW's


def test_ema_step_equals_diffusers_ema_step_and_skips_where_bad():
    """``ema_step`` advances EMAModel's public fields exactly as ``EMAModel.step``, and leaves the shadow where bad."""
    from diffusers.training_utils import EMAModel

    from train.step import ema_step

    params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3, 2))]
    ours, theirs = (EMAModel(params, decay=0.9, use_ema_warmup=True, power=0.75) for _ in range(2))
    for _ in range(3):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        ema_step(ours, params, torch.tensor(False))
        theirs.step(params)
    assert ours.optimization_step == theirs.optimization_step == 3
    assert ours.cur_decay_value == theirs.cur_decay_value
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ours.shadow_params, theirs.shadow_params))
    before = [s.clone() for s in ours.shadow_params]
    with torch.no_grad():
        params[0].add_(1.0)
    ema_step(ours, params, torch.tensor(True))
    assert all(torch.equal(a, b) for a, b in zip(ours.shadow_params, before))


@pytest.mark.slow
def test_out_of_memory_inside_an_accumulation_window_resumes_from_a_window_boundary(
    tmp_path, lpips_dir, monkeypatch, capsys
):
    """With accumulation 2, an OOM in step 4's first micro-batch writes no checkpoint (it would split a window:
    accelerate has already counted the micro-batch); the resume from the periodic checkpoint-2 trains the same
    micro-batches in the same windows as the uninterrupted run."""
    from conftest import out_of_memory_at, record_batches

    from autoencoder.errors import EXIT_OOM
    from autoencoder.losses import VAELoss
    from train import trainer

    monkeypatch.setenv("LPIPS_WEIGHTS", str(lpips_dir))
    real_forward = VAELoss.forward

    args = [*TINY_FAST, "--max_train_steps=4", "--checkpointing_steps=2", "--gradient_accumulation_steps=2"]
    trained = record_batches(monkeypatch)
    reset_accelerate()
    assert trainer.main([*args, f"--output_dir={tmp_path / 'plain'}"]) == 0
    uninterrupted = trained[:]
    assert [sync for _, sync in uninterrupted] == [False, True] * 4
    trained.clear()
    out_of_memory_at(monkeypatch, 7)
    out = tmp_path / "oom"
    reset_accelerate()
    assert trainer.main([*args, f"--output_dir={out}"]) == EXIT_OOM
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "saved" not in line and f"--resume_from_checkpoint {out / 'checkpoints' / 'checkpoint-2'}" in line
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-2"]
    monkeypatch.setattr(VAELoss, "forward", real_forward)
    del trained[4:]  # the micro-batches after checkpoint-2 are trained again by the resume
    reset_accelerate()
    assert trainer.main([*args, f"--output_dir={out}", "--resume_from_checkpoint=latest"]) == 0
    assert trained == uninterrupted
