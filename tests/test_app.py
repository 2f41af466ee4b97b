"""app.py, served in-process on 127.0.0.1 with tiny exported models and driven through gradio_client:
the `/predict` endpoint for CNN, ViT and Ensemble, bad uploads, the 20 MB limit, the page without
models, the CLI's start-up errors, and that importing the app never imports fastai."""

from __future__ import annotations

import base64
import json
import math
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import gradio as gr
import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

import flowers_classifier as fc
from flowers_apps import cli as apps_cli
from flowers_apps import demo as app
from flowers_classifier.preprocess import tta_views

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(demo: gr.Blocks) -> Iterator[str]:
    """The demo on a free loopback port for the duration of the block; yields its URL."""
    url = app.launch_demo(demo, "127.0.0.1", free_port(), prevent_thread_lock=True)
    try:
        yield url
    finally:
        demo.close()


@pytest.fixture(scope="module")
def demo(tiny_cnn_pth, tiny_vit_pth, real_flowers) -> gr.Blocks:
    return app.build_demo(tiny_cnn_pth, tiny_vit_pth, real_flowers)


@pytest.fixture(scope="module")
def url(demo) -> Iterator[str]:
    with serving(demo) as url:
        yield url


@pytest.fixture(scope="module")
def client(url) -> Client:
    return Client(url, verbose=False)


@pytest.fixture(scope="module")
def rose(real_photos) -> Path:
    return real_photos["rose"][0]


def components(demo: gr.Blocks, kind: type) -> list:
    return [b for b in demo.blocks.values() if isinstance(b, kind)]


def radio_choices(demo: gr.Blocks) -> list[str]:
    (radio,) = components(demo, gr.Radio)
    return [value for _, value in radio.choices]


def assert_valid_label(result: tuple, choice: str) -> dict[str, float]:
    label, timing = result
    confidences = {c["label"]: c["confidence"] for c in label["confidences"]}
    assert label["label"] in fc.CLASSES
    assert sorted(confidences) == sorted(fc.CLASSES)
    assert math.fsum(confidences.values()) == pytest.approx(1.0, abs=1e-5)
    assert label["label"] == max(confidences, key=confidences.get)
    assert timing.endswith(f" ms with {choice}"), timing
    return confidences


def huge_png(path: Path, side: int = 30_000) -> Path:
    """A valid PNG header claiming side x side pixels (900 MP) with almost no data: a decompression
    bomb that must be refused from its header, without allocating anything."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


def test_importing_app_does_not_import_fastai():
    code = "import sys, app; print(sorted(m for m in sys.modules if m.split('.')[0] == 'fastai'))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", f"importing app imported fastai: {proc.stdout[:500]}"


def test_page_offers_cnn_vit_and_ensemble(demo):
    assert radio_choices(demo) == [app.CNN, app.VIT, app.ENSEMBLE]
    (label,) = components(demo, gr.Label)
    assert label.num_top_classes == 5


def test_only_named_endpoint_is_predict(client):
    assert list(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == ["/predict"]


@pytest.mark.parametrize("choice", [app.CNN, app.VIT, app.ENSEMBLE])
def test_predict_through_gradio_client(client, rose, choice):
    assert_valid_label(client.predict(handle_file(str(rose)), choice, api_name="/predict"), choice)


def test_ensemble_endpoint_is_the_mean_of_cnn_and_vit(client, real_photos):
    photo = handle_file(str(real_photos["sunflower"][0]))
    cnn, vit, both = (assert_valid_label(client.predict(photo, c, api_name="/predict"), c)
                      for c in (app.CNN, app.VIT, app.ENSEMBLE))
    assert cnn != vit
    for c in fc.CLASSES:
        assert both[c] == pytest.approx((cnn[c] + vit[c]) / 2, abs=1e-6)


def test_model_defaults_to_the_first_choice(client, rose):
    default = client.predict(handle_file(str(rose)), api_name="/predict")
    assert default[0] == client.predict(handle_file(str(rose)), app.CNN, api_name="/predict")[0]


@pytest.mark.parametrize("kind", ["text", "truncated", "huge", "empty"])
def test_bad_upload_is_an_error_and_the_next_call_works(client, rose, tmp_path, kind):
    if kind == "text":
        bad, expected = tmp_path / "notes.txt", "notes.txt: not a recognised image format"
        bad.write_text("daisy, dandelion, rose\n")
    elif kind == "truncated":
        bad, expected = tmp_path / "half.jpg", "half.jpg: cannot decode image"
        bad.write_bytes(rose.read_bytes()[: rose.stat().st_size // 2])
    elif kind == "huge":
        bad, expected = huge_png(tmp_path / "huge.png"), "huge.png: image is too large to decode safely"
    else:
        bad, expected = tmp_path / "empty.jpg", "empty.jpg: not a recognised image format"
        bad.write_bytes(b"")
    with pytest.raises(AppError, match=expected):
        client.predict(handle_file(str(bad)), app.CNN, api_name="/predict")
    assert_valid_label(client.predict(handle_file(str(rose)), app.CNN, api_name="/predict"), app.CNN)


def test_upload_over_20mb_is_refused(client, url, rose, tmp_path):
    big = tmp_path / "big.jpg"
    big.write_bytes(os.urandom(20 * 2**20 + 1))
    # gradio_client checks the limit the server advertises before sending ...
    with pytest.raises(ValueError, match="exceeds the maximum file size of 20971520 bytes"):
        client.predict(handle_file(str(big)), app.CNN, api_name="/predict")
    # ... and the server itself refuses a client that does not (a browser script, curl).
    with big.open("rb") as f:
        response = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.jpg", f)}, timeout=60)
    assert response.status_code == 413, response.text
    assert "maximum allowed size of 20971520 bytes" in response.text
    assert_valid_label(client.predict(handle_file(str(rose)), app.CNN, api_name="/predict"), app.CNN)


def test_unknown_model_choice_is_an_error(client, rose):
    with pytest.raises(AppError, match="Model 'ResNet' is not loaded here; choose one of CNN, ViT, Ensemble"):
        client.predict(handle_file(str(rose)), "ResNet", api_name="/predict")


def test_one_model_file_means_no_ensemble(tiny_cnn_pth, tmp_path):
    demo = app.build_demo(tiny_cnn_pth, tmp_path / "vit_flowers.pth")
    assert radio_choices(demo) == [app.CNN]


def test_without_models_the_page_says_how_to_train(tmp_path, rose):
    demo = app.build_demo(tmp_path / "cnn_flowers.pth", tmp_path / "vit_flowers.pth")
    page = "\n".join(str(md.value) for md in components(demo, gr.Markdown))
    for command in ("python train.py --arch cnn", "models/cnn_flowers.pth", "python train.py --arch clip",
                    "models/vit_flowers.pth", "--data DIR --no-pretrained"):
        assert command in page
    assert radio_choices(demo) == []
    with serving(demo) as url:
        with pytest.raises(AppError, match=r"No model is loaded\. Train and export one with 'python train.py"):
            Client(url, verbose=False).predict(handle_file(str(rose)), app.CNN, api_name="/predict")


def test_examples_one_photo_per_class_folder(real_flowers, demo):
    found = app.find_examples(real_flowers)
    assert [p.parent.name for p in found] == list(fc.CLASSES)
    (dataset,) = components(demo, gr.Dataset)
    assert len(dataset.samples) == len(fc.CLASSES)


def test_examples_photos_directly_in_the_folder(tmp_path, rose):
    (tmp_path / "b.jpg").write_bytes(rose.read_bytes())
    (tmp_path / "a.png").write_bytes(rose.read_bytes())
    (tmp_path / "readme.txt").write_text("not an example")
    assert app.find_examples(tmp_path) == [tmp_path / "a.png", tmp_path / "b.jpg"]


def test_main_refuses_a_missing_or_empty_examples_folder(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert apps_cli.demo(["--cnn", str(tmp_path / "x.pth"), "--vit", str(tmp_path / "y.pth"),
                     "--examples", str(missing)]) == 2
    assert f"--examples {missing}: no such folder" in capsys.readouterr().err
    assert apps_cli.demo(["--cnn", str(tmp_path / "x.pth"), "--vit", str(tmp_path / "y.pth"),
                     "--examples", str(tmp_path)]) == 2
    assert f"--examples {tmp_path}: no photos" in capsys.readouterr().err


def test_main_refuses_a_broken_model_file(tmp_path, capsys):
    broken = tmp_path / "cnn_flowers.pth"
    broken.write_bytes(b"not a torch file")
    assert apps_cli.demo(["--cnn", str(broken), "--vit", str(tmp_path / "vit_flowers.pth")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {broken}: ")


# --------------------------------------------------------------------------- TTA, Grad-CAM, top-k

def test_tta_is_the_mean_over_the_ten_views(client, demo, rose):
    probs = assert_valid_label(client.predict(handle_file(str(rose)), app.CNN, True, api_name="/predict"),
                               f"{app.CNN} (TTA, 10 views)")
    model = demo_models(demo)[app.CNN]
    expected = model.probabilities(tta_views(rose, model.prep)).mean(0)
    for c, p in zip(fc.CLASSES, expected, strict=True):
        assert probs[c] == pytest.approx(float(p), abs=1e-5)
    single = assert_valid_label(client.predict(handle_file(str(rose)), app.CNN, api_name="/predict"), app.CNN)
    assert single != probs


def demo_models(demo: gr.Blocks) -> dict:
    """The models build_demo loaded, read back from the /predict handler's closure."""
    fn = next(f.fn for f in demo.fns.values() if f.api_name == "predict")
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__), strict=True))["models"]


@pytest.mark.parametrize(("choice", "maps"), [(app.CNN, 1), (app.VIT, 1), (app.ENSEMBLE, 2)])
def test_heat_maps_one_per_model_of_the_choice(demo, rose, choice, maps):
    explain_choice = app.make_explainer(demo_models(demo))
    shown = explain_choice({"path": str(rose)}, choice, True)
    assert len(shown) == maps
    for overlay, caption in shown:
        assert overlay.size == Image.open(rose).size and caption.startswith("Grad-CAM, ")
    assert explain_choice({"path": str(rose)}, choice, False) is None


def test_a_map_that_cannot_be_drawn_is_a_message_not_a_bare_error(demo, rose, monkeypatch):
    from flowers_classifier.explain import ExplainError

    def refuse(model, path):
        raise ExplainError("Grad-CAM needs gradients: load the .pth <b>instead</b>")
    monkeypatch.setattr(app, "explain", refuse)
    with pytest.raises(gr.Error, match="load the .pth &lt;b&gt;instead") as caught:
        app.make_explainer(demo_models(demo))({"path": str(rose)}, app.CNN, True)
    assert caught.value.print_exception is False


def test_grad_cam_is_on_by_default_for_the_cnn_and_top_k_defaults_to_all(demo):
    (show,) = [c for c in components(demo, gr.Checkbox) if c.elem_id == "show-why"]
    (top_k,) = components(demo, gr.Slider)
    assert show.value is True and top_k.value == len(fc.CLASSES)


# --------------------------------------------------------------------------- one model call at a time

class InFlight:
    """Forward hooks on each network that count the forwards running at once (the most seen in `peak`)
    and hold each for a moment, so calls that are allowed to overlap do overlap."""

    def __init__(self, hold_s: float = 0.3):
        self.hold_s, self.now, self.peak, self.calls = hold_s, 0, 0, 0
        self.lock = threading.Lock()

    def enter(self, module, args) -> None:
        with self.lock:
            self.now += 1
            self.calls += 1
            self.peak = max(self.peak, self.now)
        time.sleep(self.hold_s)

    def leave(self, module, args, output) -> None:
        with self.lock:
            self.now -= 1

    def watch(self, net) -> None:
        net.register_forward_pre_hook(self.enter)
        net.register_forward_hook(self.leave)


def call_as_a_browser(url: str, fn_index: int, data: list) -> dict:
    """Join the queue with event `fn_index` in a session of its own (a browser tab does the same for the
    private events that gradio_client cannot call) and return its process_completed message."""
    session = uuid.uuid4().hex
    joined = httpx.post(f"{url}gradio_api/queue/join", timeout=30,
                        json={"data": data, "fn_index": fn_index, "session_hash": session})
    assert joined.status_code == 200, joined.text
    with httpx.stream("GET", f"{url}gradio_api/queue/data", params={"session_hash": session}, timeout=120) as r:
        for line in r.iter_lines():
            message = json.loads(line.removeprefix("data:")) if line.startswith("data:") else {}
            if message.get("msg") == "process_completed":
                return message
    raise AssertionError(f"event {fn_index}: the stream ended without process_completed")


def test_model_events_run_one_at_a_time(tiny_cnn_pth, tmp_path, rose):
    # /predict, the classification on upload and Grad-CAM all run the network: fired together (three
    # users at once), they must queue behind each other, as the queue's comment in build_demo promises.
    demo = app.build_demo(tiny_cnn_pth, tmp_path / "none.pth")
    in_flight = InFlight()
    in_flight.watch(demo_models(demo)[app.CNN].net)
    fns = {getattr(f.fn, "__name__", ""): index for index, f in demo.fns.items() if f.queue}
    photo = {"meta": {"_type": "gradio.FileData"}, "orig_name": rose.name}
    calls = [(fns["classify"], [False]), (fns["classify_if_image"], [False]), (fns["explain_choice"], [True])]
    with serving(demo) as url, rose.open("rb") as f:
        (photo["path"],) = httpx.post(f"{url}gradio_api/upload", files={"files": (rose.name, f)}, timeout=30).json()
        with ThreadPoolExecutor(len(calls)) as pool:
            done = list(pool.map(lambda c: call_as_a_browser(url, c[0], [photo, app.CNN, *c[1]]), calls))
    assert all(m["success"] for m in done), done
    assert in_flight.calls >= len(calls)
    assert in_flight.peak == 1, f"{in_flight.peak} forwards ran at once"


# --------------------------------------------------------------------------- exposure: login, files, MCP

def test_auth_value_must_be_user_colon_pass():
    assert app.parse_auth("alice:pa:ss") == ("alice", "pa:ss")
    assert app.parse_auth(None) is None
    for bad in ("alice", ":secret", "alice:"):
        with pytest.raises(app.AuthError, match="expected USER:PASS"):
            app.parse_auth(bad)


def test_main_refuses_a_malformed_auth_env(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(app.AUTH_ENV, "nocolon")
    assert apps_cli.demo(["--cnn", str(tmp_path / "x.pth"), "--vit", str(tmp_path / "y.pth")]) == 2
    assert f"--auth (or ${app.AUTH_ENV}): expected USER:PASS" in capsys.readouterr().err


def test_mcp_and_auth_together_are_refused(tiny_cnn_pth, tmp_path, capsys, monkeypatch):
    # Gradio's MCP endpoint does not check the login: serving both would leave an open door.
    monkeypatch.setenv(app.AUTH_ENV, "alice:s3cret")
    assert apps_cli.demo(["--cnn", str(tiny_cnn_pth), "--vit", str(tmp_path / "y.pth"), "--mcp"]) == 2
    assert "--mcp with --auth" in capsys.readouterr().err
    with pytest.raises(app.AuthError, match="does not ask for the login"):
        app.launch_demo(gr.Blocks(), mcp=True, auth=("alice", "s3cret"))


def test_with_auth_the_api_refuses_strangers_and_answers_the_login(tiny_cnn_pth, tmp_path, rose):
    demo = app.build_demo(tiny_cnn_pth, tmp_path / "none.pth")
    url = app.launch_demo(demo, "127.0.0.1", free_port(), prevent_thread_lock=True, auth=("alice", "s3cret"))
    try:
        for path in ("config", "gradio_api/info"):
            assert httpx.get(f"{url}{path}", timeout=30).status_code in (401, 403), path
        call = httpx.post(f"{url}gradio_api/call/predict", json={"data": [None, app.CNN, False]}, timeout=30)
        assert call.status_code in (401, 403), call.text
        with pytest.raises(ValueError, match="Could not login"):
            Client(url, auth=("alice", "wrong"), verbose=False)
        client = Client(url, auth=("alice", "s3cret"), verbose=False)
        assert_valid_label(client.predict(handle_file(str(rose)), app.CNN, api_name="/predict"), app.CNN)
    finally:
        demo.close()


def test_files_outside_the_apps_folders_are_not_served(url, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the web")
    for target in ("/etc/passwd", str(secret), str(ROOT / "pyproject.toml")):
        response = httpx.get(f"{url}gradio_api/file={target}", timeout=30)
        assert response.status_code in (403, 404), (target, response.status_code)
        assert "not for the web" not in response.text and "root:" not in response.text


def test_mcp_tool_classifies_a_real_photo(tiny_cnn_pth, tmp_path, rose):
    import anyio
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    demo = app.build_demo(tiny_cnn_pth, tmp_path / "none.pth")
    url = app.launch_demo(demo, "127.0.0.1", free_port(), prevent_thread_lock=True, mcp=True)
    photo = "data:image/jpeg;base64," + base64.b64encode(rose.read_bytes()).decode()

    async def ask() -> tuple[list[str], str]:
        async with streamable_http_client(f"{url}gradio_api/mcp/") as (read, write, _), \
                ClientSession(read, write) as session:
            await session.initialize()
            tools = [t.name for t in (await session.list_tools()).tools]
            (tool,) = tools or [None]
            result = await session.call_tool(tool, {"image": photo, "choice": app.CNN, "tta": False})
            assert not result.isError, (tools, result.content)
            return tools, " ".join(getattr(c, "text", "") for c in result.content)

    try:
        tools, text = anyio.run(ask)
    finally:
        demo.close()
    assert len(tools) == 1, tools  # only the public /predict endpoint is a tool
    assert any(c in text for c in fc.CLASSES), text
