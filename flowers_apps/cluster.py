"""Joining Ray, for `flowers-serve` and `flowers-predict --engine ray`: the cluster at --address / $RAY_ADDRESS, or
a Ray started on this machine for the command's lifetime. Imports Ray: only those two paths import this module."""

from __future__ import annotations

import logging
import os

import ray

from flowers_classifier.errors import FlowersError


class RayUnavailableError(FlowersError, RuntimeError):
    """Ray could not be started or joined. The message names the address and says how to find the right one."""


def connect(address: str | None) -> bool:
    """Join the Ray cluster at `address` (else $RAY_ADDRESS), else start a local Ray; True when this call started
    one (the caller shuts it down when done). Already connected (a test, a notebook): nothing to do, False."""
    if ray.is_initialized():
        return False
    joining = address or os.environ.get("RAY_ADDRESS")
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise RayUnavailableError(f"cannot {'join Ray at ' + joining if joining else 'start a local Ray'} ({e}); "
                                  f"check --address (or RAY_ADDRESS): `ray status` on the head node shows the "
                                  f"cluster, `ray start --head` starts one") from e
    return not joining
