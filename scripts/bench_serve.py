"""Load test of `umarvel serve`: N concurrent clients send a fixed number of /search requests over
loopback; throughput, p50/p99 latency and errors, with request batching on and off side by side.

    python scripts/bench_serve.py                      # tiny model, synthetic global pool, 16 clients, 400 requests
    python scripts/bench_serve.py --index indexes/my-corpus --clients 32 --requests 2000

Only a service this script starts on 127.0.0.1 is loaded: it never sends requests anywhere else.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from PIL import Image, ImageDraw

from umarvel.serving import Retriever
from umarvel.serving.http import create_app
from umarvel.serving.limits import Limits
from umarvel.serving.server import running

TEXTS = ["a red circle", "two blue squares on a white ground", "a green triangle beside a yellow star",
         "what colour is the shape on the left?", "a cat", "a photo of a small boat on a lake at dawn"]


def payloads() -> list[bytes]:
    """A mix of text, image and image + text queries, as a client would send them."""
    images = []
    for colour in ("red", "blue", "green"):
        picture = Image.new("RGB", (96, 96), "white")
        ImageDraw.Draw(picture).ellipse((24, 24, 72, 72), fill=colour)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        images.append(base64.b64encode(buffer.getvalue()).decode())
    bodies = [{"text": text, "k": 10} for text in TEXTS]
    bodies += [{"image": image, "k": 10} for image in images]
    bodies += [{"image": image, "text": "same but larger", "instruction": "Retrieve the modified image.", "k": 10}
               for image in images]
    return [json.dumps(body).encode() for body in bodies]


def load(url: str, clients: int, requests: int) -> dict:
    host, port = url.removeprefix("http://").split(":")
    bodies, latencies, errors, lock = payloads(), [], [0], threading.Lock()
    per_client = [requests // clients + (i < requests % clients) for i in range(clients)]

    def client(index: int) -> None:
        connection = http.client.HTTPConnection(host, int(port), timeout=300)
        for n in range(per_client[index]):
            body = bodies[(index + n) % len(bodies)]
            start = time.perf_counter()
            try:
                connection.request("POST", "/search", body, {"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                ok = response.status == 200
            except OSError:
                ok = False
                connection = http.client.HTTPConnection(host, int(port), timeout=300)
            with lock:
                latencies.append(time.perf_counter() - start)
                errors[0] += not ok
        connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    ordered = sorted(latencies)
    return {"requests/s": len(latencies) / elapsed, "p50 ms": 1000 * statistics.median(ordered),
            "p99 ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], "errors": errors[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", help="an index written by `umarvel index build` (default: one built here over the "
                        "synthetic global pool with a fresh tiny Qwen2-VL)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--wait-ms", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run(args, args.index or synthetic_index(Path(tmp)))


def synthetic_index(tmp: Path) -> Path:
    """A Flat index of the synthetic benchmark's global pool, encoded by a fresh tiny model."""
    from umarvel.cli import main as umarvel
    from umarvel.data.synthetic import write_synthetic
    from umarvel.tiny import build_tiny_model

    model = build_tiny_model(tmp / "tiny")
    pool = write_synthetic(tmp / "synthetic", seed=0, size="small") / "cand_pool/global/mbeir_union_test_cand_pool.jsonl"
    if umarvel(["index", "build", "--model", str(model), "--corpus", str(pool), "--out", str(tmp / "index"),
                "--cache-dir", str(tmp / "cache")]) != 0:
        raise SystemExit("building the synthetic index failed")
    return tmp / "index"


def run(args: argparse.Namespace, index: Path) -> None:
    retriever = Retriever.load(index)
    print(f"load average before: {os.getloadavg()[0]:.2f}; {args.clients} clients, {args.requests} /search requests "
          f"(text, image, image + text), index of {retriever.describe()['index_size']} items")
    rows = {}
    for name, max_batch in (("batched", args.max_batch), ("one at a time", 1)):
        app = create_app(retriever, Limits(max_batch=max_batch, batch_wait_ms=args.wait_ms))
        with running(app) as url:
            load(url, args.clients, min(args.requests, 2 * args.clients))  # warm-up
            rows[name] = load(url, args.clients, args.requests)
    print("| service | requests/s | p50 ms | p99 ms | errors |\n|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['requests/s']:.1f} | {row['p50 ms']:.0f} | {row['p99 ms']:.0f} | {row['errors']} |")
    ratio = rows["batched"]["requests/s"] / rows["one at a time"]["requests/s"]
    print(f"batched / one at a time throughput: {ratio:.2f}; load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
