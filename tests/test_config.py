"""Config building: value types, overrides, argument order, early size checks and staged writes."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from mambaspin.cli import build_parser, main, parse_arguments
from mambaspin.config import MambaConfig
from mambaspin.errors import UserError
from mambaspin.io import staged_directory
from rotations.config import RotationConfig, SiteConfig
from rotations.klt import check_site_sizes
from train.config import load_run_config

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"


# ---------------------------------------------------------------------------------------------
# Value types


@pytest.mark.parametrize("override, key, expected", [
    ("train.lr_lora=1", "lr_lora", 1.0),
    ("train.lr_lora=1e-4", "lr_lora", 1e-4),
    ("lora.alpha=32", "alpha", 32.0),
])
def test_integers_pass_as_floats(override, key, expected):
    config = load_run_config(DEFAULT_CONFIG, [override])
    section = config.train if override.startswith("train.") else config.lora
    value = getattr(section, key)
    assert isinstance(value, float)
    assert value == expected


@pytest.mark.parametrize("override, message", [
    ("train.lr_lora=abc", "train.lr_lora='abc' is invalid: expected a number, got str"),
    ("train.lr_lora=true", "train.lr_lora=True is invalid: expected a number, got bool"),
    ("max_steps=2.5", "max_steps=2.5 is invalid: expected an integer, got float"),
    ("save_every=[1]", "save_every=[1] is invalid: expected an integer, got list"),
    ("rotation.sites.R3.apply=maybe", "rotation.sites.R3.apply='maybe' is invalid: expected true or false"),
    ("rotation.sites.R3.apply=1", "rotation.sites.R3.apply=1 is invalid: expected true or false"),
    ("lora.targets=[1, 2]", "lora.targets=[1, 2] is invalid: expected a list of names"),
    ("model.tokenizer=[a]", "model.tokenizer=['a'] is invalid: expected a string or null"),
])
def test_wrong_types_name_key_value_and_type(override, message):
    with pytest.raises(UserError) as caught:
        load_run_config(DEFAULT_CONFIG, [override])
    assert message in str(caught.value)
    assert "e.g." in str(caught.value)


def test_comma_separated_targets():
    assert load_run_config(DEFAULT_CONFIG, ["lora.targets=in_proj, out_proj"]).lora.targets == ("in_proj", "out_proj")
    assert load_run_config(DEFAULT_CONFIG, ["lora.targets=x_proj"]).lora.targets == ("x_proj",)


def test_null_section_takes_nested_override():
    config = load_run_config(DEFAULT_CONFIG, ["quant.weight.bits=8"])
    assert config.quant.weight.bits == 8


def test_numbers_pass_as_strings():
    assert load_run_config(DEFAULT_CONFIG, ["output_dir=2024"]).output_dir == "2024"


@pytest.mark.parametrize("override, message", [
    ("calibration.batch_size=0", "calibration.batch_size=0 is invalid"),
    ("data.max_eval_tokens=-1", "data.max_eval_tokens=-1 is invalid"),
    ("model.device=gpu", "model.device='gpu' is invalid: expected auto, cpu, cuda or cuda:N"),
    ("keep_checkpoints=-1", "(0: keep all)"),
])
def test_range_checks(override, message):
    with pytest.raises(UserError) as caught:
        load_run_config(DEFAULT_CONFIG, [override])
    assert message in str(caught.value)


# ---------------------------------------------------------------------------------------------
# Argument order


def parse(*argv: str) -> argparse.Namespace:
    return parse_arguments(build_parser(), list(argv))


def test_overrides_before_and_after_options():
    args = parse("train", "max_steps=0", "--json", "out.json", "save_every=0", "--resume_from_checkpoint", "latest",
                 "log_every=1")
    assert args.overrides == ["max_steps=0", "save_every=0", "log_every=1"]
    assert args.json == "out.json"
    assert args.resume_from_checkpoint == "latest"


def test_unknown_option_still_rejected(capsys):
    with pytest.raises(SystemExit) as caught:
        parse("train", "max_steps=0", "--bogus")
    assert caught.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_overrides_rejected_for_eval(capsys):
    with pytest.raises(SystemExit):
        parse("eval", "max_steps=0")
    assert "unrecognized arguments: max_steps=0" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Early Hadamard size check


def test_hadamard_size_checked_with_full_key():
    model_config = MambaConfig(vocab_size=64, d_model=48, n_layer=1, d_state=8, dt_rank=3)
    rotation = RotationConfig(sites={"R5": SiteConfig(apply=True, init="klt_hadamard")})
    with pytest.raises(UserError) as caught:
        check_site_sizes(rotation, model_config)
    message = str(caught.value)
    assert "rotation.sites.R5.init=klt_hadamard needs a Hadamard matrix of size 3 (dt_rank of this model)" in message
    assert "rotation.sites.R5.init=random" in message


def test_hadamard_size_check_passes_supported_sizes():
    model_config = MambaConfig(vocab_size=64, d_model=48, n_layer=1, d_state=8, dt_rank=12)
    sites = {site: SiteConfig(apply=True, init="hadamard") for site in ("R1", "R2", "R4", "R5")}
    check_site_sizes(RotationConfig(sites=sites), model_config)


# ---------------------------------------------------------------------------------------------
# Staged directory writes


def test_staged_directory_rejects_file(tmp_path):
    target = tmp_path / "out"
    target.write_text("a file")
    with pytest.raises(UserError, match="is a file"):
        with staged_directory(target):
            pass
    assert target.read_text() == "a file"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_staged_directory_replaces_and_cleans(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with staged_directory(target) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(os.listdir(target)) == ["new.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_staged_directory_failure_keeps_old(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_directory(target) as staging:
            (staging / "new.txt").write_text("new")
            raise RuntimeError("write failed")
    assert sorted(os.listdir(target)) == ["old.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


# ---------------------------------------------------------------------------------------------
# Ablation arguments are checked before any loading


@pytest.mark.parametrize("argv, message", [
    (["ablate", "--inits", "kltt"], "--inits kltt is invalid: expected names from identity, hadamard"),
    (["ablate", "--presets", "W3A3"], "unknown quantization preset 'W3A3'"),
])
def test_ablate_arguments_checked_first(tmp_path, capsys, argv, message):
    status = main([*argv, f"output_dir={tmp_path / 'run'}"])
    assert status == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Inputs rejected before any work


def test_json_path_that_is_a_directory(tmp_path, capsys):
    status = main(["calibrate", "--json", str(tmp_path), f"output_dir={tmp_path / 'run'}"])
    assert status == 2
    assert f"--json {tmp_path} is a directory" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_empty_sites(tmp_path, capsys):
    status = main(["calibrate", "--sites", " , ", f"output_dir={tmp_path / 'run'}"])
    assert status == 2
    assert "--sites is empty" in capsys.readouterr().err


def test_text_not_utf8(tmp_path):
    from mambaspin.data import load_text_splits

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 ".encode("latin-1") * 100)
    with pytest.raises(UserError, match=r"is not UTF-8 .* iconv -f latin1"):
        load_text_splits(latin1)


@pytest.mark.parametrize("content, message", [
    (None, "is a directory; pass a YAML file"),
    (b"\xff\xfe\x00binary", "is not UTF-8 text"),
    (b"base: [a.yaml]\n", "base=['a.yaml'] is invalid: expected one file name"),
])
def test_bad_config_files(tmp_path, content, message):
    path = tmp_path / "config.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_run_config(path)


def test_empty_model_path():
    with pytest.raises(UserError, match="model.path='' is invalid"):
        load_run_config(DEFAULT_CONFIG, ["model.path="])


def test_run_dir_as_model_suggests_merge(tmp_path):
    from mambaspin.loading import load_model

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="looks like a training run: merge it first"):
        load_model(tmp_path / "run")


@pytest.mark.parametrize("argv, message", [
    (["calibrate", "--out", "{file}"], "--out {file} is a file, expected a directory"),
    (["calibrate", "calibration.dir={file}"], "calibration.dir {file} is a file, expected a directory"),
    (["ablate", "--out", "{file}"], "--out {file} is a file, expected a directory"),
    (["calibrate", "--json", "{file}/report.json"], "--json {file}/report.json lies under {file}, which is a file"),
])
def test_output_paths_checked_before_work(tmp_path, capsys, argv, message):
    blocker = tmp_path / "file"
    blocker.write_text("keep")
    status = main([*(part.format(file=blocker) for part in argv), f"output_dir={tmp_path / 'run'}"])
    assert status == 2
    assert message.format(file=blocker) in capsys.readouterr().err
    assert blocker.read_text() == "keep"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage, message", [
    ("config", "config.json is not valid JSON"),
    ("weights", "The file may be truncated"),
    ("tokenizer", "tokenizer.json"),
])
def test_damaged_model_directory(hf_model_dir, damage, message):
    from mambaspin.loading import load_model
    from mambaspin.tokenizer import load_tokenizer

    if damage == "config":
        (hf_model_dir / "config.json").write_bytes(b"\xff\xfe{not utf8")
    elif damage == "weights":
        weights = hf_model_dir / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:50])
    else:
        (hf_model_dir / "tokenizer.json").write_bytes(b"\xff\xfe not a tokenizer")
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        if damage == "tokenizer":
            load_tokenizer(hf_model_dir)
        else:
            load_model(hf_model_dir)


def test_checkpoint_dir_as_model_suggests_merge(tmp_path):
    from mambaspin.loading import load_model

    step = tmp_path / "run" / "checkpoints" / "step_4"
    step.mkdir(parents=True)
    (step / "checkpoint.json").write_text("{}")
    with pytest.raises(UserError, match="--checkpoint step_4"):
        load_model(step)
