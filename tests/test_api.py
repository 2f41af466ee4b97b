"""The public API's own promises: export_pth writes export.py's payload from the best weights, and the
API refuses mismatched DataLoaders / options with a message saying what to pass instead."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_CNN, TINY_SIZE

import flowers_classifier as fc
from flowers_classifier.payload import TEMPERATURE_KEY
from flowers_fastai import export_pth, flowers_dataloaders, flowers_learner
from flowers_fastai.export import BEST_NAME, export_run


@pytest.fixture(scope="module")
def tiny_learner(real_flowers, tmp_path_factory):
    dls = flowers_dataloaders(real_flowers, model=TINY_CNN, img_size=TINY_SIZE, bs=16, pretrained=False,
                              run_dir=tmp_path_factory.mktemp("api-run"))
    learn = flowers_learner(dls, pretrained=False, ema_decay=0.9)
    learn.fit_one_cycle(1, 1e-3)
    return learn


def test_export_pth_writes_the_best_weights_calibrated(tiny_learner, tmp_path, real_photos):
    path = export_pth(tiny_learner, tmp_path / "api.pth")
    payload = torch.load(path, weights_only=True)
    best = torch.load(tiny_learner.path / f"{BEST_NAME}.pth", weights_only=True)
    assert all(torch.equal(payload["state_dict"][k], v.float() if v.is_floating_point() else v)
               for k, v in best.items())
    assert payload[TEMPERATURE_KEY] > 0 and payload["model_name"] == TINY_CNN and payload["image_size"] == TINY_SIZE
    # The same payload export.py writes for a run folder with these weights (metrics.json holds the spec).
    (tiny_learner.path / "metrics.json").write_text(__import__("json").dumps(dict(model={
        k: v for k, v in payload.items() if k not in ("format_version", "dtype", "state_dict", TEMPERATURE_KEY)})))
    cli = torch.load(export_run(tiny_learner.path, tmp_path / "cli.pth", temperature=payload[TEMPERATURE_KEY]),
                     weights_only=True)
    assert cli.keys() == payload.keys() and all(torch.equal(cli["state_dict"][k], v)
                                                for k, v in payload["state_dict"].items())
    assert fc.predict(fc.load_model(path), real_photos["rose"][0]) in fc.CLASSES


def test_mismatches_say_what_to_do(tiny_learner, real_flowers):
    with pytest.raises(ValueError, match="flowers_dataloaders"):
        flowers_learner(tiny_learner.dls, model="convnextv2_nano", pretrained=False)
    with pytest.raises(ValueError, match="arch='clip'"):
        flowers_learner(tiny_learner.dls, arch="clip", pretrained=False)
    with pytest.raises(TypeError, match="unknown recipe option"):
        flowers_learner(tiny_learner.dls, pretrained=False, epochz=3)
    with pytest.raises(ValueError, match="llrd"):
        flowers_learner(tiny_learner.dls, pretrained=False, llrd=0.5)
    with pytest.raises(TypeError, match="flowers_dataloaders"):
        flowers_learner(object(), pretrained=False)


def test_readme_states_what_fastai_fine_tune_does(tiny_learner, monkeypatch):
    """The README's `learn.fine_tune(5, 1e-3)` line gives the LRs fastai really uses (it halves base_lr for
    stage 2 and runs the frozen epoch with pct_start=0.99), not our recipe's."""
    import re

    from conftest import ROOT
    readme = (ROOT / "README.md").read_text()
    num = r"([0-9.e-]+)"
    line = re.search(rf"learn\.fine_tune\((\d+), {num}\)\s+# fastai's: 1 frozen epoch at {num}, then (\d+) at "
                     rf"slice\({num}, {num}\)", readme)
    assert line, "README.md: the learn.fine_tune example line no longer states its LRs"
    epochs, base_lr, frozen_lr, stage2_epochs, lo, hi = line.groups()
    fits = []
    monkeypatch.setattr(tiny_learner, "fit_one_cycle", lambda n, lr, **kw: fits.append((n, lr, kw)), raising=False)
    monkeypatch.setattr(tiny_learner, "freeze", lambda: None, raising=False)
    monkeypatch.setattr(tiny_learner, "unfreeze", lambda: None, raising=False)
    tiny_learner.fine_tune(int(epochs), float(base_lr))
    (n1, lr1, kw1), (n2, lr2, _) = fits
    assert (n1, lr1.stop, kw1["pct_start"]) == (1, float(frozen_lr), 0.99) and "pct_start=0.99" in readme
    assert (n2, lr2.start, lr2.stop) == (int(stage2_epochs), float(lo), float(hi))
