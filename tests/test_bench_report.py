"""`python -m bench.report`: bench/README.md from the result files, one table per goal from the newest file that
measures it, each figure linked to its file, the verdict against the goal's threshold. The result files here are
synthetic, in the shape each bench script writes (through its own helpers where they are cheap); no benchmark runs."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from bench import common, report
from bench.gpu_check import Run
from bench.train_throughput import summarise


def save(folder: Path, name: str, script: str, date: str, **results) -> Path:
    """A result file as the scripts write it: common.save_results, --json pointing into `folder`."""
    args = argparse.Namespace(json=folder / f"{name}.json", no_save=False)
    return common.save_results(script, args, dict(results, meta=dict(results.get("meta", {}), date=date)), argv=[])


def inference_result(model: str, size: int, ours_ms: float, ort_ms: float, tp: dict | None) -> dict:
    """One entry of bench/inference.py's `results` (run_model): meta, cold, speed from measure_in_turn."""
    latency = {k: dict(p50_ms=v, p95_ms=1.2 * v) for k, v in (("ours/e2e", ours_ms), ("ours_onnx/e2e", ort_ms),
                                                                ("ours/model", 0.8 * ours_ms), ("preprocess", 1.0))}
    throughput = {k: {"1": 1e3 / ms} | ({"8": tp[k]} if tp else {}) for k, ms in (("ours/e2e", ours_ms),
                                                                                  ("ours_onnx/e2e", ort_ms))}
    return dict(meta=dict(model=model, image_size=size, threads=2, runs=90, rounds=30, min_images=720, warmup=3,
                          export_s=3.0, onnx_max_abs_diff=1e-6, package_s=60.0, package_max_abs_diff=1e-6,
                          load_start=0.5, load_end=0.6),
                cold={"ours": dict(import_s=1.0, load_s=0.1, first_s=0.05)},
                speed=dict(latency=latency, throughput=throughput, call_seconds={"ours/e2e": [ours_ms / 1e3]}))


def gpu_check_result(mode: str, ratio: float, mfu: float) -> dict:
    """bench/gpu_check.py's file: Run.as_dict() over a CNN pair and two CLIP rows."""
    run = Run(None, dict(mode=mode, gpu="NVIDIA H100 80GB HBM3" if mode == "cuda" else None))
    cnn = dict(model="convnextv2_tiny", img=224, bs=64, steps=90, finite=True, loss_first=1.6, loss_last=0.2,
               loss_down=True, peak_gib=5.25, precision="bf16", channels_last=True)
    run.cnn = [dict(cnn, loop="ours", images_per_s=2000.0 * ratio, parity_ok=True),
               dict(cnn, loop="plain", images_per_s=2000.0)]
    clip = dict(model="ViT-L-14", img=224, precision="bf16", timed_steps=8, peak_gib=58.1, finite=True,
                loss_first=1.7, loss_last=1.6, loss_down=True)
    run.clip = [dict(clip, grad_checkpointing=False, bs=288, images_per_s=1300.0, mfu=mfu),
                dict(clip, grad_checkpointing=True, bs=900, images_per_s=1000.0, mfu=mfu * 0.8)]
    return run.as_dict()


def train_rows(ratio: float) -> list[dict]:
    """bench/train_throughput.py's `rows`: summarise() of ours and plain at workers 0 and 2."""
    def runs(images_per_s):
        return [dict(history=[dict(train_images=1280, train_s=1280 / images_per_s, epoch_s=1.2 * 1280 / images_per_s,
                                   accuracy=0.4)], accuracy=0.4)]
    return [summarise(loop, w, runs(rate)) for w in (0, 2)
            for loop, rate in (("ours (fastai)", 50.0 * ratio), ("plain PyTorch", 50.0))]


@pytest.fixture
def results(tmp_path) -> Path:
    folder = tmp_path / "results"
    # inference: the newer run measured batch 1 only, so the throughput goal still comes from the older one
    save(folder, "inference-old", "inference", "2026-12-04T10:00:00+00:00", args={}, results=[
        inference_result("convnextv2_tiny", 224, 50.0, 52.0, {"ours/e2e": 90.0, "ours_onnx/e2e": 100.0}),
        inference_result("convnextv2_atto", 64, 5.0, 4.0, {"ours/e2e": 900.0, "ours_onnx/e2e": 800.0})])
    save(folder, "inference-new", "inference", "2026-12-05T10:00:00+00:00", args={}, results=[
        inference_result("convnextv2_atto", 64, 5.0, 4.0, None),
        inference_result("convnextv2_tiny", 224, 44.0, 50.0, None),
        inference_result("ViT-L-14", 224, 1200.0, 1000.0, None)])
    # int8 --random-vit-l14: ours int8 2x ORT fp32 at batch 1, 1.25x at batch 8
    speed = {"ours fp32": [[0.9] * 3, [6.0] * 2], "ours int8": [[0.4, 0.5, 0.6], [4.0] * 2],
             "ORT fp32": [[1.0] * 3, [5.0] * 2], "ORT int8": [[0.7] * 3, [4.5] * 2]}
    save(folder, "int8-speed", "int8", "2026-12-05T11:00:00+00:00", args={}, load_s={}, agreement={}, speed=speed,
         meta=dict(model="ViT-L-14", image_size=224, threads=2))
    # int8 --model-file: agreement (top-1 = fp32, accuracy) per contender
    save(folder, "int8-agree", "int8", "2026-12-04T11:00:00+00:00", args={}, load_s={}, speed=speed,
         agreement={"ours fp32": [1.0, 0.36], "ours int8": [0.995, 0.36], "ORT fp32": [1.0, 0.36],
                    "ORT int8": [0.985, 0.35]}, meta=dict(model="ViT-S-32", image_size=224, agreement_photos=1000))
    # train_throughput: the newer file wins though its name sorts first
    save(folder, "tt-b-older", "train_throughput", "2026-11-23T09:00:00+00:00", args={}, rows=train_rows(0.8))
    save(folder, "tt-a-newer", "train_throughput", "2026-12-06T09:00:00+00:00", args={}, rows=train_rows(1.05))
    save(folder, "acc", "accuracy_proxy", "2026-11-23T10:00:00+00:00",
         args=dict(quick=True, epochs=8, img_size=64, seeds=[0, 1]),
         results=dict(ours=[dict(final=0.43, best=0.45, wall_s=60.0), dict(final=0.45, best=0.46, wall_s=60.0)],
                      plain=[dict(final=0.45, best=0.46, wall_s=50.0), dict(final=0.45, best=0.47, wall_s=50.0)]))
    # the GPU goals: a CUDA run, then a newer --cpu-smoke run that measures nothing about a GPU
    save(folder, "gpu", "gpu_check", "2026-12-01T00:00:00+00:00", **gpu_check_result("cuda", 0.9, 0.45))
    save(folder, "smoke", "gpu_check", "2026-12-07T00:00:00+00:00", **gpu_check_result("cpu-smoke", 2.0, 0.9))
    save(folder, "serve", "serve", "2026-12-07T01:00:00+00:00", **serve_result(serve_ms=55.0, in_process_ms=40.0,
                                                                                serve_ips=21.0, data_ips=15.0))
    return folder


def serve_result(serve_ms: float, in_process_ms: float, serve_ips: float, data_ips: float) -> dict:
    """bench/serve.py's file: meta, serving (measure_serving) and ray_data (measure_ray_data), in-process at
    20 img/s."""
    latency = {c: dict(p50_ms=ms, p95_ms=1.2 * ms) for c, ms in (("in-process", in_process_ms),
                                                                 ("handle", serve_ms - 5), ("serve", serve_ms))}
    return dict(meta=dict(model="convnextv2_tiny", image_size=224, clients=16, replicas=1, data_images=960,
                          data_replicas=1),
                serving=dict(latency=latency, throughput={"in-process": 20.0, "serve": serve_ips}, mean_batch=6.5),
                ray_data=dict(throughput={"in-process": 20.0, "ray-data": data_ips}))


def sections(page: str) -> dict[str, str]:
    return {s.split("\n", 1)[0]: s for s in page.split("\n## ")[1:]}


def table_row(text: str, label: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_every_goal_without_a_file_says_how_to_measure_it(tmp_path):
    page = report.render(tmp_path / "none", tmp_path / "README.md")
    for goal in report.GOALS.values():
        command = f"python -m bench.{goal.script}" + (f" {goal.run}" if goal.run else "")
        assert f"Not measured yet (run: `{command}`)" in sections(page)[goal.title]
    assert "(run: `python -m bench.int8 --random-vit-l14`)" in page and "bench.gpu_check" in page


def test_tables_verdicts_and_links(results, tmp_path):
    out = tmp_path / "README.md"
    page = report.render(results, out)
    s = sections(page)

    latency = s[report.GOALS["inference_latency"].title]
    assert "From [inference-new.json](results/inference-new.json)" in latency
    assert table_row(latency, "convnextv2_tiny@224") == [
        "convnextv2_tiny@224", "[44.0](results/inference-new.json)", "[50.0](results/inference-new.json)",
        "[0.88x](results/inference-new.json)", "met"]
    assert table_row(latency, "ViT-L-14@224")[-2:] == ["[1.20x](results/inference-new.json)", "**not met**"]
    assert table_row(latency, "convnextv2_atto@64")[-1].startswith("1.25x: a test-size model")

    throughput = s[report.GOALS["inference_throughput"].title]  # the newer file has no batch of 8
    assert "inference-old.json" in throughput and "inference-new.json" not in throughput
    assert table_row(throughput, "convnextv2_tiny@224")[-2:] == ["[0.90x](results/inference-old.json)",
                                                                 "**not met**"]

    speed = s[report.GOALS["int8_speed"].title]
    assert table_row(speed, "p50 latency, 1 image (ms)")[-2:] == ["[2.00x](results/int8-speed.json)", "met"]
    assert table_row(speed, "throughput, batch of 8 (images/s)")[-2:] == ["[1.25x](results/int8-speed.json)",
                                                                          "**not met**"]
    agreement = s[report.GOALS["int8_agreement"].title]  # the newer int8 file measured no agreement
    assert table_row(agreement, "ours int8")[-2:] == ["[99.5%](results/int8-agree.json)", "met"]
    assert table_row(agreement, "ORT int8")[-2:] == ["[98.5%](results/int8-agree.json)", "**not met**"]

    train = s[report.GOALS["train_throughput"].title]  # newest by its date, not by its name
    assert "tt-a-newer.json" in train and "tt-b-older" not in train
    assert table_row(train, "DataLoader workers 0")[-2:] == ["[1.05x](results/tt-a-newer.json)", "met"]

    accuracy = s[report.GOALS["accuracy"].title]
    assert table_row(accuracy, "2 seeds, 8 epochs, 64 px, --quick")[1:] == [
        "[44.0](results/acc.json)", "[45.0](results/acc.json)", "[-1.0 points](results/acc.json)", "**not met**"]

    gpu = s[report.GOALS["gpu_train_throughput"].title]  # the CUDA run, not the newer CPU smoke
    assert "gpu.json" in gpu and "smoke" not in gpu
    assert table_row(gpu, "bf16, channels_last on")[-2:] == ["[0.90x](results/gpu.json)", "**not met**"]
    mfu = s[report.GOALS["gpu_mfu"].title]
    assert table_row(mfu, "ViT-L-14 bf16, grad checkpointing off (the better of off/on)")[-2:] == [
        "[45.0%](results/gpu.json)", "met"]

    served = s[report.GOALS["serve_latency"].title]
    assert table_row(served, "convnextv2_tiny@224, one client")[1:] == [
        "[55.0](results/serve.json)", "[40.0](results/serve.json)", "[+15.0 ms](results/serve.json)", "**not met**"]
    assert "Goal: added ≤ 10.0 ms." in served
    serving = s[report.GOALS["serve_throughput"].title]
    assert table_row(serving, "convnextv2_tiny@224, 16 clients, 1 replica(s)")[-2:] == [
        "[1.05x](results/serve.json)", "met"]
    data = s[report.GOALS["ray_data_throughput"].title]
    assert table_row(data, "convnextv2_tiny@224, 960 files, 1 actor(s)")[-2:] == ["[0.75x](results/serve.json)",
                                                                              "**not met**"]

    summary = page.split("\n## ")[0]
    verdicts = {g.key: table_row(summary, g.title)[2] for g in report.GOALS.values()}
    assert verdicts == dict(inference_latency="**not met**", inference_throughput="**not met**",
                            int8_speed="**not met**", int8_agreement="**not met**", train_throughput="met",
                            accuracy="**not met**", gpu_train_throughput="**not met**", gpu_mfu="met",
                            serve_throughput="met", serve_latency="**not met**", ray_data_throughput="**not met**")
    for link in re.findall(r"\]\(([^)]+)\)", page):  # every link resolves from the page's folder
        assert (out.parent / link).exists(), link


def test_main_writes_the_page_and_names_a_broken_file(results, tmp_path, capsys):
    out = tmp_path / "page" / "README.md"
    assert report.main(["--results", str(results), "--out", str(out)]) == 0
    assert "](../results/tt-a-newer.json)" in out.read_text()
    (results / "broken.json").write_text("{")
    assert report.main(["--results", str(results), "--out", str(out)]) == 1
    assert "broken.json: not a readable result file" in capsys.readouterr().err


def test_a_run_saves_to_bench_results_with_its_meta(tmp_path):
    date = "2026-12-05T10:03:07+00:00"
    default = argparse.Namespace(json=None, no_save=False)
    assert common.results_path("int8", default, date) == common.RESULTS_DIR / "int8-20261205T100307Z.json"
    assert common.results_path("int8", argparse.Namespace(json=None, no_save=True), date) is None
    path = save(tmp_path, "x", "int8", date, speed={})
    meta = json.loads(path.read_text())["meta"]
    assert meta["date"] == date and meta["script"] == "int8" and meta["command"] == "python -m bench.int8"
    assert meta["cpu"] and meta["cores"] and meta["torch"] and "commit" in meta
