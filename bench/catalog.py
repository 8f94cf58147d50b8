"""Catalog throughput on a real S3 API (moto on 127.0.0.1): pull vs a raw s3fs get, and publish.

    python bench/catalog.py                              # one 200 MB file, 200 files of 64 KB
    python bench/catalog.py --big-mb 20 --small-n 20     # a quick run

For each case the same objects are moved both ways, alternating, ``--repeats`` times; medians
are reported. ``pull`` = resolve + download into an empty cache + verify every sha256 + place
into the destination; ``raw get`` = ``s3fs.get`` of the same objects. ``publish`` = hash +
upload + read back and verify + manifest + pointer; ``raw put`` = ``s3fs.put`` of the same
files. Ratios are raw time / catalog time (1.0 = as fast as raw s3fs; pull target >= 0.9).
Prints one JSON line, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _moto(mode: str) -> tuple[str, object]:
    """Start a moto S3 server on 127.0.0.1 (in a thread here, or in a child process)."""
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(k, None)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    if mode == "thread":
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        return f"http://{host}:{port}", server.stop
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.1)
    return f"http://127.0.0.1:{port}", proc.kill


def _make_case(root: Path, files: list[tuple[str, int]]) -> Path:
    root.mkdir(parents=True)
    for name, size in files:
        with open(root / name, "wb") as f:
            left = size
            while left:
                n = min(left, 8 << 20)
                f.write(os.urandom(n))
                left -= n
    return root


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _repeat(r: int, label: str, src: Path, local: list[Path], root: str, fs, bucket: str, work: Path,
            times: dict[str, list[float]]) -> None:
    """One repeat: publish vs raw put, then cold pull vs raw get (order alternates), warm pull."""
    from dlm_factory.catalog import Catalog

    cat = Catalog(root, cache_dir=work / f"cache-{label}-{r}")
    name = f"{label}-{r}"  # a fresh name: a full upload
    raw_prefix = f"{bucket}/raw/{label}-{r}"
    steps = [("publish", lambda: cat.publish(src, name, progress=False)),
             ("raw_put", lambda: fs.put([str(p) for p in local], [f"{raw_prefix}/{p.name}" for p in local]))]
    for key, fn in (steps if r % 2 == 0 else steps[::-1]):
        times[key].append(_timed(fn))

    m = cat.resolve(name)
    remote = [f"{bucket}/catalog/models/{name}/{m.version}/{f.path}" for f in m.files]
    raw_dir = work / f"raw-{label}-{r}"
    raw_dir.mkdir()
    steps = [("pull", lambda: cat.pull(name, work / f"pull-{label}-{r}", progress=False)),
             ("raw_get", lambda: fs.get(remote, [str(raw_dir / p.rsplit("/", 1)[1]) for p in remote]))]
    for key, fn in (steps if r % 2 == 0 else steps[::-1]):
        times[key].append(_timed(fn))
    times["warm_pull"].append(_timed(lambda: cat.pull(name, work / f"warm-{label}-{r}", progress=False)))
    for p in work.iterdir():  # keep the disk small between repeats
        shutil.rmtree(p, ignore_errors=True)


def run_case(label: str, src: Path, endpoint: str, bucket: str, work: Path, repeats: int) -> dict:
    import s3fs

    root = f"s3://{bucket}/catalog?endpoint_url={endpoint}"
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, use_listings_cache=False)
    local = sorted(p for p in src.iterdir())
    nbytes = sum(p.stat().st_size for p in local)
    times: dict[str, list[float]] = {"publish": [], "raw_put": [], "pull": [], "raw_get": [], "warm_pull": []}

    for r in range(repeats):
        _repeat(r, label, src, local, root, fs, bucket, work, times)

    med = {k: statistics.median(v) for k, v in times.items()}
    mb = nbytes / 1e6
    return {
        "case": label, "files": len(local), "mb": round(mb, 1), "repeats": repeats,
        "raw_get_mb_s": round(mb / med["raw_get"], 1), "pull_mb_s": round(mb / med["pull"], 1),
        "pull_ratio": round(med["raw_get"] / med["pull"], 3),
        "raw_put_mb_s": round(mb / med["raw_put"], 1), "publish_mb_s": round(mb / med["publish"], 1),
        "publish_ratio": round(med["raw_put"] / med["publish"], 3),
        "warm_pull_s": round(med["warm_pull"], 3),
        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--big-mb", type=int, default=200, help="size of the single large file (MB)")
    ap.add_argument("--small-n", type=int, default=200, help="number of small files")
    ap.add_argument("--small-kb", type=int, default=64, help="size of each small file (KB)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--server", choices=["thread", "process"], default="thread",
                    help="moto in a thread of this process (default) or in its own process")
    args = ap.parse_args()

    endpoint, stop = _moto(args.server)
    import s3fs

    bucket = "bench"
    s3fs.S3FileSystem(endpoint_url=endpoint).mkdir(bucket)
    tmp = Path(tempfile.mkdtemp(prefix="catalog-bench-"))
    os.environ["FACTORY_HOME"] = str(tmp / "home")
    try:
        big = _make_case(tmp / "src-big", [("model.safetensors", args.big_mb * 1_000_000)])
        small = _make_case(tmp / "src-small", [(f"w-{i:04d}.safetensors", args.small_kb * 1000)
                                                for i in range(args.small_n)])
        work = tmp / "work"
        work.mkdir()
        results = [run_case("big", big, endpoint, bucket, work, args.repeats),
                   run_case("small", small, endpoint, bucket, work, args.repeats)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        stop()

    print(json.dumps({"bench": "catalog", "server": f"moto ({args.server})", "cpus": os.cpu_count(),
                      "results": results}))
    print()
    print("| case | files | MB | raw s3fs get MB/s | pull MB/s | pull / raw | raw s3fs put MB/s | publish MB/s "
          "| publish / raw | warm pull s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['case']} | {r['files']} | {r['mb']} | {r['raw_get_mb_s']} | {r['pull_mb_s']} | "
              f"{r['pull_ratio']:.2f}x | {r['raw_put_mb_s']} | {r['publish_mb_s']} | {r['publish_ratio']:.2f}x | "
              f"{r['warm_pull_s']} |")


if __name__ == "__main__":
    main()
