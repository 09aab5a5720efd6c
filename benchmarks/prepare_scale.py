"""``medvl prepare mimic-cxr`` at MIMIC scale: images/s with a worker per core, memory over the run, and a resume
after the run is killed.

A generated MIMIC-CXR tree that mixes full-size (3000 x 2500) JPGs and 12-bit DICOMs is prepared three times:

1. **measured**: ``prepare_mimic`` with ``--workers`` processes, timed, while a thread samples the proportional
   anonymous memory (``Pss_Anon`` of ``/proc/PID/smaps_rollup``, summed over the process and its workers; shared
   copy-on-write pages are split between them, not counted once per worker) every 50 ms. "Flat" memory means the
   second half of the run peaks no higher than the first: ``growth_mb`` is the difference of those two peaks;
2. **killed**: the same command through the CLI (``medvl prepare mimic-cxr``) in a process group of its own,
   killed with SIGKILL (no clean-up of any kind: a crash, an out-of-memory kill, a pre-empted job) once half of its
   chunks are done;
3. **resumed**: the same command again into the killed run's folder. It must decode only what the killed run left
   undone, and its ``images.npy`` and ``index.csv`` must equal those of the measured run byte for byte.

    python benchmarks/prepare_scale.py [--jpgs 768] [--dicoms 256] [--workers N] [--size 256]

prints a table and writes ``benchmarks/results/prepare_scale_<cpus>cpu.json``. ``benchmarks/gpu_suite.py``'s
``prepare`` row is this measurement on the GPU machine's cores. Files after the first ``--distinct`` of each kind
are byte copies (the same decoding cost, written fast); every file is read from the page cache, as the generator
has just written it, so a cold disk's read time is not in these rates.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import prepare_throughput  # noqa: E402

from medvl.data.mimic import prepare_mimic  # noqa: E402

RESULTS = BENCH / "results"
SAMPLE_S = 0.05


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # the process ended meanwhile
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])  # the name in parentheses may hold spaces
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _anon_kb(pid: int) -> int:
    """``Pss_Anon`` of one process in kB (``RssAnon`` where the kernel has no ``smaps_rollup``); 0 once gone."""
    for path, key in ((f"/proc/{pid}/smaps_rollup", "Pss_Anon:"), (f"/proc/{pid}/status", "RssAnon:")):
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return int(line.split()[1])
        except OSError:
            continue
    return 0


def tree_anon_mb(pid: int) -> float:
    """Anonymous memory of ``pid`` and all its descendants, MB (proportional: shared pages split)."""
    tree, todo, total = _children(), [pid], 0
    while todo:
        p = todo.pop()
        total += _anon_kb(p)
        todo.extend(tree.get(p, ()))
    return total / 1024


class MemorySampler:
    """Samples :func:`tree_anon_mb` of ``pid`` on a thread until the ``with`` block ends."""

    def __init__(self, pid: int, every_s: float = SAMPLE_S):
        self.pid, self.every_s = pid, every_s
        self.samples: list[tuple[float, float]] = []  # (seconds since start, MB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.perf_counter()
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - t0, tree_anon_mb(self.pid)))
            self._stop.wait(self.every_s)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        """Peak, start and end MB, and the growth from the first half's peak to the second half's."""
        if not self.samples:
            return {"samples": 0}
        mid = self.samples[-1][0] / 2
        first = [mb for t, mb in self.samples if t <= mid]
        second = [mb for t, mb in self.samples if t > mid] or first
        return {
            "samples": len(self.samples),
            "start_mb": self.samples[0][1],
            "peak_mb": max(mb for _, mb in self.samples),
            "first_half_peak_mb": max(first),
            "second_half_peak_mb": max(second),
            "growth_mb": max(second) - max(first),
        }


def kill_halfway(root: Path, out: Path, size: int, workers: int, timeout_s: float = 600.0) -> dict:
    """Run ``medvl prepare mimic-cxr`` and SIGKILL its whole process group once half its chunks are done."""
    cli = ("from medvl.cli import main; import sys; sys.exit(main())",)
    cmd = [sys.executable, "-c", *cli, "prepare", "mimic-cxr", "--root", str(root), "--out", str(out)]
    cmd += ["--size", str(size), "--workers", str(workers)]
    state = out / ".prepare" / "state.json"
    proc = subprocess.Popen(  # run outside any checkout, so that `-c` imports the installed medvl
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        cwd=out.parent,
    )
    done, chunks, t0 = 0, None, time.perf_counter()
    try:
        while proc.poll() is None and time.perf_counter() - t0 < timeout_s:
            if chunks is None and state.exists():
                try:
                    st = json.loads(state.read_text())
                    chunks = -(-int(st["n"]) // int(st["chunk_size"]))
                except (ValueError, KeyError):
                    pass  # read while being written: try again
            done = len(list(state.parent.glob("chunk_*.json"))) if chunks else 0
            if chunks and done >= max(1, chunks // 2):
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
    killed = proc.returncode == -signal.SIGKILL
    return {
        "killed": killed,
        "chunks": chunks,
        "chunks_done_at_kill": len(list(state.parent.glob("chunk_*.json"))) if chunks else 0,
        "returncode": proc.returncode,
        "stderr_tail": "" if killed else err[-1000:],
    }


def measure(root: Path, work: Path, size: int, workers: int) -> dict:
    """The measured run into ``work / "prepared"`` (left there), then the killed and resumed pair beside it."""
    measured = work / "prepared"
    with MemorySampler(os.getpid()) as memory:
        t0 = time.perf_counter()
        result = prepare_mimic(root, measured, size=size, workers=workers)
        seconds = time.perf_counter() - t0
    resumed_out = work / "prepared_resumed"
    kill = kill_halfway(root, resumed_out, size, workers)
    t0 = time.perf_counter()
    resumed = prepare_mimic(root, resumed_out, size=size, workers=workers)
    resume_s = time.perf_counter() - t0
    same = {
        name: (measured / name).read_bytes() == (resumed_out / name).read_bytes()
        for name in ("images.npy", "index.csv")
    }
    shutil.rmtree(resumed_out, ignore_errors=True)
    return {
        "images": result.kept,
        "skipped": result.skipped,
        "workers": workers,
        "size": size,
        "seconds": seconds,
        "images_per_s": result.kept / seconds,
        "memory": memory.summary(),
        "resume": {
            **kill,
            "decoded_again": resumed.decoded,
            "reused": resumed.reused,
            "seconds": resume_s,
            "same_images": same["images.npy"],
            "same_index": same["index.csv"],
        },
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jpgs", type=int, default=768)
    p.add_argument("--dicoms", type=int, default=256)
    p.add_argument("--distinct", type=int, default=8, help="distinct files of each kind; the rest are copies")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="medvl_prepare_scale_"))
    try:
        t0 = time.perf_counter()
        _, _, root = prepare_throughput.make_data(
            tmp, args.jpgs, args.dicoms, distinct=args.distinct, dicoms_in_tree=True
        )
        generated_s = time.perf_counter() - t0
        row = measure(root, tmp, args.size, args.workers)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    mem, res = row["memory"], row["resume"]
    print(
        f"\nmedvl prepare mimic-cxr at scale ({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f})"
    )
    print(
        f"  tree: {args.jpgs} JPGs + {args.dicoms} DICOMs, 3000 x 2500 -> {args.size} px (made in {generated_s:.0f} s)"
    )
    print(
        f"  --workers {args.workers}: {row['images']} images in {row['seconds']:.1f} s = {row['images_per_s']:.1f}/s"
    )
    print(
        f"  memory (anonymous, process + workers): start {mem['start_mb']:.0f} MB, peak {mem['peak_mb']:.0f} MB,"
        f" first half peak {mem['first_half_peak_mb']:.0f}, second half {mem['second_half_peak_mb']:.0f}"
        f" ({mem['growth_mb']:+.0f} MB; {mem['samples']} samples)"
    )
    print(
        f"  killed (SIGKILL) after {res['chunks_done_at_kill']} of {res['chunks']} chunks: resumed in"
        f" {res['seconds']:.1f} s, {res['decoded_again']} decoded, {res['reused']} reused;"
        f" same images {res['same_images']}, same index {res['same_index']}"
    )
    record = {
        "command": "python benchmarks/prepare_scale.py " + " ".join(sys.argv[1:]),
        "cpus": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "jpgs": args.jpgs,
        "dicoms": args.dicoms,
        "distinct": args.distinct,
        "source_shape": list(prepare_throughput.make_data.__kwdefaults__["shape"]),
        "generated_s": generated_s,
        **row,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    out = args.out or RESULTS / f"prepare_scale_{os.cpu_count()}cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")
    return 0 if res["killed"] and res["same_images"] and res["same_index"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
