"""The Hub folder (`export.py RUN|MODEL.pth --hub DIR`, flowers_fastai/hub.py) and loading it back
(flowers_classifier/hub.py): its files, a model card whose YAML huggingface_hub reads and whose results are the
run's measured ones, weights with no pickle, the same probabilities as the .pth on every backend by path and by
"hf-hub:" id from a cache laid out as huggingface_hub lays it (HF_HUB_OFFLINE=1), and a clear error, without a
hang, offline with nothing cached. No network: nothing here uploads or downloads."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_CLIP
from huggingface_hub import ModelCard, scan_cache_dir
from huggingface_hub import constants as hf_constants

import flowers_classifier as fc
from flowers_classifier import hub
from flowers_classifier.hub import CARD_FILE, CONFIG_FILE, ONNX_FILE, WEIGHTS_FILE, HubError
from flowers_classifier.payload import TEMPERATURE_KEY, ModelFileError, load_payload
from flowers_fastai import cli as commands
from flowers_fastai.hub import (
    CONFUSION_FILE,
    OTHER,
    model_card,
    resolve_licence,
    weights_licence,
    write_model_files,
)

REPO_ID = "acme/flowers-atto"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def exported(finished_run, tmp_path_factory) -> tuple[Path, Path]:
    """(the .pth, the Hub folder with model.onnx) written from one payload by one export.py command."""
    out = tmp_path_factory.mktemp("hub")
    pth, folder = out / "cnn.pth", out / "flowers-atto"
    assert commands.export([str(finished_run), "--hub", str(folder), "--onnx", "--out", str(pth),
                            "--repo-id", REPO_ID]) == 0
    return pth, folder


@pytest.fixture(scope="module")
def photos(real_flowers) -> list[Path]:
    return [sorted((real_flowers / c).glob("*.jpg"))[0] for c in fc.CLASSES]


def probabilities(model: fc.FlowerClassifier, photos: list[Path]) -> torch.Tensor:
    return torch.tensor([list(fc.predict_proba(model, p).values()) for p in photos], dtype=torch.float64)


def lay_out_cache(cache: Path, repo_id: str, folder: Path, files: tuple[str, ...], commit: str = COMMIT) -> Path:
    """`files` of `folder` in `cache` as huggingface_hub stores a download (its guide "Manage the cache"):
    blobs/<hash>, snapshots/<commit>/<file> linking to its blob, refs/main naming the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / commit).mkdir(parents=True)
    for name in files:
        blob = repo / "blobs" / hashlib.sha256((folder / name).read_bytes()).hexdigest()
        shutil.copyfile(folder / name, blob)
        (repo / "snapshots" / commit / name).symlink_to(os.path.relpath(blob, repo / "snapshots" / commit))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return cache


# --------------------------------------------------------------------------- the folder and its card

def test_folder_holds_weights_config_card_matrix_and_graph(exported, finished_run):
    pth, folder = exported
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, CONFUSION_FILE,
                                                               ONNX_FILE])
    payload = load_payload(pth)
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config == json.loads(json.dumps({k: v for k, v in payload.items() if k != "state_dict"}))
    assert {"format_version", "family", "model_name", "classes", "image_size", "mean", "std", "crop_pct",
            "interpolation", TEMPERATURE_KEY} <= config.keys()
    # the run has a test split: the card shows its confusion matrix, the one train.py drew
    assert (folder / CONFUSION_FILE).read_bytes() == (finished_run / "confusion_matrix_test.png").read_bytes()


def test_safetensors_is_the_weights_and_nothing_else(exported):
    """A header of JSON, then the tensors' bytes, end to end: no room for pickled code; the tensors are the .pth's."""
    pth, folder = exported
    raw = (folder / WEIGHTS_FILE).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    metadata = header.pop("__metadata__", {})
    assert metadata == {"format": "pt"}
    assert len(raw) == 8 + n + max(entry["data_offsets"][1] for entry in header.values())
    state_dict = load_payload(pth)["state_dict"]
    assert sorted(header) == sorted(state_dict)
    served = hub.read_hub_payload(folder)["state_dict"]
    assert all(torch.equal(served[k], v) for k, v in state_dict.items())


def test_card_yaml_reads_with_huggingface_hub_and_reports_the_measured_results(exported, finished_run):
    _, folder = exported
    card = ModelCard.load(folder / CARD_FILE)
    data = card.data
    assert (data.license, data.library_name, data.pipeline_tag) == (OTHER, "flowers_classifier", "image-classification")
    assert {"image-classification", "fastai", "safetensors", "timm", "onnx"} <= set(data.tags)
    assert data.base_model is None  # trained from random init: no starting weights to name
    report = json.loads((finished_run / "eval_metrics.json").read_text())
    test = report["test"]
    measured = {"accuracy": test["accuracy"], "ece": test["calibration"]["calibrated"]["ece"]}
    assert {r.metric_type: r.metric_value for r in data.eval_results} == measured
    assert {(r.dataset_split, r.dataset_name, r.task_type) for r in data.eval_results} == \
        {("test", "flowers", "image-classification")}
    for heading in ("Intended use", "Classes", "Training data", "Training recipe", "Evaluation", "Confusion matrix",
                    "Limitations", "Usage", "License"):
        assert f"\n## {heading}\n" in card.text, heading
    assert f"]({CONFUSION_FILE})" in card.text and f'fc.load_model("hf-hub:{REPO_ID}")' in card.text
    counts = json.loads((finished_run / "metrics.json").read_text())["class_counts"]
    assert f"| daisy | {counts['train'][0]} | {counts['valid'][0]} | {counts['test'][0]} |" in card.text
    assert f"| validation | {report['n_images']} | {report['accuracy']:.4f} |" in card.text
    assert "no pretrained weights' licence applies" in card.text


def run_copy(finished_run: Path, dest: Path, evaluation: dict | None = None) -> Path:
    """The run's metrics.json and confusion matrices in `dest`, with `evaluation` as its eval_metrics.json."""
    dest.mkdir()
    for name in ("metrics.json", CONFUSION_FILE, "confusion_matrix_test.png"):
        shutil.copy(finished_run / name, dest / name)
    if evaluation is not None:
        (dest / "eval_metrics.json").write_text(json.dumps(evaluation))
    return dest


def test_card_leaves_out_what_the_run_did_not_measure(exported, finished_run, tmp_path):
    pth, _ = exported
    payload = load_payload(pth)
    report = json.loads((finished_run / "eval_metrics.json").read_text())
    licence = resolve_licence(payload, finished_run)

    # no test split: the valid split's accuracy and ECE, named
    valid_only = run_copy(finished_run, tmp_path / "valid", {k: v for k, v in report.items() if k != "test"})
    card, _ = model_card(payload, valid_only, licence, REPO_ID)
    ece = report["calibration"]["calibrated"]["ece"]
    assert {(r.dataset_split, r.metric_type, r.metric_value) for r in card.data.eval_results} == \
        {("validation", "accuracy", report["accuracy"]), ("validation", "ece", ece)}
    # another temperature than the one evaluated: accuracy holds (same argmax), ECE and NLL do not
    card, _ = model_card({**payload, TEMPERATURE_KEY: 2.5}, finished_run, licence, REPO_ID)
    assert [r.metric_type for r in card.data.eval_results] == ["accuracy"] and "NLL and ECE left out" in card.text
    # WiSE-FT weights, a run never evaluated, a bare .pth: no figures at all, and the card says why
    for run_dir, kwargs, says in ((finished_run, dict(wise_ft=0.5), "WiSE-FT"),
                                  (run_copy(finished_run, tmp_path / "never"), {}, "no evaluation"),
                                  (None, {}, "Exported from a .pth file")):
        card, _ = model_card(payload, run_dir, licence, REPO_ID, **kwargs)
        assert not card.data.eval_results and says in card.text, says
        assert "model-index" not in card.content
        assert f"]({CONFUSION_FILE})" not in card.text


def test_export_from_a_pth_writes_a_folder_without_results(exported, tmp_path, capsys):
    """... into an earlier --hub folder too, whose graph and matrix (of other weights) do not stay."""
    pth, _ = exported
    (tmp_path / "h").mkdir()
    for stale in (ONNX_FILE, CONFUSION_FILE, WEIGHTS_FILE):
        (tmp_path / "h" / stale).write_bytes(b"an earlier export")
    assert commands.export([str(pth), "--hub", str(tmp_path / "h"), "--license", "apache-2.0"]) == 0
    card = ModelCard.load(tmp_path / "h" / CARD_FILE)
    assert card.data.license == "apache-2.0" and not card.data.eval_results
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, CARD_FILE])
    assert "hf upload ORG/NAME" in capsys.readouterr().out


# --------------------------------------------------------------------------- licences

def test_licence_comes_from_the_starting_weights():
    cnn, clip = dict(family="cnn", model_name="convnextv2_tiny"), dict(family="clip", model_name="ViT-L-14")
    timm_hub = weights_licence(cnn, {"no_pretrained": False, "weights": None})
    assert (timm_hub.id, timm_hub.base_model) == ("cc-by-nc-4.0", "timm/convnextv2_tiny.fcmae_ft_in22k_in1k")
    openai = weights_licence(clip, {"pretrained_tag": "openai"})
    assert (openai.id, openai.base_model) == ("mit", "timm/vit_large_patch14_clip_224.openai")
    laion = weights_licence(clip, {"pretrained_tag": "datacomp_xl_s13b_b90k"})
    assert (laion.id, laion.base_model) == ("mit", "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K")
    unknown = weights_licence(dict(family="clip", model_name=TINY_CLIP), {"pretrained_tag": "nope"})
    assert unknown.id == OTHER and "--license" in unknown.why
    for config, says in (({"weights": "/data/my_backbone.safetensors"}, "my_backbone.safetensors"),
                         ({"no_pretrained": True}, "random initialisation"), (None, ".pth")):
        found = weights_licence(cnn, config)
        assert found.id == OTHER and says in found.why and "--license" in found.why


def test_license_flag_overrides_with_a_note(finished_run, capsys, tmp_path):
    spec = dict(family="cnn", model_name="convnextv2_tiny")
    run = run_copy(finished_run, tmp_path / "run")
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["config"].update(no_pretrained=False, weights=None)
    (run / "metrics.json").write_text(json.dumps(metrics))
    chosen = resolve_licence(spec, run, "Apache-2.0")
    assert (chosen.id, chosen.base_model) == ("apache-2.0", "timm/convnextv2_tiny.fcmae_ft_in22k_in1k")
    assert "cc-by-nc-4.0" in chosen.why and "--license apache-2.0 replaces" in capsys.readouterr().err


# --------------------------------------------------------------------------- loading it back

@pytest.mark.parametrize("backend", ["auto", "eager", "int8", "onnx"])
def test_folder_serves_what_the_pth_serves(exported, photos, backend):
    pth, folder = exported
    reference = fc.load_model(pth, backend="eager" if backend == "onnx" else backend)
    served = fc.load_model(folder, backend=backend)
    if backend != "onnx":
        assert type(served.backend) is type(reference.backend)
    assert (probabilities(served, photos) - probabilities(reference, photos)).abs().max() <= 1e-6


def test_clip_folder_keeps_fp16_storage_and_serves_the_same(tiny_vit_pth, photos, tmp_path):
    payload = load_payload(tiny_vit_pth)
    write_model_files(payload, tmp_path)
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["dtype"] == "float16"
    assert all(t.dtype == torch.float16 for t in hub.read_hub_payload(tmp_path)["state_dict"].values()
               if t.is_floating_point())
    served, reference = fc.load_vit_model(tmp_path), fc.load_vit_model(tiny_vit_pth)
    assert (probabilities(served, photos) - probabilities(reference, photos)).abs().max() <= 1e-6


def test_folder_errors_name_the_file(exported, tmp_path):
    _, folder = exported
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    with pytest.raises(fc.BackendError, match="holds no CPU package"):
        fc.load_model(broken, backend="cpu-package")
    with pytest.raises(ModelFileError, match="holds a 'cnn' model"):
        fc.load_vit_model(broken)
    (broken / WEIGHTS_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ModelFileError, match=f"{WEIGHTS_FILE}: not a readable safetensors file"):
        fc.load_model(broken)
    (broken / CONFIG_FILE).write_text(json.dumps({**json.loads((folder / CONFIG_FILE).read_text()), "extra": 1}))
    shutil.copy(folder / WEIGHTS_FILE, broken / WEIGHTS_FILE)
    with pytest.raises(ModelFileError, match=r"unexpected keys \['extra'\]"):
        fc.load_model(broken)
    (broken / CONFIG_FILE).unlink()
    with pytest.raises(ModelFileError, match=f"not a Hub model folder \\(no {CONFIG_FILE}\\)"):
        fc.load_model(broken)
    (broken / ONNX_FILE).unlink()
    with pytest.raises(fc.BackendError, match=f"no {ONNX_FILE}"):
        fc.load_model(broken, backend="onnx")


@pytest.mark.parametrize("source", ["hf-hub:acme", "hf-hub:acme/x@", "hf-hub:acme/x/y", "hf-hub:/x"])
def test_malformed_hub_id(source):
    with pytest.raises(HubError, match="hf-hub:ORG/NAME"):
        fc.load_model(source)


def test_hub_id_loads_from_the_cache_offline(exported, photos, tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 (as huggingface_hub reads it: its constants) over a cache laid out as it lays one out (its
    own scan_cache_dir reads it): by id, @commit and @main, eager, int8 and ONNX, the .pth's probabilities."""
    pth, folder = exported
    cache = lay_out_cache(tmp_path / "cache", REPO_ID, folder, (CONFIG_FILE, WEIGHTS_FILE, ONNX_FILE))
    (cached,) = scan_cache_dir(cache).repos
    assert cached.repo_id == REPO_ID and {f.file_name for f in next(iter(cached.revisions)).files} == \
        {CONFIG_FILE, WEIGHTS_FILE, ONNX_FILE}
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    for source, backend in ((f"hf-hub:{REPO_ID}", "auto"), (f"hf-hub:{REPO_ID}@{COMMIT}", "int8"),
                            (f"hf-hub:{REPO_ID}@main", "onnx")):
        served = fc.load_model(source, backend=backend)
        reference = fc.load_model(pth, backend="eager" if backend == "onnx" else backend)
        assert (probabilities(served, photos) - probabilities(reference, photos)).abs().max() <= 1e-6, source


def test_offline_with_nothing_cached_is_a_clear_error_within_10_s(tmp_path, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    start = time.monotonic()
    with pytest.raises(HubError) as e:
        fc.load_model("hf-hub:acme/missing@v1")
    elapsed = time.monotonic() - start  # the bound; here no network is even tried (milliseconds)
    message = str(e.value)
    assert message.startswith("hf-hub:acme/missing@v1: not in the local Hugging Face cache")
    assert all(s in message for s in ("HF_HUB_OFFLINE is set", "hf download acme/missing", "load_model(DIR)"))
    assert elapsed < 10, f"took {elapsed:.1f} s"


def test_a_hub_that_never_answers_costs_one_timeout_then_the_cache(exported, photos, tmp_path, monkeypatch):
    """Packets dropped (a connection that never completes): after HUB_TIMEOUT the cache alone answers, with the
    model when it is there and with a clear error when not; huggingface_hub's own calls would wait minutes."""
    pth, folder = exported
    release = threading.Event()

    def never_answers(*args, **kwargs):
        release.wait(60)
        raise OSError("timed out")

    assert hub.HUB_TIMEOUT < 10  # the bound, by construction: one HUB_TIMEOUT, then the cache alone
    monkeypatch.setattr(hub, "HUB_TIMEOUT", 1.0)  # the same path, sooner
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub.socket, "create_connection", never_answers)
    try:
        monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
        start = time.monotonic()
        with pytest.raises(HubError, match="did not answer within 1 s"):
            fc.load_model("hf-hub:acme/missing")
        elapsed = time.monotonic() - start
        assert elapsed < 10, f"took {elapsed:.1f} s"

        cache = lay_out_cache(tmp_path / "cache", REPO_ID, folder, (CONFIG_FILE, WEIGHTS_FILE))
        monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
        served = fc.load_model(f"hf-hub:{REPO_ID}")
        assert (probabilities(served, photos) - probabilities(fc.load_model(pth), photos)).abs().max() <= 1e-6
    finally:
        release.set()


# --------------------------------------------------------------------------- the command line

@pytest.mark.parametrize("args, says", [
    (["--onnx"], "--onnx without a path"),
    (["--out", "{out}/x.pth", "--license", "mit"], "--license goes into the model card"),
    (["--hub", "{out}", "--examples", "{out}"], "--examples are the Space's"),
    (["--hub", "{out}", "--repo-id", "acme"], "--repo-id acme: expected ORG/NAME"),
])
def test_export_flags_are_checked_before_anything_is_written(exported, tmp_path, capsys, args, says):
    pth, _ = exported
    with pytest.raises(SystemExit):
        commands.export([str(pth), *(a.format(out=tmp_path) for a in args)])
    assert says in capsys.readouterr().err


def test_hub_folder_must_not_hold_other_files(exported, tmp_path, capsys):
    pth, _ = exported
    (tmp_path / "notes.txt").write_text("mine")
    assert commands.export([str(pth), "--hub", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--hub {tmp_path}: holds files this export does not write (notes.txt)" in err
    assert not (tmp_path / WEIGHTS_FILE).exists()
