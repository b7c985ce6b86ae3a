"""``python -m train.sweep``: one run per β, evaluated together, plotted, and resumable."""

import json

import pytest

import train.sweep as sweep


@pytest.mark.slow
def test_sweep_trains_evaluates_plots_and_skips_finished_runs(tmp_path, lpips_dir, monkeypatch, capsys):
    monkeypatch.setenv("LPIPS_WEIGHTS", str(lpips_dir))
    out = tmp_path / "sweep"
    args = [
        "--config=tiny",
        "--kl_weight",
        "1e-6,1",
        "--max_train_steps=15",
        f"--sweep_dir={out}",
        "--validation_steps=0",
        "--checkpointing_steps=0",
        "--iwae_samples=2",
    ]
    assert sweep.main(args) == 0
    result = json.loads((out / "sweep.json").read_text())
    rows = {r["kl_weight"]: r for r in result["runs"]}
    assert set(rows) == {1e-6, 1.0}
    # the same seed, data and steps: a 10^6 times larger beta buys a much lower rate
    assert rows[1.0]["rate_bpp"] < 0.5 * rows[1e-6]["rate_bpp"]
    for r in rows.values():
        assert r["units"] == 4 * 16 * 16
    assert (out / "rate_distortion.png").stat().st_size > 10_000
    assert "| `kl_weight=1e-06` | 1e-06 | 4 |" in (out / "sweep.md").read_text()
    for r in rows.values():  # the diffusability columns, from the evaluation
        assert r["psnr_down2"] > 0 and 0 < r["hf_fraction"] < 1 and r["ifd_name"] == "ifd_vgg16" and r["ifd"] > 0
    assert (out / "eval" / "latent_0.png").is_file() and (out / "eval" / "latent_1.png").is_file()

    capsys.readouterr()
    original = sweep.in_own_process

    def fake(module, argv, index):  # a finished run is never trained again; a new point fails in its own process
        assert module == "eval" or "--kl_weight=0.01" in argv, f"a finished run was trained again: {argv}"
        return 3 if module == "train" else original(module, argv, index)

    monkeypatch.setattr(sweep, "in_own_process", fake)
    failing = [a if a != "1e-6,1" else "1e-6,1,1e-2" for a in args]
    assert sweep.main(failing) == 3  # the failed point's status, after the others were evaluated
    err = capsys.readouterr().err
    assert err.count("finished earlier, skipped") == 2 and "kl_weight=0.01 failed (exit status 3)" in err
    again = json.loads((out / "sweep.json").read_text())
    assert again["runs"] == result["runs"] and again["failed"] == {"kl_weight=0.01": 3}  # the same seeded evaluation
    assert "Failed (exit status): `kl_weight=0.01` (3)" in (out / "sweep.md").read_text()


def test_sweep_grid_names_runs_and_refuses_what_it_manages(tmp_path):
    args = sweep.parse_args(
        [
            "--config=tiny",
            "--kl_weight=1e-6,1e-4",
            "--latent_channels",
            "4,8",
            f"--sweep_dir={tmp_path}",
            "--max_train_steps=7",
        ]
    )
    runs = sweep.run_configs(args)
    assert [sweep.run_name(p) for p, _ in runs] == [
        "kl_weight=1e-06,latent_channels=4",
        "kl_weight=1e-06,latent_channels=8",
        "kl_weight=0.0001,latent_channels=4",
        "kl_weight=0.0001,latent_channels=8",
    ]
    point, cfg = runs[3]
    assert cfg.loss.kl_weight == 1e-4 and cfg.model.latent_channels == 8 and cfg.train.max_train_steps == 7
    assert cfg.train.output_dir == str(tmp_path / "kl_weight=0.0001,latent_channels=8")
    assert cfg.train.resume_from_checkpoint == "latest" and not sweep.finished(cfg)
    # any numeric flag is an axis; a flag with one value is a plain train flag
    args = sweep.parse_args(["--equivariance_weight=0,0.5", "--learning_rate=3e-4", "--equivariance_prob", "0.5,1"])
    assert args.grid == {"equivariance_weight": [0.0, 0.5], "equivariance_prob": [0.5, 1.0]}
    assert "--learning_rate=3e-4" in args.train_argv
    cfgs = [c for _, c in sweep.run_configs(args)]
    assert [(c.loss.equivariance_weight, c.loss.equivariance_prob) for c in cfgs] == [
        (0, 0.5),
        (0, 1),
        (0.5, 0.5),
        (0.5, 1),
    ]
