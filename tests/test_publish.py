"""Publishing: the repo folder loads in diffusers (fp32 + fp16 variant), the card parses, uploads go through HfApi."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import reset_accelerate
from diffusers import AutoencoderKL
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import filter_repo_objects

import diffusion_bridge.publish as publish
import train.preflight
import train.trainer as trainer
from autoencoder.config import ModelConfig
from autoencoder.folders import MARKER
from autoencoder.models import build_vae
from diffusion_bridge.cli import main as bridge_main
from diffusion_bridge.stats import LatentStatsAccumulator, write_stats

REPO_ID = "someone/tiny-vae"


def _device_name() -> str:
    """What the in-process training run reports as its hardware: the GPU where there is one."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


def _reset():
    reset_accelerate()


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, shared):
    """A tiny VAE with latent statistics, evaluated by the real runner on 4 CBSD68 images."""
    from eval.runner import main as eval_main

    root = tmp_path_factory.mktemp("pub")
    torch.manual_seed(0)
    vae = build_vae(ModelConfig(preset="tiny"))
    model = root / "vae"
    vae.save_pretrained(model)
    acc = LatentStatsAccumulator(4)
    acc.update(torch.randn(8, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 + 0.5)
    write_stats(model, acc.result())
    _reset()
    assert (
        eval_main(
            [
                "--model",
                str(model),
                "--train_data_dir",
                str(shared / "data" / "cbsd68"),
                "--num_images",
                "4",
                "--resolution",
                "32",
                "--batch_size",
                "2",
                "--lpips_weights",
                str(shared / "weights" / "lpips"),
                "--no_fid",
                "--no_half_check",
                "--no_tiling_check",
                "--output_dir",
                str(root / "eval"),
            ]
        )
        == 0
    )
    return model, root / "eval"


def test_dry_run_folder_loads_in_diffusers_and_the_card_round_trips(evaluated, tmp_path, capsys):
    model, eval_dir = evaluated
    out = tmp_path / "repo"
    assert (
        bridge_main(
            ["publish", "--model", str(model), "--repo_id", REPO_ID, "--eval_dir", str(eval_dir), "--dry_run", str(out)]
        )
        == 0
    )
    assert "dry run: nothing uploaded" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert names == {
        MARKER,  # says publish wrote the folder (not uploaded)
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
        "latent_stats.json",
        "eval_results.json",
        "reconstructions.png",
        "README.md",
    }
    fp32 = AutoencoderKL.from_pretrained(out)
    fp16 = AutoencoderKL.from_pretrained(out, variant="fp16", torch_dtype=torch.float16)
    original = AutoencoderKL.from_pretrained(model)
    assert all(p.dtype == torch.float32 for p in fp32.parameters()) and next(fp16.parameters()).dtype == torch.float16
    for (k, a), b, c in zip(original.state_dict().items(), fp32.state_dict().values(), fp16.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a.half(), c), k
    stats = json.loads((out / "latent_stats.json").read_text())
    assert fp32.config.scaling_factor == pytest.approx(stats["scaling_factor"]) and fp32.config.shift_factor is not None
    assert fp32.config.latents_std is None and stats["convention"] == "sd3"  # the default convention
    assert "written for the **sd3** convention" in (out / "README.md").read_text()

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers" and card.data.license == "apache-2.0" and "vae" in card.data.tags
    measured = json.loads((eval_dir / "metrics.json").read_text())["models"][str(model)]
    got = {r.metric_type: r for r in card.data.eval_results}
    assert set(got) == {"psnr", "ssim", "lpips"}  # rFID skipped: no number is invented
    for key, result in got.items():
        assert result.metric_value == pytest.approx(measured[key], abs=1e-4)
        assert result.dataset_name == "cbsd68" and result.dataset_args == {"resolution": 32, "num_images": 4}
    # the eval results survive a round trip through ModelCardData's YAML
    again = ModelCardData(**card.data.to_dict()).eval_results
    assert [(r.metric_type, r.metric_value) for r in again] == [
        (r.metric_type, r.metric_value) for r in card.data.eval_results
    ]
    text = card.text
    for needle in (
        "## Usage",
        'variant="fp16"',
        "## Latent space",
        "scaling_factor",
        "## Evaluation",
        "rFID: not reported — skipped (--no_fid)",
        "## Rate, active units and prior gap",
        "bits per pixel",
        "channels active",
        "IWAE (k = ",
    ):
        assert needle in text, needle


class FakeApi:
    """Records HfApi calls; its upload reads the folder's files (as the real one hashes them), then optionally fails."""

    def __init__(self, fail: Exception | None = None):
        self.calls, self.fail = [], fail

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def create_branch(self, repo_id, **kw):
        self.calls.append(("create_branch", repo_id, kw))

    def upload_folder(self, **kw):
        names = [p.name for p in Path(kw["folder_path"]).iterdir()]  # what the Hub gets, as upload_folder filters it
        files = sorted(filter_repo_objects(names, ignore_patterns=kw.get("ignore_patterns")))
        sent = {name: (Path(kw["folder_path"]) / name).read_bytes() for name in files}
        if self.fail is not None:
            fail, self.fail = self.fail, None  # the network is back for the retry
            raise fail
        self.calls.append(("upload_folder", kw["repo_id"], {**kw, "files": files, "sent": sent}))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{kw['repo_id']}/commit/abc"})()


def test_upload_sends_repo_private_flag_revision_message_and_files(evaluated, tmp_path):
    model, eval_dir = evaluated
    folder = publish.prepare_folder(model, tmp_path / "repo", REPO_ID, eval_dir=str(eval_dir))
    api = FakeApi()
    url = publish.upload(folder, REPO_ID, private=True, revision="v1", commit_message="first", token="hf_x", api=api)
    assert url.endswith("/commit/abc")
    (c1, repo1, kw1), (c2, repo2, kw2), (c3, repo3, kw3) = api.calls
    assert (c1, repo1, kw1) == ("create_repo", REPO_ID, {"private": True, "exist_ok": True, "repo_type": "model"})
    assert (c2, repo2, kw2["branch"], kw2["exist_ok"]) == ("create_branch", REPO_ID, "v1", True)
    assert c3 == "upload_folder" and repo3 == REPO_ID and kw3["revision"] == "v1" and kw3["commit_message"] == "first"
    assert (folder / MARKER).is_file() and MARKER not in kw3["files"]  # the folder marker stays local
    assert kw3["files"] == sorted(p.name for p in folder.iterdir() if p.name != MARKER) and "README.md" in kw3["files"]


def test_failed_upload_keeps_the_folder_and_the_retry_it_names_sends_it_whole(evaluated, tmp_path):
    model, eval_dir = evaluated
    folder = publish.prepare_folder(model, tmp_path / "repo", REPO_ID, eval_dir=str(eval_dir))
    prepared = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != MARKER}
    api = FakeApi(fail=ConnectionError("Name or service not known"))
    with pytest.raises(publish.PublishError, match=rf"ConnectionError: Name or service not known.*kept at {folder}"):
        publish.upload(folder, REPO_ID, token="hf_x", api=api)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != MARKER} == prepared
    assert publish.upload(folder, REPO_ID, token="hf_x", api=api).endswith("/commit/abc")  # the same command again
    (_, _, sent), *_ = [c for c in api.calls if c[0] == "upload_folder"]
    assert sent["sent"] == prepared  # every prepared file, byte for byte, without preparing again


def test_upload_without_a_token_stops_before_any_call(evaluated, tmp_path, monkeypatch):
    model, eval_dir = evaluated
    folder = publish.prepare_folder(model, tmp_path / "repo", REPO_ID, eval_dir=str(eval_dir))
    monkeypatch.setattr(publish, "get_token", lambda: None)  # no HF_TOKEN, no saved login
    api = FakeApi()
    with pytest.raises(publish.PublishError, match="no Hugging Face token; set HF_TOKEN or run `hf auth login`"):
        publish.upload(folder, REPO_ID, api=api)
    assert api.calls == [] and folder.is_dir()


def test_refusals_nan_weights_missing_stats_missing_eval(evaluated, tmp_path, capsys):
    model, eval_dir = evaluated
    bad = tmp_path / "nan"
    shutil.copytree(model, bad)
    vae = AutoencoderKL.from_pretrained(bad)
    with torch.no_grad():
        vae.decoder.conv_out.weight[0, 0, 0, 0] = float("nan")
    vae.save_pretrained(bad)
    args = ["publish", "--repo_id", REPO_ID, "--eval_dir", str(eval_dir), "--dry_run", str(tmp_path / "out")]
    assert bridge_main([*args, "--model", str(bad)]) == 2
    assert "contain NaN/Inf" in capsys.readouterr().err

    no_stats = tmp_path / "nostats"
    shutil.copytree(model, no_stats)
    (no_stats / "latent_stats.json").unlink()
    assert bridge_main([*args, "--model", str(no_stats)]) == 2
    assert "no latent statistics" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert bridge_main([*args, "--model", str(no_stats), "--allow_missing_stats"]) == 0
    assert "No latent statistics were measured" in (tmp_path / "out" / "README.md").read_text()

    assert bridge_main(["publish", "--repo_id", REPO_ID, "--model", str(model), "--dry_run", str(tmp_path / "o2")]) == 2
    assert "refusing to publish without an evaluation" in capsys.readouterr().err
    assert (
        bridge_main(
            [
                "publish",
                "--repo_id",
                REPO_ID,
                "--model",
                str(model),
                "--dry_run",
                str(tmp_path / "o2"),
                "--allow_missing_eval",
            ]
        )
        == 0
    )
    assert "published without an evaluation" in (tmp_path / "o2" / "README.md").read_text()


@pytest.mark.slow
def test_training_push_to_hub_uploads_the_export_with_its_held_out_metrics(tmp_path, lpips_dir, monkeypatch, capsys):
    monkeypatch.setenv("LPIPS_WEIGHTS", str(lpips_dir))
    out = tmp_path / "run"
    args = [
        "--config=tiny",
        f"--output_dir={out}",
        "--max_train_steps=4",
        "--checkpointing_steps=0",
        "--validation_steps=0",
        "--push_to_hub",
        "--hub_model_id=me/tiny",
        "--hub_private",
    ]
    monkeypatch.setattr(train.preflight, "get_token", lambda: None)
    _reset()
    assert trainer.main(args) == 2
    assert "push_to_hub needs a Hugging Face token" in capsys.readouterr().err
    assert not (out / "vae").exists()  # refused before training

    api = FakeApi()
    monkeypatch.setattr(train.preflight, "get_token", lambda: "hf_x")
    monkeypatch.setattr(publish, "get_token", lambda: "hf_x")
    monkeypatch.setattr(publish, "HfApi", lambda token: api)
    _reset()
    assert trainer.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["push_to_hub"]["repo_id"] == "me/tiny"
    assert api.calls[0] == ("create_repo", "me/tiny", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert "diffusion_pytorch_model.fp16.safetensors" in api.calls[-1][2]["files"]
    card = ModelCard.load(out / "hub-upload" / "README.md")
    got = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert got == {k: pytest.approx(metrics[k], abs=1e-4) for k in ("psnr", "ssim", "lpips")}
    assert "4 steps" in card.text and f"1 x {_device_name()}" in card.text

    api.fail = ConnectionError("offline")  # a failed upload: training's export stays, exit status 1
    _reset()
    assert trainer.main([*args, f"--output_dir={tmp_path / 'run2'}"]) == 1
    assert "offline" in json.loads((tmp_path / "run2" / "metrics.json").read_text())["push_to_hub"]["error"]
    assert (tmp_path / "run2" / "hub-upload" / "README.md").is_file()
