"""The config engine: precedence, strictness, presets, saving."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from d2vcli import config as C
from d2vcli import config_io

# A documented `--set` that shows the syntax rather than a value (`KEY=<value>`, `a.b={x,y}`, an
# ellipsis) is not an example to check.
DOC_PLACEHOLDER = re.compile(r"\.{3}|[{<]")


def test_defaults_are_the_base_recipe():
    cfg = C.pretrain_base()
    assert cfg.model.conv_layers == C.BASE_CONV_LAYERS
    assert (cfg.model.num_layers, cfg.model.embed_dim, cfg.model.num_heads, cfg.model.ffn_dim) == (12, 768, 12, 3072)
    assert (cfg.masking.mask_prob, cfg.masking.mask_length) == (0.65, 10)
    assert cfg.objective.average_top_k_layers == 8
    assert (cfg.objective.ema_decay, cfg.objective.ema_end_decay, cfg.objective.ema_anneal_end_step) == (
        0.999, 0.9999, 30_000)
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.eps, cfg.optim.weight_decay) == (5e-4, (0.9, 0.98), 1e-6, 0.01)
    assert cfg.schedule.phase_ratio == (0.03, 0.9, 0.07)
    # 16 GPUs x 3.8M samples per update = 3800 s of audio.
    assert cfg.train.batch_seconds * 16_000 == 16 * cfg.data.max_tokens


@pytest.mark.parametrize("name", list(C.PRESETS))
def test_every_preset_loads_and_validates(name):
    command = C.PRESETS[name][0]
    cfg = C.resolve(command, preset=name)
    cfg.validate(command)  # image fine-tuning ignores the pretraining objective, so it is not checked
    text = C.preset_path(name).read_text()
    assert text.startswith(f"# d2v {command} --preset {name}"), "each preset begins with the command that runs it"


def test_preset_values():
    large = C.resolve("pretrain", preset="speech-large")
    assert (large.model.num_layers, large.model.embed_dim, large.model.num_heads, large.model.ffn_dim) == (
        24, 1024, 16, 4096)
    ft = C.resolve("finetune", preset="finetune-10m")
    assert (ft.optim.lr, ft.train.max_updates, ft.finetune.freeze_updates) == (5e-5, 13_000, 10_000)
    assert (ft.masking.mask_prob, ft.masking.mask_channel_prob, ft.model.layerdrop) == (0.65, 0.25, 0.1)
    assert ft.schedule.phase_ratio == (0.1, 0.4, 0.5) and ft.schedule.final_lr_scale == 0.05
    assert ft.optim.weight_decay == 0.0 and ft.model.feature_grad_mult == 0.0
    vox = C.resolve("finetune", preset="finetune-vox-1h")
    assert (vox.optim.lr, vox.masking.mask_prob, vox.data.max_tokens) == (3e-4, 0.75, 1_280_000)


def test_precedence_preset_then_file_then_set(tmp_path):
    f = tmp_path / "over.yaml"
    f.write_text("optim:\n  lr: 0.002\nmodel:\n  num_layers: 3\n")
    cfg = C.resolve("pretrain", preset="speech-tiny", config_file=f, overrides=["optim.lr=0.003"])
    assert cfg.optim.lr == 0.003  # --set beats the file
    assert cfg.model.num_layers == 3  # the file beats the preset (4)
    assert cfg.model.embed_dim == 64  # the preset beats the defaults


def test_unknown_key_names_key_and_suggests():
    with pytest.raises(C.ConfigError, match=r"unknown config key 'optim.lrr'.*'optim.lr'"):
        C.resolve("pretrain", overrides=["optim.lrr=1"])
    with pytest.raises(C.ConfigError, match=r"unknown config key 'modle'.*'model'"):
        C.resolve("pretrain", overrides=["modle.num_layers=1"])


def test_wrong_type_is_an_error():
    with pytest.raises(C.ConfigError, match="model.num_layers: expected an integer"):
        C.resolve("pretrain", overrides=["model.num_layers=abc"])
    with pytest.raises(C.ConfigError, match="is not one of"):
        C.resolve("pretrain", overrides=["train.precision=fp8"])
    with pytest.raises(C.ConfigError, match="expected 3 items"):
        C.resolve("pretrain", overrides=["schedule.phase_ratio=[0.5,0.5]"])


def test_impossible_combinations_rejected():
    with pytest.raises(C.ConfigError, match="divisible by model.num_heads"):
        C.resolve("pretrain", overrides=["model.num_heads=7"])
    with pytest.raises(C.ConfigError, match="average_top_k_layers"):
        C.resolve("pretrain", overrides=["objective.average_top_k_layers=13"])


def test_preset_for_the_wrong_command():
    with pytest.raises(C.ConfigError, match="is for `d2v finetune`"):
        C.resolve("pretrain", preset="finetune-10m")
    with pytest.raises(C.ConfigError, match="unknown preset 'speech-lrage'.*'speech-large'"):
        C.resolve("pretrain", preset="speech-lrage")


def test_round_trip_through_yaml(tmp_path):
    cfg = C.resolve("pretrain", preset="speech-tiny", overrides=["decode.unk_weight=-inf"])
    path = tmp_path / "config.yaml"
    C.save(cfg, path)
    back = C.from_dict(yaml.safe_load(path.read_text()))
    assert back == cfg


def test_every_field_is_documented():
    missing = [k for k, _, doc in C.field_docs(C.Config()) if not doc]
    assert not missing, f"fields without docs: {missing}"


# ----------------------------------------------------------------------------- float spellings (issue 15, case 11)


@pytest.mark.parametrize("text", ["1e-4", "1E-4", "5e-4", "5E+4", "1e4", ".5e-3", "1_000.5", "  2e-5 ", "inf", "-inf",
                                  ".inf", "-.inf", "3", "0.001"])
def test_every_python_float_spelling_is_a_float(text):
    """PyYAML (YAML 1.1) reads 1e-4 as a string; it failed with "expected a number, got '1e-4'"."""
    cfg = C.resolve("pretrain", overrides=[f"optim.lr={text}", f"decode.unk_weight={text}"])
    expected = float(config_io._YAML_SPECIAL_FLOATS.get(text.strip(), text))
    assert cfg.optim.lr == expected and isinstance(cfg.optim.lr, float)
    assert cfg.decode.unk_weight == expected


def test_float_spellings_inside_lists_and_optionals_and_yaml_files(tmp_path):
    cfg = C.resolve("pretrain", overrides=["optim.betas=[0.9, 9.8E-1]", "objective.loss_scale=1e-2"])
    assert cfg.optim.betas == (0.9, 0.98) and cfg.objective.loss_scale == 0.01
    path = tmp_path / "my.yaml"
    path.write_text("optim:\n  lr: 5e-4\n  eps: 1E-8\nschedule:\n  init_lr_scale: 1e-2\n")
    cfg = C.resolve("pretrain", config_file=path)
    assert (cfg.optim.lr, cfg.optim.eps, cfg.schedule.init_lr_scale) == (5e-4, 1e-8, 1e-2)


@pytest.mark.parametrize("text", ["1e-4x", "abc", "1e", "true", "[1]"])
def test_non_numbers_are_still_refused_with_the_key(text):
    with pytest.raises(C.ConfigError, match="optim.lr"):
        C.resolve("pretrain", overrides=[f"optim.lr={text}"])


def test_an_int_field_does_not_take_a_fraction():
    with pytest.raises(C.ConfigError, match="train.max_updates: expected an integer"):
        C.resolve("pretrain", overrides=["train.max_updates=1.5"])


def _documented_set_examples() -> list[str]:
    """Every `--set key=value` written in README.md, docs/*.md (commands.md among them) and the CLI's --help texts."""
    from d2vcli.cli import app
    from typer.main import get_command

    root = Path(__file__).resolve().parent.parent
    texts = [(root / "README.md").read_text()] + [p.read_text() for p in sorted((root / "docs").glob("*.md"))]

    def helps(cmd):
        yield cmd.help or ""
        for p in getattr(cmd, "params", []):
            yield getattr(p, "help", "") or ""
        for sub in getattr(cmd, "commands", {}).values():
            yield from helps(sub)

    texts.extend(helps(get_command(app)))
    found = set()
    for text in texts:
        for item in re.findall(r"--set[ =]'?([a-z_]+\.[a-z_.]+=[^\s`'\")]+)", text):
            if not DOC_PLACEHOLDER.search(item):
                found.add(item.rstrip(".,;"))
    return sorted(found)


def test_documented_set_examples_are_found():
    examples = _documented_set_examples()
    assert "optim.lr=1e-4" in examples and len(examples) >= 5, examples


@pytest.mark.parametrize("item", _documented_set_examples())
def test_every_documented_set_example_is_accepted(item):
    key, value = item.split("=", 1)
    cfg = C.merge(C.Config(), C.parse_set(item))
    section, name = key.split(".")
    got = getattr(getattr(cfg, section), name)
    if isinstance(got, float):
        assert got == float(value)
