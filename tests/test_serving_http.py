"""`umarvel serve`: the HTTP service over a Retriever, with real requests on a free 127.0.0.1 port.

Results must equal `Retriever.search` / `Retriever.encode`; every bad input must be a 4xx with a
message (never a 500); concurrent requests must be batched without changing any answer.
"""
from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (fastapi, uvicorn) is not installed")

from conftest import draw_image  # noqa: E402
from test_serving_index import write_corpus  # noqa: E402
from umarvel.cli import main  # noqa: E402
from umarvel.serving import Retriever  # noqa: E402
from umarvel.serving.batcher import MicroBatcher  # noqa: E402
from umarvel.serving.http import create_app  # noqa: E402
from umarvel.serving.limits import Limits  # noqa: E402
from umarvel.serving.server import free_port, running  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def post(url: str, route: str, body, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url + route, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def post_declaring(url: str, route: str, size: int) -> tuple[int, dict]:
    """POST headers declaring a `size`-byte body with `Expect: 100-continue`, as curl does for a large
    body: the server answers before any of it is sent (sending it regardless races the server's
    close of the connection, a broken pipe on the client)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.putrequest("POST", route)
        for name, value in (("Content-Type", "application/json"), ("Content-Length", str(size)),
                            ("Expect", "100-continue")):
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def get(url: str, route: str) -> dict:
    with urllib.request.urlopen(url + route, timeout=60) as response:
        assert response.status == 200
        return json.loads(response.read())


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("serve-corpus")
    write_corpus(root)
    out = root / "index"
    assert main(["index", "build", "--model", str(tiny_model_dir), "--corpus", str(root), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def retriever(index_dir):
    return Retriever.load(index_dir, use_gpu=False)


@pytest.fixture(scope="module")
def service(retriever):
    """The service on a free loopback port, with a batching window wide enough to catch concurrent requests."""
    with running(create_app(retriever, Limits(max_k=50, max_image_pixels=256 * 256, max_request_bytes=2**20,
                                              max_text_chars=500, batch_wait_ms=50))) as url:
        yield url


QUERIES = [
    {"text": "a red circle"},
    {"text": "a yellow taxi at night", "instruction": "Retrieve a caption that matches the question."},
    {"image": "red"},
    {"image": "blue", "text": "a square", "instruction": "Find the same picture."},
]


def as_request(query: dict) -> dict:
    """The query as a client sends it: its image as base64 PNG bytes."""
    return {**query, "image": png_base64(draw_image(query["image"]))} if "image" in query else dict(query)


def as_python(query: dict) -> dict:
    return {**query, "image": draw_image(query["image"])} if "image" in query else dict(query)


def test_search_equals_the_retriever(service, retriever):
    for query in QUERIES:
        status, answer = post(service, "/search", {**as_request(query), "k": 5})
        assert status == 200, answer
        expected = retriever.search(as_python(query), k=5)
        assert [hit["id"] for hit in answer["hits"]] == [hit.id for hit in expected]
        np.testing.assert_allclose([hit["score"] for hit in answer["hits"]], [hit.score for hit in expected], atol=1e-5)
        assert answer["hits"][0]["metadata"] == expected[0].metadata


def test_encode_equals_the_retriever(service, retriever):
    for query in QUERIES:
        status, answer = post(service, "/encode", as_request(query))
        assert status == 200, answer
        expected = retriever.encode(as_python(query))
        assert answer["dimension"] == len(expected) == retriever.manifest.dim
        np.testing.assert_allclose(answer["embedding"], expected, atol=1e-5)


def test_health_names_the_model_and_index(service, retriever, index_dir):
    health = get(service, "/health")
    manifest = retriever.manifest
    assert health["status"] == "ok"
    assert (health["model"], health["fingerprint"], health["index_size"]) == (manifest.model, manifest.fingerprint, 12)
    assert health["batching"]["max_batch"] == Limits().max_batch


def test_concurrent_requests_are_batched_and_answered_as_alone(retriever):
    """Eight clients at once: the model sees batches of several requests, each answer is its own."""
    sizes = []
    original = retriever.search

    def recording(queries, k=10, **kwargs):
        sizes.append(len(queries))
        return original(queries, k, **kwargs)

    expected = {i: [hit.id for hit in original(as_python(QUERIES[i % 4]), k=3 + i)] for i in range(8)}
    answers = {}
    retriever.search = recording
    try:
        with running(create_app(retriever, Limits(batch_wait_ms=500))) as url:
            def client(i):
                answers[i] = post(url, "/search", {**as_request(QUERIES[i % 4]), "k": 3 + i})

            threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        del retriever.search
    assert sum(sizes) == 8 and max(sizes) > 1, sizes
    for i, (status, answer) in answers.items():
        assert status == 200 and [hit["id"] for hit in answer["hits"]] == expected[i]


TOO_WIDE = draw_image("red", size=20).resize((4000, 10))


@pytest.mark.parametrize("route,body,status,words", [
    ("/search", {"text": "x", "k": 0}, 422, "k must be between 1 and 50"),
    ("/search", {"text": "x", "k": 51}, 422, "k must be between 1 and 50"),
    ("/search", {"text": "x", "k": "ten"}, 422, "k"),
    ("/search", {"k": 3}, 422, "give a non-empty text, an image"),
    ("/search", {"text": ""}, 422, "give a non-empty text"),
    ("/search", {"text": "x", "colour": "red"}, 422, "colour"),
    ("/search", {"text": 5}, 422, "text"),
    ("/search", ["a red circle"], 422, "body"),
    ("/search", {"text": "x" * 501}, 413, "501 characters, over the limit of 500"),
    ("/search", {"image": "https://example.com/cat.png"}, 422, "URLs and paths are not fetched"),
    ("/search", {"image": "/etc/passwd"}, 422, "URLs and paths are not fetched"),
    ("/search", {"image": "not base64!"}, 400, "not valid base64"),
    ("/search", {"image": base64.b64encode(b"plain text, not a picture").decode()}, 400, "not an image file"),
    ("/search", {"image": png_base64(draw_image("red", size=300))}, 413, "300x300 pixels is over the limit"),
    ("/search", {"image": png_base64(TOO_WIDE)}, 400, "aspect"),
    ("/encode", {"text": "x", "k": 3}, 422, "k"),
    ("/encode", {"instruction": "only an instruction"}, 422, "give a non-empty text"),
])
def test_bad_input_is_a_4xx_with_a_message(service, route, body, status, words):
    code, answer = post(service, route, body)
    assert code == status, answer
    assert words.lower() in answer["error"].lower() and "\n" not in answer["error"]


def test_malformed_and_oversized_bodies(service):
    code, answer = post(service, "/search", None, raw=b"{not json")
    assert code == 422 and "json" in answer["error"].lower()
    code, answer = post_declaring(service, "/search", 2**20 + 12)
    assert code == 413 and "over the limit" in answer["error"]
    code, answer = post(service, "/search", None, raw=b"\xff\xfe")
    assert code == 422
    status, answer = post(service, "/search", {"text": "a red circle", "k": 2})
    assert status == 200 and len(answer["hits"]) == 2  # the service still answers


def test_batch_with_a_bad_request_fails_only_that_request():
    def run(payloads):
        if "bad" in payloads:
            raise ValueError("bad payload")
        return [payload.upper() for payload in payloads]

    batcher = MicroBatcher(run, max_batch=8, wait_s=1.0)
    futures = [batcher.submit(payload) for payload in ("a", "bad", "c")]
    assert [futures[0].result(30), futures[2].result(30)] == ["A", "C"]
    with pytest.raises(ValueError, match="bad payload"):
        futures[1].result(30)
    batcher.close()


def test_batcher_groups_what_arrives_within_the_window_up_to_max_batch():
    seen = []
    batcher = MicroBatcher(lambda payloads: seen.append(list(payloads)) or payloads, max_batch=4, wait_s=1.0)
    futures = [batcher.submit(i) for i in range(6)]
    assert [future.result(30) for future in futures] == list(range(6))
    batcher.close()
    assert seen == [[0, 1, 2, 3], [4, 5]]


def test_batch_dependent_profile_encodes_each_request_alone(retriever):
    """Under a rule that makes a vector depend on its batch (umarvel-release's unpadded_causal),
    the service never batches requests together."""
    release_like = SimpleNamespace(embedder=SimpleNamespace(rules=SimpleNamespace(unpadded_causal=True)),
                                   describe=retriever.describe, search=retriever.search, encode=retriever.encode)
    with running(create_app(release_like, Limits(max_batch=16))) as url:
        assert get(url, "/health")["batching"]["max_batch"] == 1


def readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    return text[text.index("## Search your own corpus"):].split("\n## ", 1)[0]


def started(command: subprocess.Popen, url: str) -> dict:
    """/health of a service starting in `command`, once it answers."""
    deadline = time.monotonic() + 240
    while True:
        try:
            return get(url, "/health")
        except (urllib.error.URLError, ConnectionError):
            assert command.poll() is None, command.communicate()[0]
            assert time.monotonic() < deadline, "umarvel serve did not start in 240 s"
            time.sleep(0.5)


def test_readme_search_your_own_corpus(tiny_workdir, tiny_model_dir, capsys):
    """The README section's corpus, four commands, curl request and Python example, as written."""
    section = readme_section()
    (corpus,) = re.findall(r"```jsonl\n(.*?)```", section, flags=re.S)
    commands, curl = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    (example,) = re.findall(r"```py\n(.*?)```", section, flags=re.S)
    (tiny_workdir / "runs/tiny").mkdir(parents=True)
    (tiny_workdir / "runs/tiny/distill").symlink_to(tiny_model_dir)
    (tiny_workdir / "my-corpus.jsonl").write_text(corpus)
    (tiny_workdir / "images").mkdir()
    draw_image("red").save(tiny_workdir / "images/photo-7.png")
    build, search, serve, export = [shlex.split(line) for line in commands.strip().splitlines()]

    assert main(build[1:]) == 0
    retriever = Retriever.load("indexes/my-corpus", use_gpu=False)
    assert len(retriever) == 3 and retriever.manifest.fingerprint
    capsys.readouterr()
    assert main(search[1:]) == 0
    printed = [line.split()[2] for line in capsys.readouterr().out.strip().splitlines()]
    assert printed == [hit.id for hit in retriever.search("a red circle", k=5)]

    port = free_port()
    serve[serve.index("--port") + 1] = str(port)
    command = subprocess.Popen([sys.executable, "-m", "umarvel", *serve[1:], "--use-gpu", "no"], cwd=tiny_workdir,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    try:
        assert started(command, url)["index_size"] == 3
        body = json.loads(shlex.split(curl)[shlex.split(curl).index("-d") + 1])
        status, answer = post(url, "/search", body)
        assert status == 200
        assert [hit["id"] for hit in answer["hits"]] == printed
    finally:
        command.send_signal(signal.SIGINT)
        output = command.communicate(timeout=60)[0]
    assert command.returncode in (0, 130), output
    assert f"on http://127.0.0.1:{port}" in output and "Traceback" not in output

    scope: dict = {}
    exec(example, scope)
    assert [hit.id for hit in scope["hits"]] == printed
    assert [len(hits) for hits in scope["per_query"]] == [2, 2]
    assert scope["per_query"][0][0].id == "photo-7" and scope["per_query"][0][0].metadata == {
        "image": "images/photo-7.png", "album": "holiday"}

    assert main(export[1:]) == 0
    assert (tiny_workdir / "exports/my-model/modules.json").is_file()


def test_serve_without_the_extra_says_what_to_install(index_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert main(["serve", "--index", str(index_dir)]) == 2
    err = capsys.readouterr().err
    assert 'pip install -e ".[serve]"' in err and "uvicorn" in err
