"""Tests for the CLIP learner (`train.py --arch clip`): the OpenCLIP image encoder + linear head, where
its weights come from (tag, local file, random init, offline failure), the zero-shot head, the CLIP
splitter with layer-wise LR decay and partial unfreezing, and the fp16 export served by
`flowers_classifier.load_vit_model`.

Everything trains a random-init ViT-S-32 at 64 px on CPU; one slow test builds the real ViT-L-14.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path

import open_clip
import pandas as pd
import pytest
import torch
from conftest import ROOT, TINY_CLIP, TINY_SIZE, make_image_folder
from fastai.callback.core import Callback
from fastai.learner import load_learner
from huggingface_hub import constants as hf_constants
from open_clip.transformer import QuickGELU
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from PIL import Image

import flowers_classifier as fc
from flowers_classifier import factory
from flowers_classifier.classes import CLASSES
from flowers_classifier.preprocess import preprocess_image
from flowers_fastai import pretrained, splitters
from flowers_fastai.cli import train as main
from flowers_fastai.data import make_dataloaders, prepare_split
from flowers_fastai.export import export_run
from flowers_fastai.learner import build_learner, fine_tune, resolve_precision
from flowers_fastai.train import (
    build_model,
    build_parser,
    check_clip_args,
    make_recipe,
    model_spec,
    resolve_args,
)

TINY_BLOCKS = 12  # ViT-S-32 has 12 transformer blocks


# --------------------------------------------------------------------------- helpers

def clip_args(*extra: str):
    """Parsed + resolved `train.py --arch clip` arguments for the tiny ViT-S-32 at 64 px."""
    argv = ["--arch", "clip", "--model", TINY_CLIP, "--img-size", str(TINY_SIZE), *extra]
    return resolve_args(build_parser().parse_args(argv))


def save_random_clip(path: Path, seed: int = 0, quick_gelu: bool = False) -> Path:
    """A full random-init open_clip ViT-S-32 (image + text tower) saved as a plain checkpoint file."""
    torch.manual_seed(seed)
    clip = open_clip.create_model(TINY_CLIP, force_image_size=TINY_SIZE, force_quick_gelu=quick_gelu)
    torch.save(clip.state_dict(), path)
    return path


def tiny_learner(model, args, folder: Path, run_dir: Path):
    """A fastai Learner as train.py builds it, on a synthetic image folder."""
    df = prepare_split(folder, run_dir, valid_pct=0.2, seed=0)
    dls = make_dataloaders(df, folder, factory.preprocess_for(model), bs=8)
    recipe = make_recipe(args, len(splitters.param_groups(model)))
    return build_learner(dls, model, recipe, run_dir), recipe


def param_names(model, params) -> set[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for p in params}


def open_clip_zero_shot(ckpt: Path, photos: list[Path]) -> dict[str, torch.Tensor]:
    """Zero-shot exactly as open_clip does it, from the same checkpoint: its own eval transform, its
    own prompt averaging (build_zero_shot_classifier), logits = logit_scale * cos(image, class)."""
    clip, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP, pretrained=str(ckpt),
                                                                force_image_size=TINY_SIZE)
    clip.eval()
    with torch.no_grad():
        classifier = build_zero_shot_classifier(clip, open_clip.get_tokenizer(TINY_CLIP), CLASSES,
                                                pretrained.CLIP_TEMPLATES)
        pixels = torch.stack([preprocess(Image.open(p)) for p in photos])
        scale = clip.logit_scale.exp()
        logits = scale * clip.encode_image(pixels, normalize=True) @ classifier
    return dict(classifier=classifier, scale=scale, pixels=pixels, logits=logits)


class LrProbe(Callback):
    """Records, at every optimiser step, each parameter group's LR and which parameters train."""

    def before_fit(self):
        self.seen_lrs, self.seen_trainable = [], set()

    def before_step(self):
        self.seen_lrs.append([h["lr"] for h in self.opt.hypers])
        self.seen_trainable |= {n for n, p in self.learn.model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory) -> Path:
    return save_random_clip(tmp_path_factory.mktemp("clip") / "vit_s_32_random.pt")


# --------------------------------------------------------------------------- train -> export -> load

def test_train_export_load_parity_with_learner(real_flowers, tmp_path):
    run, vit = tmp_path / "run", tmp_path / "vit.pth"
    rc = main(["--arch", "clip", "--data", str(real_flowers), "--epochs", "1",
               "--freeze-epochs", "1", "--img-size", str(TINY_SIZE), "--model", TINY_CLIP, "--bs", "16",
               "--no-pretrained", "--out", str(run), "--export", str(vit)])
    assert rc == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["param_groups"] == TINY_BLOCKS + 3
    assert metrics["model"]["family"] == "clip" and metrics["model"]["quick_gelu"] is False
    # A random text tower gives no zero-shot head: the head starts random and no zero-shot accuracy is claimed.
    assert metrics["config"]["head_init"] == "random" and "zero_shot_accuracy" not in metrics

    payload = torch.load(vit, map_location="cpu", weights_only=True)
    assert payload["dtype"] == "float16"  # CLIP exports store fp16 by default
    assert {v.dtype for v in payload["state_dict"].values() if v.is_floating_point()} == {torch.float16}

    split = pd.read_csv(run / "split.csv")
    files = [str(real_flowers / p) for p in split[split.is_valid]["path"]]
    learn = load_learner(run / "learner.pkl")
    learner_probs, _ = learn.get_preds(dl=learn.dls.test_dl(files))
    # The learner is the raw network: compare with the raw softmax (the export's temperature is tested elsewhere).
    model = fc.load_vit_model(vit, device="cpu", calibrated=False)
    assert next(model.net.parameters()).dtype == torch.float32
    served = torch.tensor([[fc.predict_proba(model, f)[c] for c in CLASSES] for f in files])

    assert learner_probs.max() - learner_probs.min() > 0.01  # not a uniform output: parity means something
    assert torch.equal(learner_probs.argmax(1), served.argmax(1))
    assert (learner_probs - served).abs().max() < 1e-3
    assert [fc.predict(model, f) for f in files[:3]] == [CLASSES[i] for i in served.argmax(1)[:3]]
    # The export holds the best weights: its valid accuracy is the one the run reports.
    labels = torch.tensor([CLASSES.index(y) for y in split[split.is_valid]["label"]])
    assert (served.argmax(1) == labels).float().mean().item() == pytest.approx(metrics["best_accuracy"])


# --------------------------------------------------------------------------- splitter, freeze, LLRD

def test_splitter_groups_freeze_and_llrd(image_folder, tmp_path):
    args = clip_args("--no-pretrained", "--head-init", "random", "--llrd", "0.5", "--lr", "1e-3",
                     "--freeze-epochs", "0", "--epochs", "1")
    model = build_model(args)
    groups = splitters.param_groups(model)
    assert len(groups) == len(model.visual.transformer.resblocks) + 3 == TINY_BLOCKS + 3
    names = [param_names(model, g) for g in groups]
    assert names[0] == {"visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding",
                        "visual.ln_pre.weight", "visual.ln_pre.bias"}
    for i in range(TINY_BLOCKS):
        assert names[1 + i] == {n for n, _ in model.named_parameters()
                                if n.startswith(f"visual.transformer.resblocks.{i}.")}
    assert names[-2] == {"visual.ln_post.weight", "visual.ln_post.bias", "visual.proj"}
    assert names[-1] == {"head.weight", "head.bias"}
    assert sum(len(g) for g in groups) == len(list(model.parameters()))  # each parameter exactly once

    learn, recipe = tiny_learner(model, args, image_folder, tmp_path)
    learn.freeze()  # the linear probe
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}

    probe = LrProbe()
    learn.add_cb(probe)
    fine_tune(learn, recipe)  # stage 2 only: unfreeze + fit_one_cycle with the LLRD slice
    assert probe.seen_trainable == {n for n, _ in model.named_parameters()}
    n = len(groups)
    for lrs in probe.seen_lrs:  # head gets lr(t); group g gets lr(t) * 0.5 ** (n - 1 - g), down to the patch embed
        assert lrs[-1] > 0
        assert lrs == pytest.approx([lrs[-1] * 0.5 ** (n - 1 - g) for g in range(n)], rel=1e-9)
    # --llrd D is fastai's slice(lr * D**(n-1), lr): the peak LRs of the schedule.
    learn.opt.set_hyper("lr", slice(1e-3 * 0.5 ** (n - 1), 1e-3))
    assert [h["lr"] for h in learn.opt.hypers] == pytest.approx([1e-3 * 0.5 ** (n - 1 - g) for g in range(n)])


def test_unfreeze_last_trains_only_last_blocks_and_head(image_folder, tmp_path):
    args = clip_args("--no-pretrained", "--unfreeze-last", "2", "--freeze-epochs", "0", "--epochs", "1",
                     "--lr", "1e-3")
    model = build_model(args)
    learn, recipe = tiny_learner(model, args, image_folder, tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = LrProbe()
    learn.add_cb(probe)
    fine_tune(learn, recipe)

    last_two = (f"visual.transformer.resblocks.{TINY_BLOCKS - 2}.", f"visual.transformer.resblocks.{TINY_BLOCKS - 1}.")
    expected = {n for n, _ in model.named_parameters()
                if n.startswith(last_two + ("visual.ln_post.", "head.")) or n == "visual.proj"}
    assert probe.seen_trainable == expected
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == expected


def test_unfreeze_last_out_of_range_fails_before_training(image_folder, tmp_path):
    args = clip_args("--no-pretrained", "--freeze-epochs", "1", "--epochs", "1")
    model = build_model(args)
    learn, recipe = tiny_learner(model, args, image_folder, tmp_path)
    for k in (0, TINY_BLOCKS + 1):
        recipe.unfreeze_last = k
        with pytest.raises(ValueError, match=rf"--unfreeze-last {k}: .* 1\.\.{TINY_BLOCKS}"):
            fine_tune(learn, recipe)
    assert pd.read_csv(tmp_path / "history.csv").empty  # not even the linear probe ran


def test_clip_recipe_defaults():
    args = clip_args()
    n = TINY_BLOCKS + 3
    recipe = make_recipe(args, n)
    assert (recipe.head_lr, recipe.lr, recipe.label_smoothing, recipe.grad_clip) == (1e-3, 1e-5, 0.05, 1.0)
    assert (recipe.freeze_epochs, recipe.precision, recipe.ema_decay) == (2, "auto", None)
    assert recipe.lr / recipe.lr_mult == pytest.approx(1e-5 * 0.75 ** (n - 1))  # --llrd 0.75 by default
    assert make_recipe(clip_args("--no-pretrained"), n).lr_mult == 1.0  # random init: one LR for all groups
    tuned = make_recipe(clip_args("--bf16", "--ema", "0.999", "--unfreeze-last", "4"), n)
    assert (tuned.precision, tuned.ema_decay, tuned.unfreeze_last) == ("bf16", 0.999, 4)
    assert resolve_precision(tuned.precision) == "bf16"  # CUDA or the CPU (tests/test_mixed_precision.py)
    for bad in ("0", "1.5"):
        with pytest.raises(ValueError, match=rf"--llrd {bad}"):
            check_clip_args(clip_args("--no-pretrained", "--llrd", bad))


# --------------------------------------------------------------------------- zero-shot head

def test_zero_shot_head_equals_open_clip_zero_shot(clip_ckpt, real_photos):
    photos = [p for c in CLASSES for p in real_photos[c][:2]]
    ref = open_clip_zero_shot(clip_ckpt, photos)
    scale = ref["scale"].item()
    ref_pixels, ref_logits = ref["pixels"], ref["logits"]

    model = build_model(clip_args("--weights", str(clip_ckpt))).eval()  # --head-init zeroshot is the default
    torch.testing.assert_close(model.head.weight, ref["classifier"].T * scale, rtol=1e-5, atol=1e-5 * scale)
    assert torch.count_nonzero(model.head.bias) == 0
    # Same pixels (CLIP's mean/std, bicubic short-side resize, center crop) and same predictions.
    prep = factory.preprocess_for(model)
    pixels = torch.stack([preprocess_image(p, prep) for p in photos])
    torch.testing.assert_close(pixels, ref_pixels, rtol=0, atol=1e-5)
    with torch.no_grad():
        logits = model(pixels)
    assert torch.equal(logits.argmax(1), ref_logits.argmax(1))
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)

    random_head = build_model(clip_args("--weights", str(clip_ckpt), "--head-init", "random"))
    assert not torch.allclose(random_head.head.weight, model.head.weight, atol=1e-2)


def test_no_pretrained_head_is_random_not_zero_shot(monkeypatch):
    calls = []
    monkeypatch.setattr(pretrained, "zero_shot_weights", lambda *a, **k: calls.append(a))
    model = build_model(clip_args("--no-pretrained"))
    assert calls == []  # the random text tower was never asked for a head
    # A zero-shot row is a unit vector times CLIP's logit scale (1/0.07 at init) and its bias is zero;
    # nn.Linear's own init gives rows of norm well below 1 and a non-zero bias.
    assert model.head.weight.norm(dim=1).max() < 1.0 and torch.count_nonzero(model.head.bias) > 0


def test_zero_shot_head_without_pretrained_weights_is_refused(tmp_path, capsys):
    rc = main(["--arch", "clip", "--model", TINY_CLIP, "--no-pretrained", "--head-init", "zeroshot",
               "--data", str(tmp_path / "no-such-folder"), "--out", str(tmp_path / "run"), "--no-export"])
    err = capsys.readouterr().err
    assert rc == 2 and "--head-init zeroshot needs pretrained weights" in err and "--no-pretrained" in err
    assert not (tmp_path / "run").exists()  # refused before the data scan


def test_zero_shot_accuracy_is_measured_before_training(clip_ckpt, real_flowers, tmp_path):
    run = tmp_path / "run"
    rc = main(["--arch", "clip", "--model", TINY_CLIP, "--img-size", str(TINY_SIZE), "--weights", str(clip_ckpt),
               "--data", str(real_flowers), "--freeze-epochs", "1", "--epochs", "0",
               "--bs", "16", "--out", str(run), "--no-export"])
    assert rc == 0
    metrics = json.loads((run / "metrics.json").read_text())
    split = pd.read_csv(run / "split.csv")
    valid = split[split.is_valid]
    logits = open_clip_zero_shot(clip_ckpt, [real_flowers / p for p in valid["path"]])["logits"]
    labels = torch.tensor([CLASSES.index(y) for y in valid["label"]])
    assert metrics["zero_shot_accuracy"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())


# --------------------------------------------------------------------------- where the weights come from

def test_weights_file_is_exactly_what_the_encoder_starts_from(clip_ckpt, monkeypatch):
    made = []
    real_create = open_clip.create_model

    def spy(*args, **kwargs):
        clip = real_create(*args, **kwargs)
        made.append(weakref.ref(clip))
        return clip

    monkeypatch.setattr(open_clip, "create_model", spy)
    model = build_model(clip_args("--weights", str(clip_ckpt), "--grad-checkpointing"))
    gc.collect()
    assert len(made) == 1 and made[0]() is None  # the full CLIP (text tower included) was let go
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {"visual", "head"}
    assert model.visual.transformer.grad_checkpointing

    saved = torch.load(clip_ckpt, map_location="cpu", weights_only=True)
    expected = {k.removeprefix("visual."): v for k, v in saved.items() if k.startswith("visual.")}
    got = model.visual.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_bad_weights_files_name_the_flag(clip_ckpt, tmp_path, capsys):
    with pytest.raises(pretrained.WeightsFileError, match="--weights .*missing.pt: no such file"):
        build_model(clip_args("--weights", str(tmp_path / "missing.pt")))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(pretrained.WeightsFileError, match="--weights .*junk.pt: not an open_clip checkpoint"):
        build_model(clip_args("--weights", str(junk)))
    partial = {k: v for k, v in torch.load(clip_ckpt, weights_only=True).items() if k != "visual.proj"}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(pretrained.WeightsFileError, match="not an open_clip checkpoint of ViT-S-32"):
        build_model(clip_args("--weights", str(tmp_path / "partial.pt")))
    # Through the CLI: exit status 2 and one line naming the flag, no traceback.
    assert main(["--arch", "clip", "--weights", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "r")]) == 2
    assert "--weights" in capsys.readouterr().err


def test_pretrained_tag_sets_quick_gelu_and_round_trips_export(monkeypatch, tmp_path, real_photos):
    """A tag is resolved through open_clip's own tag machinery; only the download itself is replaced
    by a local random-init checkpoint (trained with QuickGELU, like OpenAI's weights)."""
    ckpt = save_random_clip(tmp_path / "quickgelu.pt", seed=1, quick_gelu=True)
    tag_cfg = dict(hf_hub="example/vit-s-32-quickgelu/", quick_gelu=True, mean=(0.5, 0.5, 0.5),
                   std=(0.5, 0.5, 0.5), interpolation="bicubic", resize_mode="shortest")
    real_cfg = open_clip.get_pretrained_cfg
    fake_cfg = lambda model, tag: dict(tag_cfg) if (model, tag) == (TINY_CLIP, "fake-openai") else real_cfg(model, tag)
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", fake_cfg)
    monkeypatch.setattr(open_clip.factory, "get_pretrained_cfg", fake_cfg)
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda cfg, **kw: str(ckpt))
    hub_checks = []
    monkeypatch.setattr(pretrained, "_require_hub", lambda repo, files, what: hub_checks.append((repo, files)))

    args = clip_args("--pretrained-tag", "fake-openai")
    model = build_model(args).eval()
    assert hub_checks == [("example/vit-s-32-quickgelu", ("open_clip_model.safetensors",
                                                         "open_clip_pytorch_model.bin"))]
    assert model.quick_gelu is True
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    prep = factory.preprocess_for(model)
    assert (prep.image_size, prep.mean, prep.interpolation, prep.crop_pct) == (TINY_SIZE, (0.5,) * 3, "bicubic", 1.0)

    run = tmp_path / "run"
    run.mkdir()
    spec = model_spec(args, model, prep)
    (run / "metrics.json").write_text(json.dumps({"model": spec}))
    torch.save(model.state_dict(), run / "best.pth")
    out = export_run(run, tmp_path / "vit.pth")
    payload = torch.load(out, weights_only=True)
    assert payload["quick_gelu"] is True and payload["dtype"] == "float16"

    served = fc.load_vit_model(out, device="cpu")
    assert isinstance(served.net.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    photos = [real_photos[c][0] for c in CLASSES]
    x = torch.stack([preprocess_image(p, prep) for p in photos])
    with torch.no_grad():
        expected = model(x).softmax(-1)
        got = served.probabilities(x)
        assert torch.equal(got.argmax(1), expected.argmax(1))
        assert (got - expected).abs().max() < 1e-3
        # Tighter: with the weights rounded as fp16 storage rounds them, the served net computes the
        # same logits to float rounding, while a GELU rebuild of the same weights is far off.
        rounded = {k: v.half().float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
        model.load_state_dict(rounded)
        gelu_twin = factory.build_from_spec({**spec, "quick_gelu": False}).eval()
        gelu_twin.load_state_dict(rounded)
        ref_logits, served_logits, gelu_logits = model(x), served.net(x), gelu_twin(x)
    torch.testing.assert_close(served_logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert (gelu_logits - ref_logits).abs().max() > 1e-3


def test_hub_reachability_honours_hf_endpoint(monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    assert pretrained.hub_reachable(timeout=2.0) is False
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setattr(hf_constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert pretrained.hub_reachable(timeout=2.0) is True


def test_offline_default_fails_fast_naming_the_flags(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=3, size=32)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf-home"))  # no network, empty cache
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "train.py", "--arch", "clip", "--data", str(data),
                           "--out", str(tmp_path / "run")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    assert "--weights" in proc.stderr and "--no-pretrained" in proc.stderr and "ViT-L-14" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert elapsed < 60  # product requirement: fail fast, not after a retry loop
    assert not (tmp_path / "run").exists()  # failed before the run folder was made


def test_unknown_model_name_fails_before_anything_is_built():
    with pytest.raises(ValueError, match="--model ViT-Nope: not an open_clip model"):
        check_clip_args(clip_args("--model", "ViT-Nope", "--no-pretrained"))


def test_input_size_and_pixel_stats_follow_the_model():
    # ViT-B-32-256 is the smallest open_clip ViT whose native input is not 224 (like the -336 models).
    for name, size in (("ViT-B-32-256", 256), (TINY_CLIP, 224)):
        prep = factory.preprocess_for(factory.create_clip(name))
        assert (prep.image_size, prep.interpolation, prep.crop_pct) == (size, "bicubic", 1.0)
        assert prep.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
        assert prep.std == pytest.approx(open_clip.OPENAI_DATASET_STD)


def test_help_documents_every_clip_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--arch", "clip", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    entries = {}  # "--flag" -> its description, with argparse's line wrapping undone
    for chunk in ("\n" + text).split("\n  -")[1:]:
        head, _, rest = ("-" + chunk).partition("  ")  # "--llrd LLRD" | description
        for flag in head.replace(",", " ").split():
            if flag.startswith("-"):
                entries[flag] = " ".join(rest.split())
    for flag in ("--model", "--pretrained-tag", "--weights", "--no-pretrained", "--head-init", "--llrd",
                 "--unfreeze-last", "--grad-checkpointing", "--bf16", "--ema", "--freeze-epochs", "--lr",
                 "--head-lr", "--label-smoothing", "--img-size"):
        assert len(entries.get(flag, "")) > 20, f"{flag} is not documented in --help"
    assert "slice(" in entries["--llrd"] and "ViT-L-14" in entries["--model"]
    assert "openai" in entries["--pretrained-tag"] and "zeroshot" in entries["--head-init"]


# --------------------------------------------------------------------------- the real ViT-L/14

@pytest.mark.slow
def test_vit_l14_fp16_export_size_and_cpu_predict(tmp_path, real_photos):
    model = factory.create_clip("ViT-L-14").eval()
    n_encoder = sum(p.numel() for p in model.visual.parameters())
    assert 300e6 < n_encoder < 308e6  # ~304M
    assert len(splitters.param_groups(model)) == 24 + 3
    prep = factory.preprocess_for(model)
    assert prep.image_size == 224
    photo = real_photos["rose"][0]
    with torch.no_grad():
        expected = model(preprocess_image(photo, prep)[None]).softmax(-1)[0]
    run = tmp_path / "run"
    run.mkdir()
    spec = dict(family="clip", model_name="ViT-L-14", classes=list(CLASSES), quick_gelu=False, **prep.to_dict())
    (run / "metrics.json").write_text(json.dumps({"model": spec}))
    torch.save(model.state_dict(), run / "best.pth")
    del model
    gc.collect()
    out = export_run(run, tmp_path / "vit_flowers.pth")
    (run / "best.pth").unlink()
    assert out.stat().st_size <= 650e6

    served = fc.load_vit_model(out, device="cpu")
    assert sum(p.numel() for p in served.net.visual.parameters()) == n_encoder
    assert next(served.net.parameters()).dtype == torch.float32
    probs = fc.predict_proba(served, photo)
    assert fc.predict(served, photo) in CLASSES
    assert torch.tensor([probs[c] for c in CLASSES]).sub(expected).abs().max() < 1e-3
    del served
    gc.collect()
