"""The Hub folder: the layout `export.py --hub DIR` writes and `hf upload ORG/NAME DIR` publishes as is, and
finding one by path or by Hub id.

    DIR/config.json        the payload's metadata (format version, family, model name, classes, preprocessing,
                           temperature, ...): everything of a .pth but the weights
    DIR/model.safetensors  the weights (safetensors: tensors and a JSON header, nothing that runs on load)
    DIR/README.md          the model card (the trainer writes it; loading never reads it)
    DIR/model.onnx         the ONNX graph, with `export.py --hub DIR --onnx`

`read_hub_payload(DIR)` gives the dict a .pth gives, validated as `load_payload` validates it, so every backend
serves a folder as it serves the .pth. `hub_folder("hf-hub:ORG/NAME[@REV]")` is that folder in huggingface_hub's
cache (`snapshot_download`: HF_HUB_CACHE, HF_HUB_OFFLINE, HF_ENDPOINT), downloaded when missing. huggingface_hub
is imported here only, and only for a Hub id: loading a file or a folder never touches its download code.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from safetensors import SafetensorError
from safetensors.torch import load_file

from .payload import ModelFileError, resolve_model_path, validate_payload

HUB_PREFIX = "hf-hub:"  # as timm and open_clip name Hub models
CONFIG_FILE, WEIGHTS_FILE, ONNX_FILE, CARD_FILE = "config.json", "model.safetensors", "model.onnx", "README.md"
# Seconds to wait for the Hub (name lookup and connection) before using the cache alone. huggingface_hub's own
# first call (repo_info) has no timeout: where packets are dropped it waits for the OS's TCP timeout (minutes).
HUB_TIMEOUT = 5.0
EXPORT_HINT = "write one with `python export.py RUN_DIR|MODEL.pth --hub DIR`"


class HubError(ModelFileError):
    """A Hub model that cannot be had: a malformed id, no such repository or revision, or offline with nothing
    cached. The message names the id and what to do."""


def is_hub_source(source: str | os.PathLike) -> bool:
    """Whether `load_model` reads `source` as a Hub folder: an "hf-hub:ORG/NAME[@REV]" id, or a directory."""
    return str(source).startswith(HUB_PREFIX) or resolve_model_path(source).is_dir()


def parse_hub_id(source: str) -> tuple[str, str | None]:
    """"hf-hub:ORG/NAME[@REV]" -> (ORG/NAME, REV or None); HubError for anything else."""
    repo_id, _, revision = source.removeprefix(HUB_PREFIX).partition("@")
    parts = repo_id.split("/")
    if not source.startswith(HUB_PREFIX) or len(parts) != 2 or not all(parts) or (revision == "" and "@" in source):
        raise HubError(f"{source!r}: not a Hub model id; write hf-hub:ORG/NAME, or hf-hub:ORG/NAME@REVISION for a "
                       f"branch, tag or commit.")
    return repo_id, revision or None


def hub_reachable(timeout: float | None = None) -> bool:
    """Whether the Hugging Face endpoint (HF_ENDPOINT), or the proxy that reaches it, accepts a TCP connection
    within `timeout` seconds (default HUB_TIMEOUT): one bounded try, not huggingface_hub's retry loop. False under
    HF_HUB_OFFLINE. (The trainer asks it too, before downloading pretrained weights.)"""
    from huggingface_hub import constants
    timeout = HUB_TIMEOUT if timeout is None else timeout
    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    port = url.port or (443 if url.scheme == "https" else 80)
    connected: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection((url.hostname, port), timeout=timeout):
                connected.append(True)
        except OSError:
            connected.append(False)

    # In a thread: the socket timeout does not bound the name lookup, which may wait on a dead DNS server for longer.
    attempt = threading.Thread(target=connect, daemon=True)
    attempt.start()
    attempt.join(timeout)
    return connected == [True]


def hub_folder(source: str | os.PathLike, files: tuple[str, ...] = (CONFIG_FILE, WEIGHTS_FILE)) -> Path:
    """The local folder of `source`: a directory as given (or under models/), or the snapshot of an "hf-hub:" id
    holding `files`, from huggingface_hub's cache, downloaded first when the Hub is reachable. Offline
    (HF_HUB_OFFLINE=1, or no answer within HUB_TIMEOUT) the cache alone serves; HubError when it lacks the model."""
    if not str(source).startswith(HUB_PREFIX):
        return resolve_model_path(source)
    repo_id, revision = parse_hub_id(str(source))
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    offline = not hub_reachable()
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=list(files), local_files_only=offline,
                                   etag_timeout=HUB_TIMEOUT)
    except RevisionNotFoundError as e:
        raise HubError(f"{source}: {repo_id} has no revision {revision!r}; name an existing branch, tag or commit "
                       f"after the @, or leave it out for main.") from e
    except RepositoryNotFoundError as e:
        raise HubError(f"{source}: no model repository {repo_id} on {constants.ENDPOINT} (or it is private or "
                       f"gated: log in with `hf auth login`). Check the id, or load a local folder with "
                       f"load_model(DIR).") from e
    except LocalEntryNotFoundError as e:
        if constants.HF_HUB_OFFLINE:
            why = "HF_HUB_OFFLINE is set"
        elif offline:
            why = f"the Hub ({constants.ENDPOINT}) did not answer within {HUB_TIMEOUT:g} s"
        else:
            why = f"the Hub did not serve it ({str(e).splitlines()[0][:200]})"
        raise HubError(f"{source}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}. "
                       f"Download it once where the Hub is reachable (`hf download {repo_id}`, or this same call), "
                       f"point HF_HUB_CACHE at a cache that holds it, or load a local folder with "
                       f"load_model(DIR).") from e
    return Path(folder)


def read_hub_payload(folder: str | os.PathLike) -> dict:
    """The payload of a Hub folder (config.json + model.safetensors), the dict a .pth holds, validated as
    `load_payload` validates it; ModelFileError naming the folder and the file otherwise."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ModelFileError(f"{folder}: not a Hub model folder (no {path.name}); {EXPORT_HINT}.")
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{config_path}: not readable JSON ({e}); {EXPORT_HINT}.") from e
    if not isinstance(config, dict) or "state_dict" in config:
        raise ModelFileError(f"{config_path}: not a flowers_fastai config (a JSON object of the payload's metadata, "
                             f"without weights); {EXPORT_HINT}.")
    try:
        state_dict = load_file(weights_path, device="cpu")
    except (SafetensorError, OSError) as e:
        raise ModelFileError(f"{weights_path}: not a readable safetensors file ({e}); {EXPORT_HINT}.") from e
    return validate_payload({**config, "state_dict": state_dict}, folder)
