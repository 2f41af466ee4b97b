"""Online serving on Ray Serve (flowers_apps.serve, flowers-serve): the HTTP contract, dynamic batching under
concurrent load with the in-process answers, and faults survived with the documented client retry (a replica
SIGKILLed, a node of a two-node cluster removed). One local Ray for the whole session (conftest `ray_cluster`);
the application is redeployed in place (`serve.run`) with the options each test needs."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from PIL import Image

import flowers_classifier as fc

serve = pytest.importorskip("ray.serve", reason="needs Ray Serve: pip install -e '.[serve]'")
import ray  # noqa: E402

from flowers_apps import serve as app  # noqa: E402
from flowers_apps.client import ServeClient, ServeRequestError  # noqa: E402

CLIENTS, REQUESTS = 16, 300  # the fault tests' load (issue 39)
TEMPERATURE = 2.0  # the served file is calibrated, so ?calibrated=false must differ from the default


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url(ray_cluster) -> str:
    """Serve's HTTP proxy on a free port, on the head node only (a worker node on this machine would need the same
    port); Serve shut down after the module."""
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def model_file(tiny_cnn_pth, tmp_path_factory) -> Path:
    """The tiny CNN with a calibration temperature, as export.py writes a calibrated model."""
    payload = torch.load(tiny_cnn_pth, weights_only=True)
    path = tmp_path_factory.mktemp("served") / "cnn_flowers.pth"
    torch.save({**payload, "temperature": TEMPERATURE}, path)
    return path


@pytest.fixture(scope="module")
def expected(model_file, real_flowers) -> dict[Path, dict[str, float]]:
    """Every committed photo -> in-process predict_proba (calibrated), the answer the server must give."""
    model = fc.load_model(model_file, device="cpu")
    return {p: fc.predict_proba(model, p) for p in sorted(real_flowers.glob("*/*.jpg"))}


def deploy(model_file: Path, **options) -> None:
    """The application redeployed with `options` (build_app's), its replicas running when this returns."""
    serve.run(app.build_app(model_file, **options), name=app.APP_NAME, route_prefix="/")


def replica_pids() -> list[int]:
    """The process of each replica of this session's application (asked through Ray, never by process name:
    another Ray on the machine may run replicas of the same name)."""
    return sorted(replica_info(lambda: os.getpid()).values())


def running_replicas() -> int:
    status = serve.status().applications.get(app.APP_NAME)
    if status is None or app.DEPLOYMENT_NAME not in status.deployments:
        return 0
    return status.deployments[app.DEPLOYMENT_NAME].replica_states.get("RUNNING", 0)


def assert_answer(answer: dict, probs: dict[str, float]) -> None:
    assert answer["label"] == max(probs, key=probs.get) and answer["model"] == "cnn_flowers.pth"
    assert answer["probabilities"] == pytest.approx(probs, abs=1e-5)


def load(url: str, photos: list[Path], on_answer=None, clients: int = CLIENTS) -> tuple[list, int]:
    """Send every photo once from `clients` threads (one keep-alive client each, the retry rule on); returns
    (path, answer or the exception, batch size, replica id) per photo, in answer order, and how many requests were
    sent again."""
    queue, lock, results = iter(photos), threading.Lock(), []
    pool = [ServeClient(url) for _ in range(clients)]

    def work(client: ServeClient) -> None:
        while True:
            with lock:
                photo = next(queue, None)
            if photo is None:
                return
            try:
                answer = client.predict(photo.read_bytes())
            except (OSError, ServeRequestError) as e:
                answer = e
            with lock:
                results.append((photo, answer, int(client.last_headers.get("x-batch-size", 0)),
                                client.last_headers.get("x-replica")))
                if on_answer:
                    on_answer(len(results))

    with ThreadPoolExecutor(clients) as ex:
        list(ex.map(work, pool))
    return results, sum(c.retried for c in pool)


def assert_all_correct(results: list, expected: dict, n: int) -> None:
    failed = [(p.name, a) for p, a, *_ in results if not isinstance(a, dict)]
    assert not failed, f"{len(failed)} of {n} requests failed despite the retry: {failed[:3]}"
    assert len(results) == n
    for photo, answer, *_ in results:
        assert_answer(answer, expected[photo])


# --------------------------------------------------------------------------- the HTTP contract

def bomb_png() -> bytes:
    """A small PNG of 12000 x 12000 1-bit pixels: over PIL's decompression-bomb limit (89 M pixels)."""
    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, "PNG")
    return buf.getvalue()


def multipart(field: str, data: bytes) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="photo.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_http_contract_answers_and_refusals(url, model_file, expected, real_flowers):
    deploy(model_file, replicas=1, max_batch=4)
    client = ServeClient(url, retries=0)  # a refusal must come at the first try
    assert client.healthz() == {"status": "ok", "model": "cnn_flowers.pth"}
    rose = sorted((real_flowers / "rose").glob("*.jpg"))[0]
    assert_answer(client.predict(rose.read_bytes()), expected[rose])
    timing = client.last_headers["server-timing"]
    assert {part.split(";")[0].strip() for part in timing.split(",")} == {"wait", "model", "replica"}, timing
    # ?calibrated=false: the raw softmax, in-process with load_model(calibrated=False)
    raw = fc.predict_proba(fc.load_model(model_file, device="cpu", calibrated=False), rose)
    assert raw != pytest.approx(expected[rose], abs=1e-3)
    assert_answer(client.predict(rose.read_bytes(), calibrated=False), raw)
    top2 = client.predict(rose.read_bytes(), top_k=2)["probabilities"]
    best = sorted(expected[rose].items(), key=lambda cp: cp[1], reverse=True)[:2]
    assert list(top2) == [c for c, _ in best] and list(top2.values()) == pytest.approx([p for _, p in best], abs=1e-5)
    # a multipart upload (an HTML form, curl -F file=@photo.jpg) answers the same
    body, headers = multipart("file", rose.read_bytes())
    assert_answer(client.request("POST", "/predict", body, headers), expected[rose])

    data = rose.read_bytes()
    no_file, form_headers = multipart("photo", data)
    refusals = {  # body, query, headers -> status, what the reason names
        "empty": (b"", "", {}, 400, "empty request body"),
        "not an image": (b"roses are red", "", {}, 400, "not a recognised image format"),
        "truncated": (data[:len(data) // 2], "", {}, 400, "cannot decode image"),
        "decompression bomb": (bomb_png(), "", {}, 400, "too large to decode safely"),
        "too large": (b"\0" * (app.MAX_BODY_BYTES + 1), "", {}, 413, "limit is 20 MiB"),
        "bad top_k": (data, "?top_k=6", {}, 400, "top_k"),
        "bad calibrated": (data, "?calibrated=maybe", {}, 400, "calibrated"),
        "no file field": (no_file, "", form_headers, 400, "`file` field"),
    }
    for case, (body, query, headers, status, reason) in refusals.items():
        with pytest.raises(ServeRequestError, match=reason) as err:
            client.request("POST", "/predict" + query, body, headers)
        assert err.value.status == status, case
        assert_answer(client.predict(data), expected[rose])  # and the server goes on serving
    for method, path, status in (("GET", "/predict", 405), ("GET", "/nowhere", 404), ("POST", "/healthz", 405)):
        with pytest.raises(ServeRequestError) as err:
            client.request(method, path, b"" if method == "POST" else None)
        assert err.value.status == status, (method, path)
    assert client.healthz()["status"] == "ok"


def test_concurrent_requests_are_batched_and_answered_as_in_process(url, model_file, expected):
    # A batch waits up to 20 ms to fill, so that 16 concurrent clients reliably share forward passes on a busy CI
    # machine; the answers must not depend on which requests shared one (batch composition, padding, order).
    deploy(model_file, replicas=1, max_batch=8, batch_wait_ms=20)
    photos = list(expected) * 2
    results, _ = load(url, photos)
    assert_all_correct(results, expected, len(photos))
    sizes = [size for _, _, size, _ in results]
    assert max(sizes) > 1, f"no request shared a batch under {CLIENTS} concurrent clients: sizes {set(sizes)}"
    assert max(sizes) <= 8
    print(f"batch sizes under {CLIENTS} clients: mean {sum(sizes) / len(sizes):.1f}, max {max(sizes)}")


# --------------------------------------------------------------------------- faults

def test_a_replica_killed_under_load_loses_no_request(url, model_file, expected):
    """SIGKILL one of two replicas while 16 clients send 300 requests: with the retry rule every request gets its
    correct answer, and Serve starts a replacement; the time until it runs is printed."""
    deploy(model_file, replicas=2, max_batch=8, threads=1)
    before = replica_pids()
    assert len(before) == 2, f"expected two replica processes, found {before}"
    killed: dict[str, float] = {}

    def kill_once(answered: int) -> None:
        if answered == 40 and not killed:  # mid-load: 260 requests still to go
            os.kill(before[0], signal.SIGKILL)
            killed["at"] = time.monotonic()

    photos = [p for _, p in zip(range(REQUESTS), iter_cycle(list(expected)), strict=False)]
    results, retried = load(url, photos, on_answer=kill_once)
    assert killed, "the replica was never killed"
    assert_all_correct(results, expected, REQUESTS)
    recovered = wait_until(lambda: running_replicas() == 2 and before[0] not in replica_pids()
                           and len(replica_pids()) == 2, timeout=120)
    assert recovered, f"Serve did not replace the killed replica: {replica_pids()}, {running_replicas()} running"
    print(f"replica {before[0]} SIGKILLed after 40 of {REQUESTS} answers: {retried} request(s) retried, all "
          f"{REQUESTS} correct; replacement running {recovered - killed['at']:.1f} s after the kill")


def test_removing_a_node_of_a_two_node_cluster_loses_no_request(ray_cluster, url, model_file, expected):
    """Head + one worker node, a replica on each; the worker node removed mid-load (its processes killed): with the
    retry rule no request is lost."""
    worker = ray_cluster.add_node(num_cpus=1, object_store_memory=128 * 2**20)
    ray_cluster.wait_for_nodes()
    try:
        deploy(model_file, replicas=2, threads=1, max_replicas_per_node=1)
        nodes = replica_nodes()
        assert sorted(nodes.values()) == sorted([ray_cluster.head_node.node_id, worker.node_id]), nodes
        on_worker = next(r for r, node in nodes.items() if node == worker.node_id)
        removed: dict[str, float] = {}

        def remove_once(answered: int) -> None:
            if answered == 40 and not removed:  # under the load's lock: 260 requests are sent after it is gone
                ray_cluster.remove_node(worker, allow_graceful=False)  # its raylet and workers SIGKILLed
                removed["at"] = time.monotonic()

        photos = [p for _, p in zip(range(REQUESTS), iter_cycle(list(expected)), strict=False)]
        results, retried = load(url, photos, on_answer=remove_once)
        assert removed, "the worker node was never removed"
        assert_all_correct(results, expected, REQUESTS)
        answered_by = [replica for *_, replica in results]
        assert on_worker in answered_by[:40], "the worker node's replica answered nothing before it was removed"
        # the requests it held when the node went may still finish; the last 100 come from the head's replica
        assert on_worker not in answered_by[-100:], "answers kept coming from the removed node"
        print(f"worker node removed after 40 of {REQUESTS} answers: {retried} request(s) retried, all correct")
    finally:
        if worker in ray_cluster.worker_nodes:
            ray_cluster.remove_node(worker)
        serve.delete(app.APP_NAME)


def replica_info(fn) -> dict[str, object]:
    """Replica id (the X-Replica header) -> fn() run inside that replica's actor, for each live replica."""
    prefix = f"SERVE_REPLICA::{app.APP_NAME}#{app.DEPLOYMENT_NAME}#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    found = {}
    for name in names:
        try:
            found[name.removeprefix(prefix)] = ray.get(
                ray.get_actor(name, namespace="serve").__ray_call__.remote(lambda self: fn()), timeout=30)
        except (ValueError, ray.exceptions.RayError):  # gone between the listing and the call
            pass
    return found


def replica_nodes() -> dict[str, str]:
    """Replica id -> the Ray node its actor is on."""
    return replica_info(lambda: ray.get_runtime_context().get_node_id())


def iter_cycle(items: list):
    while True:
        yield from items


def wait_until(condition, timeout: float) -> float | None:
    """time.monotonic() when `condition()` first held, polling; None after `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return time.monotonic()
        time.sleep(0.2)
    return None


# --------------------------------------------------------------------------- flowers-serve

def test_flowers_serve_serves_until_sigterm_and_drains(ray_cluster, url, model_file, expected):
    """The CLI joins the running Ray (--address), serves, and on SIGTERM answers the requests in flight before it
    deletes the application and exits 0."""
    port = url.rsplit(":", 1)[1]  # the port the running Serve's proxy already has
    cmd = [sys.executable, "-c", "import sys; from flowers_apps.cli import serve; sys.exit(serve(sys.argv[1:]))",
           str(model_file), "--address", ray_cluster.address, "--port", port, "--threads", "1", "--max-batch", "16",
           "--batch-wait-ms", "1000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client = ServeClient(url)
        ready = wait_until(lambda: _healthy(client), timeout=120)
        assert ready, f"flowers-serve never answered /healthz:\n{_output(proc)}"
        photos = list(expected)[:8]
        with ThreadPoolExecutor(len(photos)) as ex:  # in the replica's 1 s batch window when SIGTERM comes
            answers = [ex.submit(ServeClient(url, retries=0).predict, p.read_bytes()) for p in photos]
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            results = [a.result(timeout=60) for a in answers]
        for photo, answer in zip(photos, results, strict=True):
            assert_answer(answer, expected[photo])
        out = _output(proc, wait=60)
        assert proc.returncode == 0 and "stopping: draining" in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
    assert app.APP_NAME not in serve.status().applications, "the application outlived flowers-serve"


def _healthy(client: ServeClient) -> bool:
    try:
        return client.healthz()["status"] == "ok"
    except (OSError, ServeRequestError):
        return False


def _output(proc: subprocess.Popen, wait: float = 0) -> str:
    """What the process printed, once it has exited (killed unless it exits within `wait` seconds)."""
    try:
        out, err = proc.communicate(timeout=wait or None) if wait else ("", "")
    except subprocess.TimeoutExpired:
        out, err = "", ""
    if proc.poll() is None:
        proc.kill()
        more_out, more_err = proc.communicate(timeout=30)
        out, err = out + more_out, err + more_err
    return f"--- stdout\n{out[-3000:]}\n--- stderr\n{err[-3000:]}"


def test_flowers_serve_refuses_a_bad_model_file_before_starting_ray(tmp_path):
    from flowers_apps import cli
    missing = tmp_path / "nope.pth"
    assert cli.serve([str(missing), "--port", "1"]) == 2


def test_the_serve_config_example_is_valid_and_builds_the_app(model_file):
    """docs/serve-config.yaml passes Serve's own schema (what `serve run` / `serve deploy` check), and its
    import_path + args build the application (model swapped for the test's file)."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((ROOT / "docs" / "serve-config.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    (application,) = config["applications"]
    module, _, name = application["import_path"].partition(":")
    assert (module, name) == ("flowers_apps.serve", "app_builder") and application["name"] == app.APP_NAME
    assert [d["name"] for d in application["deployments"]] == [app.DEPLOYMENT_NAME]
    built = app.app_builder({**application["args"], "model": str(model_file)})
    assert isinstance(built, serve.Application)


def test_serve_config_builder_rejects_unknown_args(model_file):
    with pytest.raises(app.ServeConfigError, match="unknown replica"):
        app.app_builder({"model": str(model_file), "replica": 2})
    with pytest.raises(app.ServeConfigError, match="no model"):
        app.app_builder({"replicas": 2})
