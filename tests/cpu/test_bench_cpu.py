"""The benchmark's code path on the CPU backend (tiny shapes), its JSON, and the bench_copy.cu params mirror.

Timings are never asserted: only that every figure is there and that --validate passes (or fails loudly).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ep import jit
from ep.bench import cli, copy_params, validate

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--backend", "cpu", "--tokens", "8", "--hidden", "16", "--experts", "4", "--topk", "2", "--iters", "2",
        "--warmup", "1"]
ROW_KEYS = {"op", "impl", "us", "per_rank", "logical_gbps", "physical_gbps", "sms", "logical_bytes_per_rank",
            "physical_bytes_per_rank"}
GPU_ONLY_MODULES = ("ep.bench.gpu", "ep.bench.ceiling", "ep.bench.nccl_a2a", "ep.bench.baselines", "cupy")


def _check_doc(doc: dict, world: int) -> None:
    assert doc["schema"] == "ep.bench/1"
    env = doc["environment"]
    for key in ("world_size", "backend", "knobs", "gpu_name", "driver_version", "cupy_version", "timing"):
        assert key in env, key
    assert env["world_size"] == world and env["backend"] == "cpu"
    assert set(env["knobs"]) >= {"EP_BACKEND", "EP_DISPATCH_NSM"}
    assert doc["validation"] == {"requested": True, "passed": True, "problems": []}
    assert [c["mode"] for c in doc["cases"]] == ["ht", "ll"]
    for case in doc["cases"]:
        for key in ("shape", "config", "sms", "bytes", "timing", "rows", "baselines", "ratios", "validation"):
            assert key in case, key
        assert case["config"]["num_experts"] == 4 and case["config"]["mode"] == case["mode"]
        assert case["validation"] == {"checked": True, "problems": []}
        ops = [row["op"] for row in case["rows"]]
        expected = ["ep dispatch", "ep combine", "ep dispatch+combine", "host dispatch", "host combine"]
        if case["mode"] == "ht":
            expected = ["ep dispatch", "ep cached dispatch", "ep combine", "ep dispatch+combine", "host dispatch",
                        "host cached dispatch", "host combine"]
            assert case["baselines"]["ceiling"]["skipped"] and case["baselines"]["nccl"]["skipped"]
        else:
            assert any("graph" in s for s in case["skipped"])
        assert ops == expected
        for row in case["rows"]:
            assert ROW_KEYS <= set(row)
            assert set(row["us"]) == {"median", "median_min_rank", "min", "max"}
            assert len(row["per_rank"]) == world
            assert row["us"]["min"] <= row["us"]["median"] <= row["us"]["max"]
            if row["op"].startswith("host "):   # host time of the call, no bytes
                assert row["logical_gbps"] is None and row["us"]["median"] > 0
                continue
            assert row["logical_gbps"] > 0 and row["physical_gbps"] >= 0
        vol = case["bytes"]
        assert len(vol["logical_bytes_per_rank"]) == world
        assert all(p <= q for p, q in zip(vol["physical_bytes_per_rank"], vol["logical_bytes_per_rank"]))


def test_bench_cpu_backend_writes_every_figure(tmp_path, monkeypatch):
    monkeypatch.setenv("EP_BACKEND", "cpu")
    before = set(sys.modules)
    out = tmp_path / "tmp.json"
    rc = cli.main(["--mode", "all", *TINY, "--validate", "--json", str(out)])
    assert rc == 0
    _check_doc(json.loads(out.read_text()), world=1)
    loaded = set(sys.modules) - before
    assert not [m for m in loaded if m.startswith(GPU_ONLY_MODULES)], "the CPU path imported GPU-only modules"


def test_bench_validate_fails_loudly_on_a_mismatch(tmp_path, monkeypatch, capsys):
    real = validate.reference_outputs

    def corrupted(group, shape, inputs, cast=None):
        ref, combined = real(group, shape, inputs, cast)
        combined = combined.copy()
        combined[0, 0] ^= 1
        return ref, combined

    monkeypatch.setattr(validate, "reference_outputs", corrupted)
    rc = cli.main(["--mode", "ht", *TINY, "--validate", "--json", str(tmp_path / "bad.json")])
    assert rc == 1
    assert "VALIDATION FAILED" in capsys.readouterr().err
    doc = json.loads((tmp_path / "bad.json").read_text())
    assert doc["validation"]["passed"] is False and doc["validation"]["problems"]


def test_bench_sweep_records_each_value(tmp_path, capsys):
    out = tmp_path / "sweep.json"
    rc = cli.main(["--mode", "ll", *TINY, "--sweep", "tokens=4,8", "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert [(c["sweep"]["value"], c["shape"]["tokens"]) for c in doc["cases"]] == [(4, 4), (8, 8)]
    assert "[sweep 2/2] tokens=8" in capsys.readouterr().out


def test_bench_plot_of_a_sweep(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "sweep.png"
    assert cli.main(["--mode", "ht", *TINY, "--sweep", "num-sms=8,16", "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [
    (["--sweep", "warps=1,2"], "--sweep"),
    (["--drop", "1.5"], "--drop"),
    (["--iters", "0"], "--iters"),
    (["--worst-case"], "--worst-case needs --layout token_major"),
])
def test_bench_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([*TINY, *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_gpu_backend_without_gpu_exits_with_a_message(capsys):
    if cli._cuda_devices() > 0:
        pytest.skip("a GPU is visible")
    assert cli.main(["--backend", "gpu"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_bench_under_mpiexec_two_ranks(tmp_path):
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        found = shutil.which("mpiexec")
        if found is None:
            pytest.skip("mpiexec is missing")
        mpiexec = Path(found)
    out = tmp_path / "mpi.json"
    env = dict(os.environ, EP_BACKEND="cpu", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [str(mpiexec), "-n", "2", sys.executable, "-m", "ep.bench", "--mode", "all", *TINY[2:], "--validate",
           "--json", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _check_doc(json.loads(out.read_text()), world=2)
    assert "ep dispatch" in proc.stdout


def test_bench_copy_params_mirror_matches_the_c_struct():
    """static_asserts generated from BENCH_COPY_PARAMS compile against ep/bench/cuda/bench_copy.cu (NVRTC, sm_90)."""
    try:
        from cupy.cuda import nvrtc
    except ImportError:
        pytest.skip("CuPy's NVRTC bindings are not installed")
    variant = jit.KernelVariant.of(copy_params.SOURCE)
    # NVRTC ships no <cstddef>: offsetof comes from the compiler builtin.
    prelude = "#ifndef offsetof\n#define offsetof(T, m) __builtin_offsetof(T, m)\n#endif\n"
    source = prelude + variant.path().read_text() + "\n" + copy_params.static_asserts() + "\n"
    prog = nvrtc.createProgram(source, copy_params.SOURCE, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, list(variant.options("sm_90")))
        except nvrtc.NVRTCError:
            pytest.fail(f"BenchCopyParams mirror differs from the C struct:\n{nvrtc.getProgramLog(prog)}")
    finally:
        nvrtc.destroyProgram(prog)


def test_bench_copy_params_pack_fills_every_destination():
    rec = copy_params.pack([16, 32], [48, 64], [0, 4096], rank=0, world=2)
    assert rec["max_bytes"][0] == 4096 and rec["world"][0] == 2
    assert list(rec["bytes"][0][:3]) == [0, 4096, 0]
    with pytest.raises(ValueError):
        copy_params.pack([0], [0], [10], rank=0, world=1)
    assert copy_params.BENCH_COPY_PARAMS.itemsize == 3 * 32 * 8 + 16
    assert np.dtype(copy_params.BENCH_COPY_PARAMS).isalignedstruct


def test_bench_ll_fp8_cast_validates_on_the_cpu_backend(tmp_path):
    rc = cli.main(["--mode", "ll", "--backend", "cpu", "--tokens", "8", "--hidden", "512", "--experts", "4", "--topk",
                   "2", "--iters", "2", "--warmup", "1", "--cast", "fp8_ue8m0", "--validate", "--json",
                   str(tmp_path / "fp8.json")])
    assert rc == 0
    doc = json.loads((tmp_path / "fp8.json").read_text())
    assert doc["validation"]["passed"] is True and doc["args"]["cast"] == "fp8_ue8m0"


def test_bench_refuses_ranks_that_share_a_gpu_unless_told_to():
    from ep.bench.cli import SHARED_GPU_REFUSAL
    text = SHARED_GPU_REFUSAL.format(ranks=4, gpus=1)
    assert "4 ranks share 1 GPU" in text and "--allow-shared-gpu" in text and "not ep" in text


@pytest.mark.parametrize("dtype, row_bytes", [("fp8", 512 + 4 * 4), ("mxfp8", 512 + 16), ("nvfp4", 256 + 32)])
def test_bench_ht_payloads_validate_and_count_their_row_and_scale_bytes(tmp_path, dtype, row_bytes):
    out = tmp_path / f"{dtype}.json"
    rc = cli.main(["--mode", "ht", "--backend", "cpu", "--tokens", "8", "--hidden", "512", "--experts", "4",
                   "--topk", "2", "--iters", "2", "--warmup", "1", "--dtype", dtype, "--validate", "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["validation"]["passed"] is True
    case = doc["cases"][0]
    assert case["shape"]["dtype"] == dtype and case["bytes"]["row_bytes"] == row_bytes
    assert {r["op"] for r in case["rows"]} >= {"ep dispatch", "ep cached dispatch", "ep combine"}


@pytest.mark.parametrize("layout, extra", [("expert_major", []), ("token_major", []), ("token_major", ["--worst-case"])])
def test_bench_ht_layouts_validate_against_their_reference(tmp_path, layout, extra):
    out = tmp_path / f"{layout}.json"
    rc = cli.main(["--mode", "ht", "--backend", "cpu", "--tokens", "8", "--hidden", "256", "--experts", "4",
                   "--topk", "2", "--iters", "2", "--warmup", "1", "--layout", layout, *extra, "--validate",
                   "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["validation"]["passed"] is True
    case = doc["cases"][0]
    assert case["shape"]["layout"] == layout and case["shape"]["worst_case"] == bool(extra)
    assert case["config"]["output_layout"] == layout
