"""Benchmarks and the results report: what they compute and write, on a tiny model (not their timings)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import perturb_parameters
from mambaspin.bench import scan_benchmark
from mambaspin.config import MambaConfig
from mambaspin.errors import UserError
from mambaspin.export import load_quantized
from mambaspin.loading import save_model
from mambaspin.model import MambaLM
from mambaspin.tokenizer import train_byte_level_bpe
from train.ablate import ablation_variants, site_label
from train.config import load_run_config
from train.inputs import load_inputs, load_or_run_calibration
from train.quality import METHODS, sites_label, method_sites, quality_benchmark
from train.report import README_END, README_START, build_results_page, readme_results_section, update_readme
from train.speed import calibration_memory_benchmark, cayley_benchmark, export_ptq_model, inference_benchmark

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"
SHIPPED_TEXT = REPO_ROOT / "shipped" / "tinyshakespeare.txt"
VOCAB = 300
PRESETS = ("W8A8", "W4A4")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bench")
    text = SHIPPED_TEXT.read_text(encoding="utf-8")[:40_000]
    text_file = root / "text.txt"
    text_file.write_text(text, encoding="utf-8")
    tokenizer = train_byte_level_bpe(text, VOCAB)
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(vocab_size=VOCAB, d_model=48, n_layer=2, d_state=8, dt_rank=4))
    perturb_parameters(model, seed=0)
    return {"root": root, "model_dir": save_model(model, root / "model", tokenizer), "text_file": text_file}


def tiny_config(workspace, output_dir: Path, *overrides):
    return load_run_config(DEFAULT_CONFIG, [
        f"model.path={workspace['model_dir']}", f"data.text={workspace['text_file']}", "model.device=cpu",
        "data.block_size=32", "data.max_eval_tokens=300", "calibration.n_blocks=8", "train.batch_size=2",
        "lora.rank=2", "max_steps=1", "save_every=0", "eval_every=0", "log_every=0", f"output_dir={output_dir}",
        *overrides])


@pytest.fixture(scope="module")
def quality(workspace) -> dict:
    config = tiny_config(workspace, workspace["root"] / "quality_run")
    return quality_benchmark(config, PRESETS, METHODS, gptq=True, out_dir=workspace["root"] / "quality")


# ---------------------------------------------------------------------------------------------
# Quality


def test_quality_rows_cover_every_method_preset_and_weights(quality):
    keys = [(row["preset"], row["method"], row["weights"]) for row in quality["rows"]]
    expected = [(preset, method, weights) for preset in PRESETS for method in METHODS for weights in ("rtn", "gptq")]
    assert keys == expected


def test_quality_gaps_and_budgets(quality):
    for row in quality["rows"]:
        assert math.isfinite(row["loss"])
        assert row["gap"] == pytest.approx(row["loss"] - quality["float_loss"], abs=1e-12)
        trained = row["method"] in ("learned", "learned_lora")
        assert row["train_steps"] == (1 if trained else 0)
        assert (row["train_tokens"] > 0) == trained
        assert row["sites"] == ("none" if row["method"] == "rtn" else "R1+R2+R5+R6")


def test_quality_rtn_w4a4_is_worse_than_rotations(quality):
    gaps = {(row["preset"], row["method"], row["weights"]): row["gap"] for row in quality["rows"]}
    assert gaps[("W4A4", "klt_hadamard", "rtn")] < gaps[("W4A4", "rtn", "rtn")]


def test_quality_files(quality):
    out = Path(quality["out"])
    assert sorted(path.name for path in out.iterdir() if path.is_file()) == [
        "quality.csv", "quality.json", "quality.md", "quality.png"]
    with (out / "quality.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(quality["rows"])
    assert json.loads((out / "quality.json").read_text())["rows"] == quality["rows"]
    assert (out / "quality.md").read_text().count("\n| W4A4 |") == len(METHODS) * 2
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quality_rerun_starts_over(workspace, quality):
    """A second run into the same folder retrains instead of stopping on the first run's checkpoints."""
    config = tiny_config(workspace, workspace["root"] / "quality_run")
    again = quality_benchmark(config, ("W8A8",), ("learned",), gptq=False, out_dir=quality["out"])
    assert again["rows"][0]["train_steps"] == 1


# ---------------------------------------------------------------------------------------------
# Speed: the timed objects and the ratios


def test_exported_ptq_model_w8a8(workspace, tmp_path):
    config = tiny_config(workspace, tmp_path / "run", "quant.preset=W8A8")
    inputs = load_inputs(config)
    calibration = load_or_run_calibration(config, inputs, config.rotation.needs_statistics(), progress=False)
    model = load_quantized(export_ptq_model(config, inputs, calibration, tmp_path / "quantized"))
    batch = inputs.train_blocks[:2, :-1]
    with torch.no_grad():
        quantized, reference = model(batch), inputs.model(batch)
    assert quantized.shape == reference.shape
    error = (quantized - reference).abs().max() / reference.abs().max()
    assert error < 0.05, f"W8A8 export differs from the float model by {error:.3f} of the largest logit"


def test_inference_benchmark_ratio(workspace, tmp_path):
    row = inference_benchmark(tiny_config(workspace, tmp_path / "run"), batch_size=2, repeats=1)
    assert row["quantized_over_float"] == pytest.approx(
        row["quantized_tokens_per_second"] / row["float_tokens_per_second"], rel=1e-9)
    assert row["tokens"] == 2 * 32


def test_cayley_benchmark_ratio():
    rows = cayley_benchmark(sizes=(8, 16), repeats=1)
    assert [row["d"] for row in rows] == [8, 16]
    for row in rows:
        assert row["ratio_to_matmul"] == pytest.approx(row["cayley_step_seconds"] / row["matmul_seconds"], rel=1e-9)


def test_scan_benchmark_ratios():
    rows = scan_benchmark([8], batch=1, length=4, d_state=2, repeats=1)
    assert rows[0]["ratio_to_transformers"] == pytest.approx(rows[0]["torch_s"] / rows[0]["transformers_s"], rel=1e-9)
    assert rows[0]["ratio_to_reference"] == pytest.approx(rows[0]["torch_s"] / rows[0]["reference_s"], rel=1e-9)


# ---------------------------------------------------------------------------------------------
# README results section


def fake_runs(root: Path, w4a4_gap: float, qat_ratio: float) -> Path:
    runs = root / "runs"
    for folder, gap in (("default", w4a4_gap), ("w4a8", 0.001)):
        (runs / folder).mkdir(parents=True)
        (runs / folder / "results.json").write_text(json.dumps(
            {"float": 3.0, "rtn": 5.0, "klt_ptq": 3.1, "trained": 3.0 + gap, "steps": 10, "tokens": 100, "minutes": 2.0}))
    quality = runs / "bench" / "bench_quality"
    quality.mkdir(parents=True)
    rows = [{"preset": "W4A4", "method": method, "weights": "rtn", "sites": "R2", "train_steps": 0, "train_tokens": 0,
             "loss": 3.5, "gap": 0.5} for method in ("rtn", "klt_hadamard")]
    (quality / "quality.json").write_text(json.dumps({"float_loss": 3.0, "rows": rows}))
    (runs / "bench_speed.json").write_text(json.dumps({"qat_step": {
        "qat_over_plain": qat_ratio, "qat_distill_over_plain": 2.0, "tokens_per_step": 64}}))
    return runs


def test_readme_section_lists_missed_targets(tmp_path):
    section = readme_results_section(fake_runs(tmp_path, w4a4_gap=0.2, qat_ratio=2.5), tmp_path / "docs")
    assert "| W4A4 | 3.0000 | +2.0000 | +0.1000 | +0.2000 | ≤ 0.05 | 2.0 |" in section
    assert "W4A4: trained gap +0.2000 nats/token, above the target 0.05" in section
    assert "a QAT step costs 2.50x a plain LoRA step, above 1.6x" in section
    assert "| klt_hadamard | rtn | 0 | +0.5000 |" in section


def test_readme_section_omits_met_targets(tmp_path):
    section = readme_results_section(fake_runs(tmp_path, w4a4_gap=0.01, qat_ratio=1.2), tmp_path / "docs")
    assert "above the target" not in section
    assert "plain LoRA step, above" not in section
    assert "Measured on " in section


def test_update_readme_replaces_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{README_START}\nold\n{README_END}\n\n## after\n")
    update_readme(readme, f"{README_START}\nnew\n{README_END}")
    assert readme.read_text() == f"# title\n\n{README_START}\nnew\n{README_END}\n\n## after\n"


def test_update_readme_needs_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# title\n")
    with pytest.raises(ValueError, match="no results markers"):
        update_readme(readme, "section")
    assert readme.read_text() == "# title\n"


def test_report_rejects_missing_runs(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        readme_results_section(tmp_path / "no_runs", tmp_path / "docs")


def test_report_rejects_empty_runs(tmp_path):
    (tmp_path / "runs").mkdir()
    with pytest.raises(UserError, match="contains none of the benchmark outputs"):
        build_results_page(tmp_path / "runs", tmp_path / "docs")


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    ("[]", "contains a JSON list, expected an object"),
    ('{"float": 3.8}', "a field is missing or malformed"),
    ('{"float": 3.8, "rtn": "x", "klt_ptq": 1, "trained": 1, "steps": 1, "tokens": 1}', "a field is missing or malformed"),
])
def test_report_names_the_bad_file(tmp_path, content, message):
    runs = fake_runs(tmp_path, w4a4_gap=0.01, qat_ratio=1.2)
    bad = runs / "default" / "results.json"
    bad.write_text(content)
    for build in (readme_results_section, build_results_page):
        with pytest.raises(UserError) as caught:
            build(runs, tmp_path / "docs")
        assert message in str(caught.value)
        assert str(bad) in str(caught.value)


def test_make_report_script_error_is_one_line(tmp_path):
    completed = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "make_report.py"), "--runs",
                                str(tmp_path / "missing"), "--out", str(tmp_path / "docs"), "--readme",
                                str(tmp_path / "README.md")], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    assert completed.stderr.strip().splitlines() == [
        f"make_report.py: error: runs directory {tmp_path / 'missing'} does not exist; pass --runs with the "
        "directory the benchmarks wrote to"]


def test_quality_settings_recorded(quality):
    settings = json.loads((Path(quality["out"]) / "quality.json").read_text())["settings"]
    assert settings["sites"] == ["R1", "R2", "R5", "R6"]
    assert settings["max_steps"] == 1
    assert settings["max_eval_tokens"] == 300
    assert settings["tokens_per_step"] == 2 * 32


def test_quality_rejects_unknown_method_before_work(workspace, tmp_path):
    config = tiny_config(workspace, tmp_path / "run")
    with pytest.raises(UserError, match="--methods foo is invalid: expected names from rtn,hadamard"):
        quality_benchmark(config, ("W8A8",), ("rtn", "foo"), gptq=False, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "run").exists()


def test_hadamard_methods_skip_sites_without_hadamard_size():
    config = MambaConfig(vocab_size=64, d_model=40, n_layer=1, d_state=4, dt_rank=5)
    assert method_sites("hadamard", ("R1", "R2", "R5"), config) == ("R1", "R2")
    assert method_sites("klt_hadamard", ("R5",), config) == ()
    assert method_sites("learned", ("R1", "R5"), config) == ("R1", "R5")
    assert method_sites("rtn", ("R1", "R5"), config) == ()


def test_ablation_variants_skip_sites_without_hadamard_size():
    config = MambaConfig(vocab_size=64, d_model=40, n_layer=1, d_state=4, dt_rank=5)
    variants = ablation_variants(("hadamard", "klt"), ("W4A4",), config)
    hadamard_rows = [sites for _, sites, init in variants if init == "hadamard"]
    klt_rows = [sites for _, sites, init in variants if init == "klt"]
    assert ("R5",) not in hadamard_rows
    assert hadamard_rows[-1] == ("R1", "R2", "R3", "R4", "R6")
    assert site_label(hadamard_rows[-1]) == "R1+R2+R3+R4+R6"
    assert ("R5",) in klt_rows
    assert site_label(klt_rows[-1]) == "all"


def test_calibration_memory_rows(workspace, tmp_path):
    overrides = [f"model.path={workspace['model_dir']}", f"data.text={workspace['text_file']}", "data.block_size=32",
                 f"output_dir={tmp_path / 'run'}"]
    rows = calibration_memory_benchmark(str(DEFAULT_CONFIG), overrides, block_counts=(2, 4))
    assert [row["tokens"] for row in rows] == [2 * 32, 4 * 32]
    for row in rows:
        assert row["growth_mb"] == pytest.approx(row["calibration_peak_mb"] - row["rss_before_mb"])
        assert row["growth_mb"] >= 0
    assert rows[0]["ratio_to_smallest"] == 1.0


def test_report_names_bad_quality_file(tmp_path):
    runs = fake_runs(tmp_path, w4a4_gap=0.01, qat_ratio=1.2)
    bad = runs / "bench" / "bench_quality" / "quality.json"
    bad.write_text("{}")
    with pytest.raises(UserError, match="a field is missing or malformed") as caught:
        readme_results_section(runs, tmp_path / "docs")
    assert str(bad) in str(caught.value)


@pytest.mark.parametrize("arguments, message", [
    (["--skip", "scan,foo"], "--skip foo is invalid: expected parts from scan,qat_step"),
    (["--skip", "scan,qat_step,calibration_memory,cayley,inference"], "--skip names every part"),
    (["--repeats", "0", "--skip", "scan"], "--repeats 0 is invalid"),
])
def test_bench_speed_arguments(tmp_path, arguments, message):
    completed = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "bench_speed.py"), *arguments,
                                "--json", str(tmp_path / "speed.json")], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert "Traceback" not in completed.stderr
    assert message in completed.stderr
    assert not (tmp_path / "speed.json").exists()


def test_qualitysites_label_names_skipped_sites():
    assert sites_label(("R1", "R2"), ("R1", "R2", "R5"), "hadamard") == (
        "R1+R2 (R5 skipped: no Hadamard matrix of its size)")
    assert sites_label(("R1", "R5"), ("R1", "R5"), "learned") == "R1+R5"
    assert sites_label((), ("R1",), "rtn") == "none"
