"""The quickstart notebook runs top to bottom (SMALL = True, the committed photos, a CPU), and the public API
builds the same Learner as train.py."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
import pytest
import timm
import torch
from conftest import ROOT, TINY_CNN, TINY_SIZE
from nbclient import NotebookClient

from flowers_fastai import flowers_dataloaders, flowers_learner
from flowers_fastai.data import prepare_split
from flowers_fastai.learner import stage2_lrs
from flowers_fastai.train import build_parser, make_learner, resolve_args

NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
SKIP_TAG = "skip-execution"  # the demo cell (it starts a server) and the upload cell (it needs the network, a login)


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert any("SMALL = True" in c.source for c in nb.cells), "the notebook must start with SMALL = True"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "export_files(" in code[-2].source and "hf upload" in code[-1].source, "the notebook must end by sharing"
    assert SKIP_TAG in code[-1].metadata.get("tags", []), "the upload cell must be tagged to skip in the tests"
    nb.cells = [c for c in nb.cells if SKIP_TAG not in c.metadata.get("tags", [])]
    monkeypatch.setenv("FLOWERS_OUT", str(tmp_path))  # runs/ and models/ there, not in the repository
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    # The kernel is this interpreter (the project's venv), whatever kernelspec the machine has installed.
    client.kernel_manager_class = _venv_kernel_manager()
    start = time.time()
    client.execute()  # raises CellExecutionError on any cell error
    print(f"notebook ran in {time.time() - start:.0f} s")
    assert (tmp_path / "models" / "quickstart.pth").is_file()
    assert (tmp_path / "runs" / "quickstart" / "best.pth").is_file()
    share = tmp_path / "share"  # the Hub folder and the Space folder its last cells write
    assert (share / "flowers-quickstart" / "model.safetensors").is_file()
    assert (share / "flowers-quickstart-demo" / "app.py").is_file()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs), "show_batch/lr_find/plots drew nothing inline"


def _venv_kernel_manager():
    from jupyter_client.manager import KernelManager

    class VenvKernelManager(KernelManager):
        def format_kernel_cmd(self, extra_arguments=None):
            return [sys.executable, "-m", "ipykernel_launcher", "-f", self.connection_file]
    return VenvKernelManager


def _cli_args(data: Path, out: Path, *extra: str) -> argparse.Namespace:
    return resolve_args(build_parser().parse_args(
        ["--arch", "cnn", "--model", TINY_CNN, "--data", str(data), "--img-size", str(TINY_SIZE), "--bs", "8",
         "--out", str(out), "--no-export", *extra]))


def _describe(learn) -> dict:
    """What must agree: parameter groups, loss, callbacks (and their settings), recipe and LR schedule."""
    groups = [[tuple(p.shape) for p in g] for g in learn.splitter(learn.model)]
    cbs = sorted((type(cb).__name__, getattr(cb, "monitor", None), getattr(cb, "patience", None),
                  getattr(cb, "max_norm", None), getattr(cb, "decay", None)) for cb in learn.cbs)
    learn.create_opt()
    learn.opt.set_hyper("lr", stage2_lrs(learn, learn.recipe))  # how fit spreads a slice over the groups
    lrs = [h["lr"] for h in learn.opt.hypers]
    return dict(groups=groups, loss=(type(learn.loss_func).__name__, learn.loss_func.eps), cbs=cbs,
                recipe=vars(learn.recipe), wd=learn.wd, stage2_lrs=lrs, train_bn=learn.train_bn,
                n_train=len(learn.dls.train_ds), n_valid=len(learn.dls.valid_ds), bs=learn.dls.bs)


@pytest.mark.parametrize("pretrained", [True, False])
def test_api_learner_matches_train_py(real_flowers, tmp_path, pretrained):
    """Same arguments, same Learner: the pretrained preset (from a local weights file: no hub in tests) and the
    from-scratch one with EMA and CutMix on."""
    weights = tmp_path / "atto.pth"
    torch.save(timm.create_model(TINY_CNN, pretrained=False).state_dict(), weights)
    extra = ("--weights", str(weights)) if pretrained else ("--no-pretrained", "--ema", "0.99", "--cutmix", "1.0")
    args = _cli_args(real_flowers, tmp_path / "cli", *extra)
    df = prepare_split(real_flowers, tmp_path / "cli", args.valid_pct, args.seed, min_size=TINY_SIZE)
    cli_learn = make_learner(args, df, tmp_path / "cli")
    source = weights if pretrained else False
    options = {} if pretrained else dict(ema_decay=0.99, cutmix=1.0)
    api_dls = flowers_dataloaders(real_flowers, "cnn", model=TINY_CNN, img_size=TINY_SIZE, bs=8,
                                  pretrained=source, run_dir=tmp_path / "api")
    api_learn = flowers_learner(api_dls, pretrained=source, **options)
    cli, api = _describe(cli_learn), _describe(api_learn)
    assert cli == api
    assert len(api["groups"]) == 6  # stem, 4 stages, head
    assert api["stage2_lrs"][0] == pytest.approx(api["stage2_lrs"][-1] / api["recipe"]["lr_mult"])
    assert api["loss"] == ("LabelSmoothingCrossEntropyFlat", 0.1 if pretrained else 0.0)
    assert ("EmaCallback", None, None, None, 0.99) in api["cbs"] or pretrained
