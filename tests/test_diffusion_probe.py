"""benchmarks/diffusion_probe.py: its seeding, its step budget and its checkerboard control."""

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import diffusion_probe as probe  # noqa: E402


def _args(**kw) -> SimpleNamespace:
    return SimpleNamespace(**{"steps": 3, "batch_size": 4, "num_samples": 6, "checkerboard": False, **kw})


def _latents() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 4, 8, 8, generator=g), torch.arange(32) % 10


def test_a_seed_fixes_the_run_and_the_budget_is_counted_in_optimizer_steps(monkeypatch):
    latents, labels = _latents()
    steps = []
    original = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1) or original(self, *a, **k))
    first, _, info = probe.train_dit(latents, labels, seed=1, args=_args())
    assert len(steps) == 3 and info["steps"] == 3  # exactly the budget, whatever the wall clock
    again, _, _ = probe.train_dit(latents, labels, seed=1, args=_args())
    other, _, _ = probe.train_dit(latents, labels, seed=2, args=_args())
    same = all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    assert same and not torch.equal(first.pos_embed.proj.weight, other.pos_embed.proj.weight)


class _Zero(torch.nn.Module):
    """A 'DiT' predicting ε = 0: DDIM then maps the seeded noise deterministically."""

    def forward(self, u, timestep, class_labels):
        return SimpleNamespace(sample=torch.zeros_like(u))


class _Identity:
    """A 'VAE' whose decoder returns its latent, with unit statistics: samples show the latents themselves."""

    config = SimpleNamespace(scaling_factor=1.0, shift_factor=0.0)

    @staticmethod
    def decode(z):
        return SimpleNamespace(sample=z)


def test_the_checkerboard_is_exactly_invertible_and_undone_before_decoding():
    u = torch.randn(3, 4, 8, 8)
    board = probe.board(u)
    assert torch.equal(u * board * board, u) and set(board.unique().tolist()) == {-1.0, 1.0}
    from diffusers import DDPMScheduler

    ddpm = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    plain = probe.sample(_Zero(), ddpm, _Identity(), seed=0, args=_args())
    control = probe.sample(_Zero(), ddpm, _Identity(), seed=0, args=_args(checkerboard=True))
    assert torch.equal(control, plain * board) and not torch.equal(control, plain)  # clamp(±x) = ±clamp(x)


def test_a_folder_the_probe_did_not_write_is_refused_untouched(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert probe.main(["--vae", str(tmp_path / "no-vae"), "--output_dir", str(tmp_path)]) == 2
    assert "did not write (notes.txt)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no marker, nothing else written
