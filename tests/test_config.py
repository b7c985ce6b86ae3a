"""Config: YAML + --key=value overrides, strict keys and types."""

import pytest
import yaml

from autoencoder.config import CONFIG_DIR, key_index, parse_config, save_config, to_dict


def test_default_config_is_cpu_small():
    cfg = parse_config([])
    assert cfg.model.preset == "cpu-small"
    assert cfg.data.resolution == 64


@pytest.mark.parametrize("preset", ["tiny", "cpu-small", "sd-f8c4", "f8c16", "cifar10-f4"])
def test_preset_files_load_every_key_they_set(preset):
    path = CONFIG_DIR / f"{preset}.yaml"
    written = yaml.safe_load(path.read_text())
    cfg = parse_config(["--config", str(path)])
    resolved = to_dict(cfg)
    assert written and set(written) <= set(resolved)
    for section, values in written.items():
        for key, value in values.items():  # YAML reads 2.0e-4 as a float, as the config does
            assert resolved[section][key] == value, (section, key, resolved[section][key], value)
    assert cfg.model.preset == written["model"].get("preset", "cpu-small")


def test_diffusers_style_flags_both_forms():
    argv = [
        "--config=tiny",
        "--output_dir",
        "/tmp/x",
        "--max_train_steps=7",
        "--train_batch_size",
        "3",
        "--resolution=48",
        "--learning_rate=3e-4",
        "--lr_scheduler",
        "cosine",
        "--lr_warmup_steps=2",
        "--checkpointing_steps=5",
        "--validation_steps=4",
        "--mixed_precision=bf16",
        "--resume_from_checkpoint=latest",
        "--seed=3",
        "--train_data_dir=/data",
        "--image_column=img",
    ]
    cfg = parse_config(argv)
    assert (cfg.train.output_dir, cfg.train.max_train_steps, cfg.train.train_batch_size) == ("/tmp/x", 7, 3)
    assert cfg.data.resolution == 48 and cfg.train.learning_rate == pytest.approx(3e-4)
    assert cfg.train.lr_scheduler == "cosine" and cfg.train.mixed_precision == "bf16"
    assert cfg.train.resume_from_checkpoint == "latest" and cfg.train.seed == 3
    assert cfg.data.train_data_dir == "/data" and cfg.data.image_column == "img"


def test_dotted_keys_bare_flags_and_lists():
    cfg = parse_config(["--config=tiny", "--data.resolution=16", "--train_decoder_only", "--block_out_channels=[8,16]"])
    assert cfg.data.resolution == 16 and cfg.model.train_decoder_only is True
    assert cfg.model.block_out_channels == [8, 16]


def test_unknown_key_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown config key 'learning_rat'.*did you mean: learning_rate"):
        parse_config(["--learning_rat=1e-4"])


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  max_steps: 10\n")
    with pytest.raises(ValueError, match=r"unknown config key 'train.max_steps' in .*bad.yaml"):
        parse_config(["--config", str(path)])


def test_key_in_wrong_section(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  resolution: 10\n")
    with pytest.raises(ValueError, match="unknown config key 'model.resolution'"):
        parse_config(["--config", str(path)])


@pytest.mark.parametrize(
    "arg, message",
    [
        ("--max_train_steps=ten", "expects int"),
        ("--max_train_steps=1.5", "expects int"),
        ("--mixed_precision=fp8", "expects 'no' | 'fp16' | 'bf16'"),
        ("--random_flip=maybe", "expects bool"),
        ("--learning_rate=fast", "expects float"),
        ("--block_out_channels=[8,x]", "expects list of int"),
    ],
)
def test_wrong_types_are_errors(arg, message):
    with pytest.raises(ValueError, match=message):
        parse_config([arg])


def test_yaml_wrong_type(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  train_batch_size: '8'\n")
    with pytest.raises(ValueError, match="'train_batch_size' expects int, got '8'"):
        parse_config(["--config", str(path)])


def test_cross_field_errors():
    with pytest.raises(ValueError, match="both --dataset_name and --train_data_dir"):
        parse_config(["--dataset_name=a/b", "--train_data_dir=/x"])
    with pytest.raises(ValueError, match="must be >= 1"):
        parse_config(["--train_batch_size=0"])
    with pytest.raises(ValueError, match="config file .* not found"):
        parse_config(["--config=nope.yaml"])


def test_saved_config_round_trips(tmp_path):
    cfg = parse_config(["--config=tiny", "--kl_weight=0.25", "--validation_split=test"])
    save_config(cfg, tmp_path / "c.yaml")
    again = parse_config(["--config", str(tmp_path / "c.yaml")])
    assert again == cfg


def test_keys_are_unique_across_sections_and_documented():
    """A flat --key names one field of one section, so --resolution and --data.resolution are one override."""
    import dataclasses

    from autoencoder.config import SECTIONS, Config

    names = [f.name for section in dataclasses.fields(Config) for f in dataclasses.fields(section.type)]
    assert len(names) == len(set(names)) and not set(names) & set(SECTIONS)
    index = key_index()
    assert sorted(index) == sorted(names)
    assert all(field.metadata.get("help") for _, field, _ in index.values())
    assert parse_config(["--resolution=48"]) == parse_config(["--data.resolution=48"])
    assert parse_config(["--resolution=48"]).data.resolution == 48


def test_docs_config_reference_is_the_one_the_dataclasses_generate():
    """docs/config.md: every key with its type, dataclass default, the default run's value and help, in sync."""
    from conftest import REPO

    from autoencoder.config import reference_markdown

    doc = (REPO / "docs" / "config.md").read_text()
    assert doc == reference_markdown(), "stale: python -m autoencoder --config-reference > docs/config.md"


def test_loader_workers_take_a_count_or_auto():
    assert parse_config(["--dataloader_num_workers=auto"]).data.dataloader_num_workers == "auto"
    assert parse_config(["--dataloader_num_workers=3"]).data.dataloader_num_workers == 3
    with pytest.raises(ValueError, match="dataloader_num_workers"):
        parse_config(["--dataloader_num_workers=-1"])
    with pytest.raises(ValueError, match="dataloader_num_workers"):
        parse_config(["--dataloader_num_workers=many"])
