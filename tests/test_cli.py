"""The `kvkernels` command as a user runs it: a separate process, its exit status, and what it
prints on stdout / stderr. Bad options end with status 2 and a message naming the option, never a
traceback.

The child imports the package from this checkout (PYTHONPATH = the repository root), so these
tests check the tree under test whether or not it is installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()


def run_cli(*args, cwd=None, env=None, timeout=300):
    """`python -m kvkernels ARGS` -> CompletedProcess (text stdout / stderr)."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("KVKERNELS_")}
    child_env["PYTHONPATH"] = str(ROOT) + os.pathsep + child_env.get("PYTHONPATH", "")
    child_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "kvkernels", *map(str, args)], cwd=cwd or ROOT, env=child_env,
                          capture_output=True, text=True, timeout=timeout)


def run_in_process(capsys, *args):
    """The same command in this process (cheaper: no second torch import) -> (status, stdout, stderr)."""
    from kvkernels.cli import main
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_usage_error(proc, *needles):
    """Exit status 2, each needle in stderr, and no traceback anywhere."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)


def test_version():
    import kvkernels
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"kvkernels {kvkernels.__version__}"


# ------------------------------------------------------------------------------------- memory


# The cases users reported run as real processes; the rest in this process (same parser, same code).
@pytest.mark.parametrize("args,needles", [
    (["--seq-len", "-5"], ["argument --seq-len", "must be >= 1"]),
    (["--budget", "lots"], ["'lots' is not a memory size", "80GiB"]),
    (["--page-size", "0"], ["argument --page-size", "must be >= 1"]),
], ids=lambda x: x if isinstance(x, str) else None)
def test_memory_rejects_bad_options(args, needles):
    assert_usage_error(run_cli("memory", *args), *needles)


@pytest.mark.parametrize("args,needles", [
    (["--seq-len", "4x"], ["argument --seq-len", "'4x' is not a size"]),
    (["--seq-len", "1.5"], ["argument --seq-len", "not a whole number"]),
    (["--batch", "0"], ["argument --batch", "must be >= 1"]),
    (["--tp", "0"], ["argument --tp", "must be >= 1"]),
    (["--budget", "0"], ["--budget must be > 0"]),
    (["--budget", "80 parsecs"], ["is not a memory size"]),
    (["llama-9"], ["unknown model 'llama-9'", "llama-3-8b", "config.json"]),
    (["llama-3-8b", "--tp", "3"], ["32 query heads do not split evenly over tensor parallelism 3"]),
    (["/nonexistent/config.json"], ["cannot read /nonexistent/config.json"]),
], ids=lambda x: x if isinstance(x, str) else None)
def test_memory_rejects_bad_options_in_process(capsys, args, needles):
    rc, out, err = run_in_process(capsys, "memory", *args)
    assert rc == 2 and all(n in err for n in needles), (rc, err)


def test_memory_table_reads_like_a_table():
    """32k is taken as bench takes it; a bare budget is GiB; a context past the model's maximum warns;
    no line ends in spaces and the notes break between words."""
    proc = run_cli("memory", "llama-2-7b", "llama3-8b", "--seq-len", "32k", "--budget", "80")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("KV cache of 1 sequence x 32,768 tokens")
    assert all(line == line.rstrip() for line in lines)
    assert all(len(line) <= 100 for line in lines[3 + 2:]), lines  # the notes, wrapped at 100 columns
    for note_line in lines[3 + 2:]:
        assert not note_line.rstrip().endswith(("-", "(")), note_line
    row = next(line for line in lines if line.startswith("llama-2-7b"))
    assert "16 GiB" in row                                  # 32 layers x 32 heads x 128 x 2 B x 2 x 32k
    assert "in 80 GiB beside the weights" in proc.stdout   # `--budget 80` is 80 GiB, not 80 bytes
    assert "llama-3-8b" in proc.stdout                      # the alias resolved to the canonical name
    assert "warning: 32,768 tokens exceed llama-2-7b's trained context of 4,096" in proc.stderr
    assert "warning: 32,768 tokens exceed llama-3-8b's trained context of 8,192" in proc.stderr
    assert "warning" not in proc.stdout


def test_memory_from_a_hugging_face_config_with_tensor_parallelism(tmp_path):
    """Gemma-style interleaved sliding window: only the full-attention layers grow past the window."""
    cfg = {"model_type": "gemma3_text", "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 4,
           "head_dim": 256, "hidden_size": 1152, "intermediate_size": 6912, "vocab_size": 262144,
           "max_position_embeddings": 32768, "sliding_window": 512,
           "layer_types": ["sliding_attention"] * 5 + ["full_attention"], "_name_or_path": "org/tiny-gemma"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    proc = run_cli("memory", tmp_path, "--seq-len", "8k", "--tp", "2", "--weight-dtype", "int4", "--budget", "24GiB")
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.startswith("tiny-gemma"))
    # per GPU: 2 of 4 KV heads; 1 full layer x 8192 + 5 windowed layers x 512 tokens, 2 x 256 x 2 B each
    per_gpu = 2 * 2 * 256 * 2 * (8192 + 5 * 512)
    from kvkernels.memory import format_bytes, from_hf_config
    assert f"  {format_bytes(per_gpu)}  " in row
    assert "KV heads/GPU" in proc.stdout and "per GPU" in proc.stdout and "weights int4/GPU" in proc.stdout
    assert "5 of 6 layers keep only the last 512 tokens" in proc.stdout
    m = from_hf_config(tmp_path / "config.json")
    assert (m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.window_layers) == (6, 8, 4, 256, 5)
    assert m.kv_cache_bytes(8192, tp=2) == per_gpu


# -------------------------------------------------------------------------------------- bench


@pytest.mark.parametrize("args,needles", [
    (["decode", "--context", "4x"], ["argument --context", "'4x' is not a size"]),
    (["decode", "--batch", "-1"], ["argument --batch", "must be >= 1"]),
    (["decode", "--batch", "0"], ["argument --batch", "must be >= 1"]),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bench_rejects_bad_options(args, needles):
    assert_usage_error(run_cli("bench", *args), *needles)


@pytest.mark.parametrize("args,needles", [
    (["append", "--new-tokens", "0"], ["argument --new-tokens", "must be >= 1"]),
    (["decode", "--page-size", "-16"], ["argument --page-size", "must be >= 0"]),
    (["prefill", "--heads", "32/7"], ["argument --heads", "multiple of Hkv"]),
    (["prefill", "--rep-ms", "0"], ["argument --rep-ms", "must be > 0"]),
    (["generate", "--tokens", "0"], ["argument --tokens", "must be >= 1"]),
    (["decode", "--preset", "llama-9"], ["unknown preset 'llama-9'", "llama-3-8b"]),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bench_rejects_bad_options_in_process(capsys, args, needles):
    rc, out, err = run_in_process(capsys, "bench", *args)
    assert rc == 2 and all(n in err for n in needles), (rc, err)


def test_bench_and_memory_share_preset_names():
    from kvkernels import memory
    from kvkernels.benchmark import presets
    assert list(presets.PRESETS) == list(memory.PRESETS)
    for alias, name in (("llama3-8b", "llama-3-8b"), ("llama3-70b", "llama-3-70b"), ("gpt2", "gpt2-small"),
                        ("30b", "opt-30b")):
        assert presets.resolve(alias)[0].name == name == memory.preset(alias).name
    assert "OPT" in memory.preset("30b").description


# --------------------------------------------------------------------------------------- info


def test_info_warns_about_a_backend_that_is_not_one():
    proc = run_cli("info", env={"KVKERNELS_BACKEND": "flash"})
    assert proc.returncode == 0, proc.stderr
    assert "auto choice: flash" not in proc.stdout
    assert "warning: KVKERNELS_BACKEND='flash' is not a backend" in proc.stderr


@pytest.mark.skipif(HAS_CUDA, reason="the cuda backend is usable on a GPU machine")
@pytest.mark.skipif(HAS_CUDA, reason="the CUDA backend is usable on a GPU machine")
def test_info_warns_when_the_forced_backend_is_unusable():
    # Without a GPU the CUDA backend runs CPU tensors in the emulator: a library that does not load
    # leaves it unusable.
    proc = run_cli("info", env={"KVKERNELS_BACKEND": "cuda", "KVKERNELS_EMU_LIBRARY": "/nonexistent/emu.so"})
    assert proc.returncode == 0, proc.stderr
    assert "auto choice: cuda (forced by KVKERNELS_BACKEND)" in proc.stdout
    assert "warning: KVKERNELS_BACKEND=cuda forces a backend that is unusable here" in proc.stderr


@pytest.mark.skipif(HAS_CUDA, reason="kvkernels sets TRITON_INTERPRET only without a GPU")
def test_info_tells_the_packages_triton_interpret_from_the_users():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    mine = run_cli("info", "--json", env={"TRITON_INTERPRET": "1"})
    theirs = subprocess.run([sys.executable, "-m", "kvkernels", "info"], cwd=ROOT, capture_output=True, text=True,
                            env={**env, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert json.loads(mine.stdout)["env"].get("TRITON_INTERPRET") == "1"
    assert json.loads(mine.stdout)["triton_interpret"]["set_by"] == "user"
    assert "environment (yours)" not in theirs.stdout or "TRITON_INTERPRET" not in theirs.stdout.split(
        "environment (yours)")[1].splitlines()[0]
    assert "TRITON_INTERPRET=1 set by kvkernels" in theirs.stdout


# --------------------------------------------------------------------------------------- demo


def test_demo_rejects_mps():
    assert_usage_error(run_cli("demo", "--device", "mps"), "--device mps", "--device cuda", "--device cpu")


@pytest.mark.parametrize("args,needles", [
    (["--device", "nonsense"], ["--device 'nonsense' is not a device"]),
    (["--batch", "0"], ["argument --batch", "must be >= 1"]),
    (["--new-tokens", "x"], ["argument --new-tokens"]),
    (["--repeats", "0"], ["argument --repeats", "must be >= 1"]),
], ids=lambda x: x if isinstance(x, str) else None)
def test_demo_rejects_bad_options_in_process(capsys, args, needles):
    rc, out, err = run_in_process(capsys, "demo", *args)
    assert rc == 2 and all(n in err for n in needles), (rc, err)


@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without a GPU")
@pytest.mark.parametrize("args,needles", [
    (["--device", "cuda"], ["--device cuda: torch sees no CUDA device"]),
    (["--backend", "cuda"], ["--backend cuda", "NVIDIA GPU", "--backend triton"]),
    (["--backend", "triton", "--dtype", "fp32"], ["--backend triton cannot run this model in float32",
                                                  "--dtype fp16"]),
], ids=lambda x: x if isinstance(x, str) else None)
def test_demo_without_a_gpu_says_what_to_do(args, needles):
    assert_usage_error(run_cli("demo", *args), *needles)


def test_demo_runs_and_writes_its_plot(tmp_path):
    proc = run_cli("demo", "--batch", "2", "--prompt-len", "5", "--new-tokens", "6", "--layers", "1",
                   "--repeats", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    png = tmp_path / "kvkernels-demo.png"
    assert f"plot: {png}" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(proc.stdout.splitlines()) < 30          # the result fits on a screen
