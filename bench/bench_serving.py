"""Serving benchmark: single-image CPU latency, REST throughput and the server's memory under big uploads.

The model is System U's CPU fusion, DenseNet-121 ∥ ViT-Tiny (pretrained branches from the weights
folder when they are there, else random: timing does not depend on the weights), or model files
given with ``--model``. On the CPU it measures:

- ``latency`` (per model): ``load_image`` + ``preprocess_image``, then one pre-processed image
  through PyTorch and ONNX Runtime at batch 1, and per image at batch 8; p50 / p95 over ``--runs``;
- ``rest`` (first model): ``breastvision serve`` started in subprocesses, one per variant —
  ``baseline`` is the old behaviour (one forward pass at a time on every core, PyTorch, or the
  code of ``--baseline-rev`` run as it is), ``new_defaults`` is ``serve MODEL`` as it is now, the
  others micro-batch on PyTorch or with one ONNX Runtime worker —
  and ``--requests`` POST /api/predict at ``--concurrency`` against each, interleaved in
  ``--rounds`` rounds so that a change in machine load hits every variant alike; requests/s, p50, p99
  and the server's CPU time per request (which a busy machine disturbs far less than wall time);
- ``memory``: ``--big-uploads`` concurrent uploads of a flat ``--big-side``² RGB PNG (small file,
  huge image) to a fresh server per variant, with the server's peak resident memory (its
  processes' VmRSS from /proc, sampled every 10 ms) and what it still holds afterwards.

``ratios`` compares the default new variant with the baseline. Prints one JSON document (also
written to ``--out``). Example::

    python bench/bench_serving.py --baseline-rev main --out serving.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image

from breastvision.data.io import load_image
from breastvision.models.bundle import ModelBundle, Preprocessing
from breastvision.models.registry import create_model
from breastvision.paths import dataset_dir
from breastvision.serving.export import export_onnx
from breastvision.serving.predict import is_mask, load_predictor
from breastvision.training.config import weights_root

REPO = Path(__file__).resolve().parents[1]
#: The fusion of configs/busi_fusion_cpu.yaml, with its pretrained branch files.
FUSION = {"cnn": "densenet121", "vit": "vit_tiny"}
FUSION_WEIGHTS = {"cnn": "densenet121_imagenet_keras.safetensors",
                  "vit": "vit_tiny_patch16_224_tinyimagenet.safetensors"}
BUSI_CLASSES = ["benign", "malignant", "normal"]
#: ``serve`` flags of each variant; ``baseline`` is replaced by the old code's defaults with --baseline-rev.
VARIANTS = {
    "baseline": ["--max-batch", "1", "--backend", "pytorch", "--inference-workers", "1"],
    "new_defaults": [],  # micro-batches, onnxruntime, one single-threaded worker per core
    "batched_pytorch": ["--backend", "pytorch"],
    "batched_onnxruntime_one_worker": ["--inference-workers", "1"],
}
DEFAULT_VARIANTS = ("baseline", "new_defaults", "batched_pytorch")
NEW_DEFAULT = "new_defaults"


def _percentiles(samples_s: list[float], *qs: int) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1000
    return {f"p{q}_ms": round(float(np.percentile(ms, q)), 2) for q in qs} | {"n": len(samples_s)}


def _time(fn: Callable[[], Any], runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def _sample_image(data_root: str | None, work: Path) -> Path:
    """The first BUSI image, or a BUSI-sized (560×460) noise image when the data is not here."""
    try:
        images = sorted(dataset_dir("busi", data_root).rglob("*.png"))
        found = next((p for p in images if not is_mask(p)), None)
    except Exception:  # noqa: BLE001 - any absence means "use a generated image"
        found = None
    if found is not None:
        return found
    path = work / "generated.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (460, 560, 3), np.uint8)).save(path)
    return path


def _fusion_model_file(out_dir: Path) -> Path:
    root = weights_root()
    pretrained = {part: str(root / name) for part, name in FUSION_WEIGHTS.items() if (root / name).is_file()}
    torch.manual_seed(0)
    model = create_model("fusion", num_classes=len(BUSI_CLASSES), pretrained=pretrained or None, **FUSION)
    # Architecture switches left off are dropped, so a --baseline-rev that predates them can
    # serve the same file.
    kwargs = {k: v for k, v in model.model_kwargs.items() if v is not False}
    bundle = ModelBundle(
        "fusion", BUSI_CLASSES, model.state_dict(), model_kwargs=kwargs,
        preprocessing=Preprocessing(input_size=224, resize=256),
        lineage=[{"stage": "benchmark", "weights": "pretrained branches, random head" if pretrained
                  else "random init"}],
    )
    return bundle.save(out_dir / "fusion_densenet121_vit_tiny.safetensors")


def bench_latency(model_file: Path, image: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    torch_predictor = load_predictor(model_file)
    params = sum(p.numel() for p in torch_predictor.model.parameters())
    picture = load_image(image)
    one = torch_predictor.preprocess(picture)[None]
    eight = one.expand(8, -1, -1, -1).contiguous()
    result: dict[str, Any] = {
        "model_file": model_file.name, "architecture": torch_predictor.info.architecture,
        "model_kwargs": torch_predictor.info.model_kwargs, "parameters_m": round(params / 1e6, 2),
        "input_size": torch_predictor.preprocessing.input_size,
        "image": {"path": str(image), "size": list(picture.size)},
    }
    print(f"[bench] {result['architecture']}: pre-processing", file=sys.stderr)
    result["preprocess"] = _percentiles(
        _time(lambda: torch_predictor.preprocess(load_image(image)), args.runs, args.warmup), 50, 95
    )
    print(f"[bench] {result['architecture']}: ONNX export", file=sys.stderr)
    exported = export_onnx(model_file, work / f"{model_file.stem}.onnx")
    onnx_predictor = load_predictor(exported.path)
    result["onnx_export"] = {"opset": exported.opset, "max_abs_diff_vs_pytorch": exported.max_abs_diff}
    for name, predictor in (("pytorch", torch_predictor), ("onnxruntime", onnx_predictor)):
        print(f"[bench] {result['architecture']}: {name}", file=sys.stderr)
        samples = _time(lambda p=predictor: p.probabilities(one), args.runs, args.warmup)
        result[name] = _percentiles(samples, 50, 95)
        per_image = [t / 8 for t in _time(lambda p=predictor: p.probabilities(eight), args.runs // 4 + 1, 1)]
        result[name]["batch8_per_image"] = _percentiles(per_image, 50)
    return result


def _baseline_src(rev: str, work: Path) -> Path:
    """The ``src`` tree of git revision ``rev``, extracted under ``work``."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "src"], check=True, capture_output=True)
    target = work / f"src-{rev.replace('/', '_')}"
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(target, filter="data")
    return target / "src"


class Server:
    """``breastvision serve`` in a subprocess on a free port, ready when /healthz answers."""

    def __init__(
        self, model_file: Path, flags: list[str], src: Path, log: Path, timeout: float = 300
    ) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(src)}
        command = [sys.executable, "-m", "breastvision", "serve", str(model_file),
                   "--port", str(self.port), *flags]
        self.log = log
        self.process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server {flags} did not start:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)

    def _pids(self) -> list[int]:
        """The server and every process below it."""
        found, pending = [], [self.process.pid]
        while pending:
            pid = pending.pop()
            found.append(pid)
            try:
                for task in Path(f"/proc/{pid}/task").iterdir():
                    pending += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
        return found

    def rss_bytes(self) -> int:
        total = 0
        for pid in self._pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text().splitlines()
                total += int(next(line.split()[1] for line in status if line.startswith("VmRSS"))) * 1024
            except (OSError, StopIteration):
                continue
        return total

    def cpu_seconds(self) -> float:
        """User + system CPU time the server's processes have used: unlike wall time, it barely
        depends on what else the machine runs, so it compares variants on a busy machine too."""
        ticks = 0
        for pid in self._pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
            except (OSError, IndexError):
                continue
        return ticks / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _post_all(url: str, image_bytes: bytes, requests: int, concurrency: int) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[str] = []
    with httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        def one(_: int) -> None:
            start = time.perf_counter()
            try:
                files = {"file": ("image.png", image_bytes, "image/png")}
                response = client.post("/api/predict", files=files)
                if response.status_code != 200 or "probabilities" not in response.json():
                    errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
            except httpx.HTTPError as err:
                errors.append(repr(err))
            latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(requests)))
        wall = time.perf_counter() - start
    return {"latencies": latencies, "errors": errors, "wall_s": wall}


def bench_rest(servers: dict[str, Server], image: Path, args: argparse.Namespace) -> dict[str, Any]:
    image_bytes = image.read_bytes()
    for server in servers.values():
        _post_all(server.url, image_bytes, 2 * args.concurrency, args.concurrency)  # warm-up
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
    per_round = max(args.concurrency, args.requests // args.rounds)
    for round_index in range(args.rounds):
        order = list(servers) if round_index % 2 == 0 else list(servers)[::-1]
        for name in order:
            print(f"[bench] rest round {round_index + 1}/{args.rounds}: {name}", file=sys.stderr)
            cpu_before = servers[name].cpu_seconds()
            runs[name].append(_post_all(servers[name].url, image_bytes, per_round, args.concurrency))
            runs[name][-1]["cpu_s"] = servers[name].cpu_seconds() - cpu_before
    result = {}
    for name, name_runs in runs.items():
        latencies = [s for run in name_runs for s in run["latencies"]]
        errors = [e for run in name_runs for e in run["errors"]]
        wall = sum(run["wall_s"] for run in name_runs)
        result[name] = {
            "requests": len(latencies), "concurrency": args.concurrency, "errors": len(errors),
            "error_examples": sorted(set(errors))[:3], **_percentiles(latencies, 50, 99),
            "wall_s": round(wall, 2), "throughput_rps": round(len(latencies) / wall, 2),
            "throughput_rps_per_round": [round(len(r["latencies"]) / r["wall_s"], 2) for r in name_runs],
            "server_cpu_ms_per_request": round(1000 * sum(r["cpu_s"] for r in name_runs) / len(latencies), 1),
        }
    return result


def _big_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (180, 120, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


def bench_memory(server: Server, data: bytes, uploads: int) -> dict[str, Any]:
    """Peak and settled RSS of ``server`` around ``uploads`` concurrent uploads of ``data``."""
    idle = server.rss_bytes()
    peak = idle
    sampling = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not sampling.is_set():
            peak = max(peak, server.rss_bytes())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    run = _post_all(server.url, data, uploads, uploads)
    sampling.set()
    sampler.join()
    time.sleep(2)  # let the allocator give back what it will
    mb = 1024 * 1024
    return {
        "uploads": uploads, "concurrency": uploads, "errors": len(run["errors"]),
        "error_examples": sorted(set(run["errors"]))[:3], "wall_s": round(run["wall_s"], 2),
        "rss_idle_mb": round(idle / mb), "rss_peak_mb": round(peak / mb),
        "rss_after_mb": round(server.rss_bytes() / mb), "peak_over_idle_mb": round((peak - idle) / mb),
    }


def _ratios(rest: dict[str, Any], memory: dict[str, Any]) -> dict[str, Any]:
    ratios: dict[str, Any] = {}
    if "baseline" in rest and NEW_DEFAULT in rest:
        base, new = rest["baseline"], rest[NEW_DEFAULT]
        ratios["rest_throughput_new_over_baseline"] = round(new["throughput_rps"] / base["throughput_rps"], 2)
        ratios["rest_p99_new_over_baseline"] = round(new["p99_ms"] / base["p99_ms"], 2)
        ratios["rest_p50_new_over_baseline"] = round(new["p50_ms"] / base["p50_ms"], 2)
        ratios["rest_server_cpu_per_request_new_over_baseline"] = round(
            new["server_cpu_ms_per_request"] / base["server_cpu_ms_per_request"], 2
        )
    if "baseline" in memory and NEW_DEFAULT in memory:
        ratios["big_upload_peak_rss_new_over_baseline"] = round(
            memory[NEW_DEFAULT]["rss_peak_mb"] / memory["baseline"]["rss_peak_mb"], 2
        )
    return ratios


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _serving(model_file: Path, image: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    src = {name: REPO / "src" for name in VARIANTS}
    flags = dict(VARIANTS)
    if args.baseline_rev:
        src["baseline"], flags["baseline"] = _baseline_src(args.baseline_rev, work), []
    names = [n for n in VARIANTS if n in args.variants]
    report: dict[str, Any] = {"rest": {}, "memory": {}}
    if args.requests:
        servers = {n: Server(model_file, flags[n], src[n], work / f"{n}.log") for n in names}
        try:
            report["rest"] = bench_rest(servers, image, args)
        finally:
            for server in servers.values():
                server.stop()
    if args.big_uploads:
        data = _big_png(args.big_side)
        report["big_image"] = {"side": args.big_side, "png_bytes": len(data)}
        for name in names:
            print(f"[bench] memory: {args.big_uploads} × {args.big_side}² PNG to {name}", file=sys.stderr)
            server = Server(model_file, flags[name], src[name], work / f"{name}-memory.log")
            try:
                report["memory"][name] = bench_memory(server, data, args.big_uploads)
            finally:
                server.stop()
    report["ratios"] = _ratios(report["rest"], report["memory"])
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, action="append",
                        help="model file(s); default: the DenseNet-121 ∥ ViT-Tiny fusion")
    parser.add_argument("--image", type=Path, help="image to send (default: the first BUSI image)")
    parser.add_argument("--data", help="data root (default: breastvision.paths rules)")
    parser.add_argument("--runs", type=int, default=20, help="latency runs (0: skip the latency section)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--requests", type=int, default=192, help="REST requests per variant (0: skip)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds of requests")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help="comma-separated, of: " + ", ".join(VARIANTS))
    parser.add_argument("--baseline-rev", help="git revision whose code is the baseline server (e.g. main)")
    parser.add_argument("--big-uploads", type=int, default=12, help="concurrent big uploads (0: skip)")
    parser.add_argument("--big-side", type=int, default=6300)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")

    uptime_start = _uptime()
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        work = Path(tmp)
        image = args.image or _sample_image(args.data, work)
        if not args.model:
            print("[bench] building the DenseNet-121 ∥ ViT-Tiny fusion", file=sys.stderr)
        models = args.model or [_fusion_model_file(work)]
        report: dict[str, Any] = {
            "machine": {
                "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                "platform": platform.platform(), "python": platform.python_version(),
                "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
                "uptime_at_start": uptime_start,
            },
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                         if k not in ("model", "out")},
            "latency": [bench_latency(m, image, args, work) for m in models] if args.runs else [],
        }
        report |= _serving(models[0], image, args, work)
    report["machine"]["uptime_at_end"] = _uptime()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    failed = [r["errors"] for section in ("rest", "memory") for r in report[section].values() if r["errors"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
