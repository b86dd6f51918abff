"""`fedpipe calibrate`: the fit recovers known factors; the command writes a block the profile takes."""

import json
import math
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from fedpipe import allocator
from fedpipe.calibrate import Measurement, compare, error_summary, fit_calibration, make_setup, terms
from fedpipe.cli import app
from fedpipe.errors import FedpipeError
from fedpipe.profile import Calibration, parse_profile

runner = CliRunner()
TRUE = Calibration(activation_factor=1.7, utilisation=0.23, dequant_time={4: 1.1, 8: 1.9, 16: 1.0},
                   runtime_overhead_gib=0.31)
SERVER = {"name": "box", "memory_gib": 8, "tflops": 0.5, "uplink_mbps": 10, "downlink_mbps": 10,
          "samples": 10, "device": "cpu"}


def _profile(tmp_path, model="smollm2-135m", **extra):
    raw = {"model": model, "task": {"seq_len": 64, "local_steps": 5},
           "servers": [SERVER, SERVER | {"name": "gpu", "device": "cuda", "tflops": 100}]} | extra
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _synthetic(setup, truth, configs, runtime=0.25, noise=None):
    """Measurements exactly as the cost model with `truth` predicts (times noise factors)."""
    out = []
    for i, (bits, batch) in enumerate(configs):
        gib, s = setup.predict(bits, batch, truth)
        f = noise[i] if noise else (1.0, 1.0)
        out.append(Measurement(bits, batch, step_s=s * f[0], peak_gib=gib * f[1], runtime_gib=runtime,
                               resident_gib=0.1))
    return out


CONFIGS = [(b, n) for b in (4, 8, 16) for n in (4, 8)]


def test_terms_reassemble_the_planner_prediction(tmp_path):
    setup = make_setup(_profile(tmp_path), device="cpu")
    for bits, batch in CONFIGS:
        t = terms(setup, bits, batch)
        gib, s = setup.predict(bits, batch, TRUE)
        assert gib == pytest.approx(t.fixed_gib + TRUE.activation_factor * t.layers_gib
                                    + TRUE.runtime_overhead_gib, rel=1e-12)
        assert s == pytest.approx((t.base_s * TRUE.dequant_time[bits] + t.lora_s) / TRUE.utilisation,
                                  rel=1e-12)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_fit_recovers_known_factors(tmp_path, device):
    setup = make_setup(_profile(tmp_path), device=device)
    fit = fit_calibration(setup, _synthetic(setup, TRUE, CONFIGS))
    c = fit.calibration
    assert c.utilisation == pytest.approx(TRUE.utilisation, rel=1e-3)
    assert c.activation_factor == pytest.approx(TRUE.activation_factor, rel=1e-3)
    assert c.runtime_overhead_gib == pytest.approx(TRUE.runtime_overhead_gib, abs=1e-3)
    for bits in (4, 8, 16):
        assert c.dequant_time[bits] == pytest.approx(TRUE.dequant_time[bits], rel=1e-3)
    assert fit.notes == []


def test_fit_with_noise_and_leave_one_out(tmp_path):
    setup = make_setup(_profile(tmp_path), device="cpu")
    noise = [(1.04, 1.02), (0.97, 0.99), (1.02, 1.01), (0.98, 0.98), (1.03, 1.0), (0.96, 1.02)]
    measured = _synthetic(setup, TRUE, CONFIGS, noise=noise)
    before = setup.profile.calibration
    fit = fit_calibration(setup, measured)
    assert fit.calibration.utilisation == pytest.approx(TRUE.utilisation, rel=0.06)
    rows = compare(setup, measured, before, fit.calibration)
    worst = error_summary(rows)
    assert worst["after_s"] < 0.06 and worst["after_gib"] < 0.03
    assert worst["loo_s"] < 0.15 and worst["loo_gib"] < 0.05  # out of sample, still close
    assert worst["before_s"] > 0.5  # the defaults were far off: calibration did the work


def test_fit_caps_utilisation_and_says_so(tmp_path):
    setup = make_setup(_profile(tmp_path), device="cpu")
    fast = TRUE.model_copy(update={"utilisation": 1.0})
    measured = [Measurement(m.bits, m.batch, m.step_s / 3, m.peak_gib, m.runtime_gib, m.resident_gib)
                for m in _synthetic(setup, fast, CONFIGS)]
    fit = fit_calibration(setup, measured)
    assert fit.calibration.utilisation == 1.0
    assert "raise its tflops" in fit.notes[0] and "'box'" in fit.notes[0]


def test_one_batch_size_keeps_the_measured_runtime(tmp_path):
    setup = make_setup(_profile(tmp_path), device="cpu")
    measured = _synthetic(setup, TRUE, [(16, 4), (4, 4)], runtime=0.31)
    c = fit_calibration(setup, measured).calibration
    assert c.runtime_overhead_gib == pytest.approx(0.31)
    assert c.activation_factor == pytest.approx(TRUE.activation_factor, rel=1e-3)
    assert c.dequant_time[8] == setup.profile.calibration.dequant_time[8]  # not measured: unchanged


def test_fit_needs_16_bits(tmp_path):
    setup = make_setup(_profile(tmp_path), device="cpu")
    with pytest.raises(FedpipeError, match="16-bit"):
        fit_calibration(setup, _synthetic(setup, TRUE, [(4, 4), (8, 4)]))


def test_server_choice(tmp_path):
    path = _profile(tmp_path)
    assert make_setup(path, device="cuda").server.name == "gpu"
    chosen = make_setup(path, server="gpu", device="cpu").server
    assert (chosen.name, chosen.device, chosen.tflops) == ("gpu", "cpu", 100)
    with pytest.raises(FedpipeError, match="no server 'nope'"):
        make_setup(path, server="nope", device="cpu")


@pytest.fixture(scope="module")
def random_model_profile(tmp_path_factory):
    """A profile whose model is a folder with only config.json: calibrate builds random weights."""
    root = tmp_path_factory.mktemp("cal")
    folder = root / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 512, "tie_word_embeddings": True, "max_position_embeddings": 128}))
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump({"model": "tiny", "task": {"seq_len": 16, "local_steps": 2},
                                    "servers": [SERVER]}))
    return path


def test_command_writes_a_block_the_profile_accepts(random_model_profile, tmp_path):
    out = tmp_path / "cal.yaml"
    result = runner.invoke(app, ["calibrate", str(random_model_profile), "--bits", "16",
                                 "--batch-sizes", "2", "--steps", "1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    for word in ("before", "after", "leave-one-out", "random weights", "peak GiB", "wrote"):
        assert word in result.output
    text = out.read_text()
    assert text.startswith("# fedpipe ")  # says how it was made
    block = yaml.safe_load(text)
    assert list(block) == ["calibration"]
    calibration = Calibration.model_validate(block["calibration"])
    assert 0 < calibration.utilisation <= 1 and calibration.runtime_overhead_gib > 0
    raw = yaml.safe_load(random_model_profile.read_text()) | block
    assert parse_profile(raw).calibration == calibration


@pytest.mark.parametrize("args, message", [
    (["--bits", "3,16"], "--bits: [3] not supported"),
    (["--bits", "4,8"], "--bits: must include 16"),
    (["--batch-sizes", "4,x"], "--batch-sizes: 'x' is not a positive whole number"),
    (["--server", "nope"], "no server 'nope'"),
    (["--steps", "0"], "--steps: 0 must be at least 1"),
])
def test_bad_input_exit_2(random_model_profile, tmp_path, args, message):
    out = tmp_path / "cal.yaml"
    result = runner.invoke(app, ["calibrate", str(random_model_profile), "-o", str(out), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not out.exists()


def test_missing_profile_exit_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedpipe.cli", "calibrate", str(tmp_path / "none.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "no such file" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout


def test_measurement_is_finite_and_counts_the_whole_process(random_model_profile):
    from fedpipe.calibrate import measure, model_weights

    setup = make_setup(random_model_profile, device="cpu")
    folder, weights = model_weights(setup.profile, random_model_profile.parent,
                                    random_model_profile.parent / "work")
    assert weights.startswith("random weights")
    m = measure(folder, setup, 16, 2, steps=2, threads=1)
    assert len(m.step_times) == 3 and all(t > 0 for t in m.step_times)
    assert all(math.isfinite(v) for v in m.losses + m.grad_norms)
    # the peak holds the interpreter and libraries (runtime) plus the model
    assert m.peak_gib > m.runtime_gib + m.resident_gib > 0.05


@pytest.mark.skipif(allocator.jemalloc_library() is None, reason="libjemalloc2 not installed")
def test_measuring_process_runs_with_the_allocator_fedpipe_was_started_with(random_model_profile,
                                                                          monkeypatch):
    from fedpipe.calibrate import measure, model_weights

    setup = make_setup(random_model_profile, device="cpu")
    folder, _ = model_weights(setup.profile, random_model_profile.parent,
                              random_model_profile.parent / "work")
    assert measure(folder, setup, 16, 2, steps=1, threads=1).allocator == allocator.running()
    monkeypatch.setenv("LD_PRELOAD", allocator.jemalloc_library())
    assert measure(folder, setup, 16, 2, steps=1, threads=1).allocator == "jemalloc"


# ----------------------------------------------------------------------------- --quality


@pytest.fixture(scope="module")
def tiny_quality_profile(tiny_model_dir, tmp_path_factory):
    """The tiny model (real, if random, weights that learn in a few steps) with small ladders."""
    path = tmp_path_factory.mktemp("quality") / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir),
        "task": {"seq_len": 32, "learning_rate": 1e-2},
        "candidates": {"targets": ["q_proj", "down_proj"], "ranks": [0, 2, 4], "bits": [4, 16],
                       "batch_sizes": [1, 2]},
        "calibration": {"utilisation": 0.3},
        "servers": [SERVER]}))
    return path


def test_quality_command_probes_fits_and_writes_a_block_the_profile_accepts(tiny_quality_profile, tmp_path):
    out = tmp_path / "quality.yaml"
    result = runner.invoke(app, ["calibrate", "--quality", str(tiny_quality_profile), "--probe-steps", "3",
                                 "--eval-samples", "8", "-o", str(out)])
    assert result.exit_code == 0, result.output
    for probe in ("reference", "rank 2", "q_proj alone", "down_proj alone", "batch 1", "4-bit base",
                  "fitted", "wrote"):
        assert probe in result.output
    block = yaml.safe_load(out.read_text())
    raw = yaml.safe_load(tiny_quality_profile.read_text()) | block
    profile = parse_profile(raw)
    q = profile.calibration.quality
    assert profile.calibration.utilisation == 0.3  # the cost side is the profile's own
    assert set(q.rank_gain) == {2, 4} and q.rank_gain[4] == 1.0
    assert sum(q.type_share.values()) == pytest.approx(1.0, abs=1e-3)
    assert set(q.bits_quality) == {4, 16} and "3 steps per probe" in q.probes


@pytest.mark.parametrize("args, message", [
    (["--probe-steps", "0"], "--probe-steps: 0 must be at least 1"),
    (["--seeds", "0,x"], "--seeds: '0,x' is not a comma-separated list"),
])
def test_quality_bad_input_exit_2(tiny_quality_profile, tmp_path, args, message):
    out = tmp_path / "quality.yaml"
    result = runner.invoke(app, ["calibrate", "--quality", str(tiny_quality_profile), "-o", str(out), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and not out.exists()


def test_quality_needs_real_weights(random_model_profile, tmp_path):
    out = tmp_path / "quality.yaml"
    result = runner.invoke(app, ["calibrate", "--quality", str(random_model_profile), "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert "has no weights here" in result.output and not out.exists()
