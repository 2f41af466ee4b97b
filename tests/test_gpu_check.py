"""`python -m bench.gpu_check` without a GPU: the one-line exit where there is no CUDA, the --cpu-smoke run of every
stage end to end, and the arithmetic the GPU run rests on (FLOP counting, MFU, the max-batch search, the memory
estimate), so that the script does not rot between the rare runs on a lent GPU."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bench import gpu_check as gc

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    nice = ["nice", "-n", "19"] if shutil.which("nice") else []
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")  # no GPU, even on a machine with one
    return subprocess.run([*nice, sys.executable, "-m", "bench.gpu_check", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_without_cuda_it_says_so_in_one_line_and_exits_2():
    out = _run(timeout=120)
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert out.returncode == 2, out.stderr[-2000:]
    assert len(lines) == 1 and "no CUDA GPU found" in lines[0] and "Traceback" not in out.stderr


@pytest.mark.slow
def test_cpu_smoke_runs_every_stage_end_to_end(tmp_path):
    out = _run("--cpu-smoke", "--json", str(tmp_path / "check.json"), timeout=900)  # ~2 min on 2 idle cores
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["errors"] == [] and all(report["checks"].values()), report["checks"]
    meta = report["meta"]
    assert meta["mode"] == "cpu-smoke" and meta["bf16_matmul_tflops"] > 0
    assert meta["command"].startswith("python -m bench.gpu_check --cpu-smoke") and meta["date"].endswith("+00:00")
    flops = meta["clip_flops_per_image"]
    assert 2 * flops["forward"] < flops["training"] < 4 * flops["forward"]

    ours = [r for r in report["cnn"] if r["loop"] == "ours"]
    plain = [r for r in report["cnn"] if r["loop"] == "plain"]
    assert {r["channels_last"] for r in ours} == {True, False}
    assert [(r["precision"], r["channels_last"]) for r in ours] == [(r["precision"], r["channels_last"]) for r in plain]
    for r in ours:
        assert r["parity_ok"] and r["parity_max_abs_diff"] < 1e-4 and r["parity_images"] > 0
        assert r["images_per_s"] > 0 and r["frozen_images_per_s"] > 0 and r["peak_gib"] is None  # no GPU counter
        assert {e["stage"] for e in r["epochs"]} == {"frozen", "unfrozen"}
    for r in report["cnn"] + report["clip"]:
        assert r["finite"] and r["steps"] == len(r["losses"]) > 0 and all(map(math.isfinite, r["losses"]))
    assert len(report["ratios"]) == len(ours) and all(r["ours_over_plain"] > 0 for r in report["ratios"])

    assert {r["grad_checkpointing"] for r in report["clip"]} == {False, True}
    for r in report["clip"]:
        assert r["precision"] == "bf16" and r["mfu"] > 0 and r["images_per_s"] > 0
        assert r["search"]["batch"] == r["bs"] == 8 and r["search"]["stopped"] == "cap"  # no OOM on the CPU: the cap
    est = meta["clip_memory_estimate"]
    assert 0 < est["ckpt"]["per_image"] < est["no_ckpt"]["per_image"]
    assert est["no_ckpt"]["fixed"] >= est["weights_bytes"] == 16 * est["params"]

    assert any("fp16" in s for s in report["skipped"])  # skipped on the CPU, and said so
    assert "| run | model |" in out.stdout and "ours / plain img/s" in out.stdout and "MFU" in out.stdout


# --------------------------------------------------------------------------- export parity

@pytest.fixture(scope="module")
def untrained_learner(tmp_path_factory):
    """(learner, photos, split, work dir): the smoke's random-init CNN on synthetic photos, untrained (the
    parity check compares an export with its learner; training does not change what it compares)."""
    from flowers_fastai.api import flowers_dataloaders, flowers_learner
    work = tmp_path_factory.mktemp("parity")
    sizes = gc.replace(gc.Sizes.cpu_smoke(), per_class=10)
    root, split = gc.prepare_data(None, work, sizes, seed=0)
    dls = flowers_dataloaders(root, "cnn", model=sizes.cnn_model, img_size=sizes.cnn_img, bs=sizes.cnn_bs,
                              pretrained=False, num_workers=0, run_dir=work / "run", split=split)
    return flowers_learner(dls, pretrained=False), root, split, work


@pytest.mark.parametrize(("head_std", "ok"), [(0.0, False), (0.1, True)])
def test_export_parity_needs_probabilities_that_vary(untrained_learner, head_std, ok):
    # A zeroed head gives every image the uniform 0.2 on both sides: equal within any tolerance, proving
    # nothing about the export. A random head spreads the probabilities, and the same comparison then counts.
    learn, root, split, work = untrained_learner
    head = learn.model.get_classifier()
    torch.manual_seed(0)
    nn.init.normal_(head.weight, std=head_std)
    nn.init.zeros_(head.bias)
    r = gc.export_parity(learn, torch.device("cpu"), root, split, work / "cnn.pth", n_images=8)
    assert r["parity_max_abs_diff"] < gc.PARITY_TOL and r["parity_argmax_equal"]  # the two sides agree either way
    assert (r["parity_prob_spread"] >= gc.PARITY_MIN_SPREAD) is ok, r["parity_prob_spread"]
    assert r["parity_ok"] is ok


def test_report_names_a_constant_output():
    row = dict(loop="ours", model="convnextv2_atto", img=48, precision="fp32", channels_last=False, bs=16, steps=4,
               images_per_s=10.0, peak_gib=None, finite=True, loss_first=1.6, loss_last=1.5, loss_down=True,
               parity_max_abs_diff=0.0, parity_ok=False, parity_prob_spread=0.0, parity_min_spread=0.01)
    run = gc.Run(None, {})
    run.cnn = [row]
    assert gc.report_rows(run)[0][-1] == "0.0e+00 FAIL (constant output: spread 0.0e+00)"
    assert not gc.checks(run)["parity"]


# --------------------------------------------------------------------------- FLOPs and MFU

def test_flop_counter_counts_a_linear_layer():
    layer, x = nn.Linear(7, 5), torch.randn(3, 7)
    inside = gc.count_training_flops(layer, x, input_requires_grad=True)
    assert inside["forward"] == 2 * 3 * 7 * 5
    assert inside["training"] == 3 * inside["forward"]  # backward: grad of the input and of the weight
    first = gc.count_training_flops(layer, x)  # a network's input needs no gradient: one matmul less
    assert first["training"] == 2 * first["forward"]
    assert layer.weight.grad is None  # left as it was found


def test_flop_counter_counts_a_vit_as_its_matmuls():
    from flowers_classifier import factory
    torch.manual_seed(0)
    model = factory.create_clip("ViT-S-32", image_size=64)
    counted = gc.count_training_flops(model, torch.randn(1, 3, 64, 64))
    tokens, width, blocks, patch = (64 // 32) ** 2 + 1, 384, 12, 32
    per_block = 24 * tokens * width ** 2 + 4 * tokens ** 2 * width  # qkv + proj + 4x MLP, and the attention
    expected = blocks * per_block + 2 * (tokens - 1) * width * 3 * patch ** 2  # + the patch embedding
    assert counted["forward"] == pytest.approx(expected, rel=0.02)


def test_mfu_arithmetic():
    assert gc.mfu(flops_per_image=1e9, images_per_s=1000, peak_tflops=2.0) == pytest.approx(0.5)
    assert gc.mfu(3e11, 800, 600) == pytest.approx(0.4)


# --------------------------------------------------------------------------- the max-batch search

def _fake_gpu(limit: int):
    """A step that 'runs out of memory' above `limit` images, and counts the cleanups."""
    calls = dict(steps=[], cleanups=0)

    def step(bs: int) -> None:
        calls["steps"].append(bs)
        if bs > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")

    def cleanup() -> None:
        calls["cleanups"] += 1
    return gc.oom_safe(step, cleanup), calls


def test_max_batch_search_doubles_then_bisects():
    fits, calls = _fake_gpu(1000)
    found = gc.find_max_batch(fits, start=16, cap=8192, budget_s=60)
    assert found["batch"] == 1000 and found["first_failure"] == 1008 and found["stopped"] == "converged"
    assert calls["steps"][:7] == [16, 32, 64, 128, 256, 512, 1024]  # doubling to the first failure
    assert all(512 < bs < 1024 for bs in calls["steps"][7:])  # then bisection inside the bracket
    assert calls["cleanups"] == len(calls["steps"])  # memory given back after every try, failed or not


def test_max_batch_search_stops_at_the_cap_and_when_nothing_fits():
    fits, _ = _fake_gpu(10 ** 6)
    assert gc.find_max_batch(fits, 16, 4096, 60) | {"seconds": 0, "tries": []} == dict(
        batch=4096, first_failure=None, tries=[], stopped="cap", seconds=0)
    fits, _ = _fake_gpu(8)
    assert gc.find_max_batch(fits, 16, 4096, 60)["batch"] is None


def test_max_batch_search_is_bounded_in_time():
    fits, calls = _fake_gpu(1000)
    ticks = iter(range(0, 10_000, 10))  # every clock reading 10 s later
    found = gc.find_max_batch(fits, 16, 8192, budget_s=45, clock=lambda: next(ticks))
    assert found["stopped"] == "time" and found["batch"] == calls["steps"][-1] < 1000


def test_max_batch_search_lets_other_errors_through():
    def step(bs):
        raise RuntimeError("a real bug")
    with pytest.raises(RuntimeError, match="a real bug"):
        gc.find_max_batch(gc.oom_safe(step, lambda: None), 16, 64, 60)


# --------------------------------------------------------------------------- the memory estimate

def test_saved_tensor_bytes_counts_what_backward_keeps():
    blocks = [nn.Sequential(nn.Linear(64, 64), nn.ReLU()) for _ in range(3)]
    model = nn.Sequential(*blocks)
    one = gc.saved_tensor_bytes(model, torch.randn(4, 64), blocks, amp_dtype=None)
    two = gc.saved_tensor_bytes(model, torch.randn(8, 64), blocks, amp_dtype=None)
    assert one["outside"] == 0 and len(one["per_block"]) == 3 and one["total"] == sum(one["per_block"])
    assert two["total"] == 2 * one["total"] > 0  # activations only (weights left out): linear in the batch
    assert one["block_inputs"] == 3 * 4 * 64 * 4  # each block's fp32 (4, 64) input


def test_batch_for_capacity():
    assert gc.batch_for_capacity(10 * gc.GIB, 2 * gc.GIB, gc.GIB) == 8
    assert gc.batch_for_capacity(gc.GIB, 2 * gc.GIB, 1) == 0  # the weights alone do not fit
    est = dict(no_ckpt=dict(fixed=4 * gc.GIB, per_image=gc.GIB // 2),
               ckpt=dict(fixed=4 * gc.GIB, per_image=gc.GIB // 8))
    assert gc.estimate_table(est, (24,)) == [["24 GB", math.floor((24 * 0.9 - 4) * 2), math.floor((24 * 0.9 - 4) * 8)]]


# --------------------------------------------------------------------------- GPU-only paths, with fakes

def test_timing_steps_back_off_when_the_found_batch_no_longer_fits():
    class Steps:  # ClipSteps' interface; 'fragmentation' makes 1000 fail although the search found it
        device, cleanups = torch.device("cpu"), 0

        def step(self, bs):
            if bs > 900:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
            return torch.tensor(1.0)

        def cleanup(self):
            self.cleanups += 1
    steps = Steps()
    sizes = gc.Sizes.cpu_smoke()
    row = gc.time_with_fallback(steps, 1000, sizes)
    assert row["bs"] == 872 and steps.cleanups == 1 and row["timed_steps"] == sizes.timed_steps  # 1000 * 7/8 -> 872

    class NeverFits(Steps):
        def step(self, bs):
            return super().step(10 ** 6)
    with pytest.raises(RuntimeError, match="three times"):
        gc.time_with_fallback(NeverFits(), 1000, sizes)


def test_fp16_steps_use_a_grad_scaler():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    steps = gc.ClipSteps(model, torch.device("cpu"), "fp16", image_size=8)
    losses = [float(steps.step(4)) for _ in range(3)]
    assert steps.scaler.is_enabled() and all(map(math.isfinite, losses))
    assert not gc.ClipSteps(model, torch.device("cpu"), "bf16", 8).scaler.is_enabled()
    assert all(p.grad is None for p in model.parameters())  # freed after every step, as a training loop does


def test_report_formats_a_gpu_run(capsys):
    run = gc.Run(None, dict(device="cuda", gpu="NVIDIA H100 80GB HBM3", sizes=gc.asdict(gc.Sizes.gpu()),
                            data="synthetic", bf16_matmul_tflops=700.0, mode="cuda",
                            clip_flops_per_image=dict(forward=8e10, backward=1.6e11, training=2.4e11)))
    cnn = dict(model="convnextv2_tiny", img=224, bs=64, steps=90, finite=True, loss_first=1.6, loss_last=0.2,
               loss_down=True, peak_gib=5.25)
    run.cnn = [dict(cnn, loop="ours", precision="bf16", channels_last=True, images_per_s=2100.0,
                    parity_max_abs_diff=3e-6, parity_ok=True),
               dict(cnn, loop="plain", precision="bf16", channels_last=True, images_per_s=2000.0)]
    run.clip = [dict(model="ViT-L-14", img=224, precision="bf16", grad_checkpointing=False, bs=288, timed_steps=8,
                     images_per_s=1300.0, peak_gib=58.1, finite=True, loss_first=1.7, loss_last=1.6, loss_down=True,
                     mfu=gc.mfu(2.4e11, 1300.0, 700.0), estimated_max_bs=301)]
    gc.print_report(run, ["--json", "x.json"])
    out = capsys.readouterr().out
    assert "| cnn ours | convnextv2_tiny | 224 | bf16 | on | – | 64 | 90 | 2100.0 | 5.25 | yes |" in out
    assert "| 288 (est. 301) |" in out and "44.6%" in out and "3.0e-06 ok" in out
    assert "ours / plain img/s, bf16, channels_last on: 1.05x (goal >= 1.0x: met)" in out
    assert "ViT-L-14 bf16 MFU, best of grad checkpointing off/on: 44.6% (goal >= 40% on an H100: met)" in out
    assert all(gc.checks(run).values())
