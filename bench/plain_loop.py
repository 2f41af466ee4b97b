"""The reference the fastai recipe is measured against: a plain PyTorch + timm + torchvision training loop,
written the usual way (ImageFolder-style dataset, torchvision transforms in DataLoader workers, AdamW,
linear warmup then cosine decay, cross-entropy). No fastai and nothing from flowers_fastai's training code.

Augmentation does the same kind of work as ours: RandomResizedCrop (scale 0.35-1), horizontal flip, a
small rotation + zoom (p 0.75, like fastai's p_affine) and brightness/contrast jitter 0.2 (p 0.75, like
p_lighting). Validation: resize the short side to size / crop_pct, center crop: the serving transform.

On CUDA (`device="cuda"`, bench/gpu_check.py) it runs the usual GPU way: pinned host memory and non-blocking
copies, torch.autocast for fp16/bf16 and a GradScaler for fp16, channels_last model and batches if asked.
The CPU defaults (fp32, no scaler) train exactly as before.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T


@dataclass
class PlainConfig:
    model: str = "convnextv2_atto"
    img_size: int = 112
    bs: int = 32
    epochs: int = 1
    lr: float = 1e-3
    wd: float = 0.05
    warmup_pct: float = 0.1      # linear warmup over the first 10% of steps, then cosine to 0
    workers: int = 2
    channels_last: bool = False
    seed: int = 0
    device: str = "cpu"          # "cuda": model and batches on the GPU
    precision: str = "fp32"      # fp16 (autocast + GradScaler), bf16 (autocast) or fp32
    skip_steps: int = 0          # per epoch, steps left out of the steady-state timing (worker start-up, autotuning)


AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}


class FrameDataset(Dataset):
    """(image, label index) for the rows of a split table (path relative to root, label)."""

    def __init__(self, df: pd.DataFrame, root: Path, classes: tuple[str, ...], transform):
        self.paths = [Path(root) / p for p in df["path"]]
        self.labels = [classes.index(label) for label in df["label"]]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB")), self.labels[i]


def train_transform(size: int, mean, std) -> T.Compose:
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.35, 1.0), interpolation=T.InterpolationMode.BILINEAR),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.RandomAffine(degrees=15, scale=(1.0, 1.1))], p=0.75),
        T.RandomApply([T.ColorJitter(brightness=0.2, contrast=0.2)], p=0.75),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def valid_transform(size: int, crop_pct: float, mean, std) -> T.Compose:
    return T.Compose([T.Resize(math.floor(size / crop_pct), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_pct: float):
    warmup = max(1, round(total_steps * warmup_pct))
    lam = lambda step: (step + 1) / warmup if step < warmup else \
        0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lam)


def loaders(df: pd.DataFrame, root: Path, classes: tuple[str, ...], cfg: PlainConfig, mean, std, crop_pct: float):
    # A split.csv with a test split marks it in `split`; its test rows must never be trained on.
    train_rows = df[df["split"] == "train"] if "split" in df else df[~df.is_valid]
    train_ds = FrameDataset(train_rows, root, classes, train_transform(cfg.img_size, mean, std))
    valid_ds = FrameDataset(df[df.is_valid], root, classes, valid_transform(cfg.img_size, crop_pct, mean, std))
    kw = dict(batch_size=cfg.bs, num_workers=cfg.workers, persistent_workers=cfg.workers > 0,
              pin_memory=torch.device(cfg.device).type == "cuda")
    return (DataLoader(train_ds, shuffle=True, drop_last=True, **kw), DataLoader(valid_ds, shuffle=False, **kw))


def to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device, channels_last: bool):
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work: a wall-clock reading must not end before the steps it times."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, channels_last: bool, device: torch.device | str = "cpu",
             amp_dtype: torch.dtype | None = None) -> float:
    model.eval()
    device = torch.device(device)
    correct = total = 0
    for x, y in loader:
        x, y = to_device(x, y, device, channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return correct / total


def train_plain(df: pd.DataFrame, root: Path, classes: tuple[str, ...], cfg: PlainConfig) -> dict:
    """Train from random init; returns per epoch: train seconds, train images, valid accuracy, epoch seconds,
    every step's loss, and the steady-state seconds/images (after cfg.skip_steps steps of that epoch)."""
    import timm
    torch.manual_seed(cfg.seed)
    device, amp_dtype = torch.device(cfg.device), AMP_DTYPES[cfg.precision]
    model = timm.create_model(cfg.model, pretrained=False, num_classes=len(classes)).to(device)
    data_cfg = model.pretrained_cfg
    train_dl, valid_dl = loaders(df, root, classes, cfg, data_cfg["mean"], data_cfg["std"], data_cfg["crop_pct"])
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.wd)
    sched = warmup_cosine(opt, cfg.epochs * len(train_dl), cfg.warmup_pct)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")  # disabled: plain backward + step
    loss_fn = nn.CrossEntropyLoss()
    history = []
    for _ in range(cfg.epochs):
        model.train()
        start, seen, losses = time.perf_counter(), 0, []
        steady_start, steady_seen = (start if cfg.skip_steps == 0 else None), 0
        for i, (x, y) in enumerate(train_dl):
            x, y = to_device(x, y, device, cfg.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            losses.append(loss.detach())  # read once per epoch: no host-device sync per step
            seen += len(y)
            if i + 1 == cfg.skip_steps:
                synchronize(device)
                steady_start = time.perf_counter()
            elif i + 1 > cfg.skip_steps:
                steady_seen += len(y)
        synchronize(device)
        end = time.perf_counter()
        acc = evaluate(model, valid_dl, cfg.channels_last, device, amp_dtype)
        history.append(dict(train_s=end - start, train_images=seen, accuracy=acc,
                            epoch_s=time.perf_counter() - start,
                            losses=torch.stack(losses).float().cpu().tolist() if losses else [],
                            steady_s=None if steady_start is None else end - steady_start,
                            steady_images=steady_seen))
    return dict(history=history, accuracy=history[-1]["accuracy"])
