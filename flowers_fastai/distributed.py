"""Data-parallel training over several processes (one per GPU, or CPU processes with gloo), through fastai's
DistributedTrainer (Hugging Face Accelerate + DDP + DistributedDL).

Launch with `accelerate launch --multi_gpu --num_processes N train.py ...` or `torchrun --nproc_per_node N
train.py ...`: the launcher sets WORLD_SIZE, RANK and LOCAL_RANK, read here. Every process builds the same
learner; `distributed_fit` wraps the model in DDP and every DataLoader in a DistributedDL (each process sees its
shard of every epoch, `--bs` per process). Only rank 0 (`is_main`) writes the run folder, and only rank 0 reads
it: what the other ranks need from it (the split table, best.pth at a fit's end, last.pth and history.csv on
--resume) rank 0 sends over the process group (`on_main`, `read_on_main`), so machines need not share a disk.

The small workarounds of fastai/Accelerate behaviour, all here:
- `check_launch`: `accelerate launch --cpu --num_processes N` runs ONE process (Accelerate's multi-CPU path goes
  through mpirun; without --mpirun_hostfile it starts the script once, with MASTER_ADDR set but no WORLD_SIZE):
  refused instead of training one process quietly.
- `_DistributedTrainer.before_fit`: on the CPU under torchrun `Accelerator.prepare` returns the bare model (no DDP
  wrapper) and fastai's DistributedTrainer then reads `model.device`: we wrap in DDP ourselves and take the device
  from the DataLoaders.
- `_DistributedDL._broadcast`: fastai's DistributedDL broadcasts the shuffled indices as `LongTensor(t).cuda()`
  ("nccl only works with cuda tensors"): with gloo the tensor stays on the CPU.
- `shutdown`: train.main leaves the process group on every way out (a group left to interpreter teardown may abort
  a rank at exit with SIGABRT).
- `outside_ddp` + `on_main`: `--lr auto` runs fastai's lr_find on rank 0 alone (its temporary checkpoint is saved
  and restored by rank 0 only, and its smoothed loss would all_gather across ranks under WORLD_SIZE > 1), then
  broadcasts the suggestion; the other ranks wait, weights untouched.
"""

from __future__ import annotations

import hashlib
import io
import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from fastai.callback.progress import ProgressCallback
from fastai.distributed import DistributedDL, DistributedTrainer
from fastai.torch_core import get_model
from fastcore.basics import noop
from torch.nn.parallel import DistributedDataParallel


def world_size() -> int:
    """Processes in this training (WORLD_SIZE from torchrun / accelerate launch), 1 when launched plainly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one process that writes the run folder and prints."""
    return rank() == 0


def check_launch() -> None:
    """Refuse a launch that asked for several processes but started one (see the module docstring)."""
    env = os.environ
    if "WORLD_SIZE" not in env and "MASTER_ADDR" in env and "ACCELERATE_USE_CPU" in env:
        raise ValueError("accelerate launch asked for several processes but started only this one (Accelerate's "
                         "multi-CPU launch needs mpirun); on the CPU launch with "
                         "`python -m torch.distributed.run --nproc_per_node N train.py ...` instead.")


def init() -> None:
    """Join the process group when launched with several processes: nccl on CUDA, gloo on the CPU."""
    if world_size() > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def shutdown() -> None:
    """Leave the process group, when this process joined one. Called by train.main on every way out: a gloo
    group left to the interpreter's teardown can abort the process (SIGABRT) as its worker threads free tensors
    after Python is gone; torch asks for destroy_process_group before exit."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather(obj) -> list:
    """`obj` of every rank, in rank order (on every rank); [obj] single-process."""
    if world_size() <= 1 or not dist.is_initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def on_main(fn):
    """`fn()` run on rank 0 alone, its result (or its error, raised again) given to every rank (collective
    with several processes: every rank calls it). Single-process: just `fn()`."""
    if world_size() <= 1 or not dist.is_initialized():
        return fn()
    box = [None]
    if is_main():
        try:
            box[0] = ("ok", fn())
        except Exception as e:
            box[0] = ("error", e)
            dist.broadcast_object_list(box, src=0)  # the other ranks must not wait for a result forever
            raise
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def read_on_main(path: str | Path) -> Path | io.BytesIO:
    """Rank 0's file `path`, for torch.load on every rank (collective with several processes): rank 0 reads it
    and sends its bytes, so the other ranks need no copy of the run folder (each holds the whole file in memory
    meanwhile). Rank 0's error, e.g. FileNotFoundError, is raised on every rank. Single-process: `path` itself."""
    if world_size() <= 1 or not dist.is_initialized():
        return Path(path)
    return io.BytesIO(on_main(Path(path).read_bytes))


@contextmanager
def outside_ddp(learn):
    """A fit on this process alone (no DDP, the full DataLoaders), e.g. lr_find on rank 0 between two
    data-parallel fits: the trainer callback of `distributed_fit` left out meanwhile, and WORLD_SIZE 1 meanwhile
    (fastai's metrics and smoothed loss all_gather across ranks whenever WORLD_SIZE > 1: here no other rank
    takes part)."""
    trainers = [c for c in learn.cbs if isinstance(c, DistributedTrainer)]
    saved = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = "1"
    try:
        with learn.removed_cbs(trainers):
            yield
    finally:
        if saved is None:
            os.environ.pop("WORLD_SIZE", None)
        else:
            os.environ["WORLD_SIZE"] = saved


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the model's state_dict bytes: equal across ranks when DDP keeps them in sync."""
    h = hashlib.sha256()
    for key, value in get_model(model).state_dict().items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _DistributedDL(DistributedDL):
    """fastai's DistributedDL, its index broadcast on the CPU with gloo, remembering this rank's shard size."""

    def _broadcast(self, t, rank):
        # fastai: `LongTensor(t).cuda()` ("nccl only works with cuda tensors"); gloo needs CPU tensors.
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor(t, dtype=torch.long, device=device)
        dist.broadcast(t, rank)
        return t.cpu().tolist()

    def get_idxs(self):
        idxs = super().get_idxs()
        self.shard_size = len(idxs)
        return idxs


class _DistributedTrainer(DistributedTrainer):
    """fastai's DistributedTrainer (Accelerate + DDP), recording per fit this rank's train shard and the digest of
    its trained weights (before SaveModelCallback loads the best ones back)."""

    def __init__(self, **kwargs):
        super().__init__(sync_bn=False, **kwargs)  # ConvNeXt V2 and ViT use LayerNorm: no batch norm to sync
        self.shards, self.digests = [], []

    def before_fit(self):
        model = self.accelerator.prepare(self.model)
        if not isinstance(model, DistributedDataParallel):
            # Accelerate returns the bare model on the CPU under torchrun (and fastai reads `.device`): DDP here.
            model = DistributedDataParallel(model)
        self.learn.model = model
        self.old_dls = list(self.dls)
        self.learn.dls.loaders = [self._wrap_dl(dl) for dl in self.dls]
        if rank():
            self.learn.logger = noop

    def _wrap_dl(self, dl):
        return dl if isinstance(dl, DistributedDL) else _DistributedDL(dl, device=dl.device)

    def after_train(self):
        self._train_shard = getattr(self.learn.dl, "shard_size", None)

    def after_fit(self):
        if getattr(self, "_train_shard", None) is not None:
            self.shards.append(self._train_shard)
        self.digests.append(weights_digest(self.learn.model))
        super().after_fit()


@contextmanager
def distributed_fit(learn):
    """Around the fits of a run: with WORLD_SIZE > 1, fastai's distrib_ctx (our _DistributedTrainer); yields the
    trainer callback (None single-process)."""
    if world_size() <= 1:
        yield None
        return
    cb = _DistributedTrainer()
    learn.add_cb(cb)
    progress = [c for c in learn.cbs if isinstance(c, ProgressCallback)] if rank() else []
    learn.remove_cbs(progress)
    try:
        yield cb
    finally:
        learn.remove_cb(cb)
        learn.add_cbs(progress)


def summary(cb: _DistributedTrainer | None, learn) -> dict:
    """Collective (every rank calls it): world size, backend, each rank's train shard size (last fit) and
    digest of its trained weights (last fit), whether those digests agree, and whether the weights every rank
    ends with (rank 0's best.pth, loaded at the fit's end) agree."""
    final = weights_digest(learn.model)
    mine = dict(rank=rank(), train_shard=cb.shards[-1] if cb and cb.shards else None,
                digest=cb.digests[-1] if cb and cb.digests else final, final=final)
    ranks = gather(mine)
    return dict(world_size=world_size(), backend=dist.get_backend() if dist.is_initialized() else None,
                train_shards=[r["train_shard"] for r in ranks], weights_digests=[r["digest"] for r in ranks],
                weights_in_sync=len({r["digest"] for r in ranks}) == 1,
                final_weights_in_sync=len({r["final"] for r in ranks}) == 1)
