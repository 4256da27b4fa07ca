"""Data at the scale of the paper's large tasks: per-rank memory and preparation time of a Yelp-2-sized task.

    python -m pipeline.bench.data                                  # this checkout, 560,000 rows, 2 ranks
    python -m pipeline.bench.data --before /tmp/before             # and another checkout of the package beside it

Writes a synthetic task in the hub schema of Yelp-2 (`<tmp>/yelp/train.jsonl`: `{"text", "label"}`, ~700 characters
a review; `test.jsonl` the evaluation split) into a temporary data folder and runs the registered `yelp` task's
preparation on `--nproc` ranks (torchrun, gloo, one thread a rank), as a training job does it: `load_job_data`
(read -> render with the bad-row policy -> the large split rule -> the first 100,000 training rows; validation and
test as lists) -> tokenization of the training rows at s = `--max_length` -> the length column and the first
batch of step 0 read and padded: ready to train. Each code version runs twice: on an empty cache (`cold`) and
again on the cache the first run left (`warm`).

Per rank it reports the peak RSS (VmHWM), the RSS before any data was read (after imports and the tokenizer), the
data's share (their difference), the peak private (anonymous) RSS, the preparation time, the CPU seconds spent and
the rendering passes it made. Pages of memory-mapped cache files count in RSS once touched, but they are the
kernel's page cache, shared by the ranks and dropped under pressure; the anonymous RSS is what a rank holds itself.

`--before DIR` runs the same job with the package found in DIR (e.g. `git worktree add /tmp/before <commit>`): its
code is imported instead of this checkout's, through PYTHONPATH. A version without `training_rows` is driven the
way its `train` did (`tokenize` -> list of dicts, lengths from the lists); one without a rendering counter has its
`render_rows` counted by a wrapper.

Prints a Markdown table (and `--output FILE.json` keeps every number).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
T5_TOKENIZER = REPO.parent / "shared" / "weights" / "t5_tokenizer"
WORKER_ENV = "DEPT_BENCH_DATA_WORKER"  # a rank's settings file (set by the orchestrator for torchrun's ranks)
YELP_TEST_ROWS = 38_000  # yelp_polarity's test split, which the large rule makes the test set


# ----------------------------------------------------------------------------------------------- synthetic data


def write_yelp(folder: Path, rows: int, chars: int, seed: int = 0) -> dict:
    """`<folder>/yelp/train.jsonl` (`rows` reviews) and `test.jsonl` in yelp_polarity's schema; sizes written."""
    words = (REPO / "pipeline" / "assets" / "words.txt").read_text().split()
    rng = random.Random(seed)
    sentences = []
    for _ in range(4000):  # a pool of sentences, so that writing 560,000 reviews takes seconds
        text = " ".join(rng.choice(words) for _ in range(rng.randint(6, 22)))
        sentences.append(text.capitalize() + rng.choice((".", ".", ".", "!", "?")))
    sizes = {}
    (folder / "yelp").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", rows), ("test", min(YELP_TEST_ROWS, max(rows // 10, 100)))):
        path = folder / "yelp" / f"{split}.jsonl"
        with open(path, "w") as handle:
            lines = []
            for _ in range(count):
                review, length = [], 0
                while length < chars:
                    sentence = rng.choice(sentences)
                    review.append(sentence)
                    length += len(sentence) + 1
                lines.append(json.dumps({"text": " ".join(review), "label": rng.randint(0, 1)}) + "\n")
                if len(lines) >= 10_000:
                    handle.writelines(lines)
                    lines = []
            handle.writelines(lines)
        sizes[split] = {"rows": count, "bytes": path.stat().st_size}
    return sizes


# ----------------------------------------------------------------------------------------------- one rank


class _Memory:
    """Samples /proc/self/status every `interval` s: the highest anonymous RSS seen (the kernel keeps VmHWM)."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak_anon = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def status() -> dict[str, int]:
        values = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                values[name] = int(rest.split()[0]) * 1024
        return values

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_anon = max(self.peak_anon, self.status().get("RssAnon", 0))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_anon = max(self.peak_anon, self.status().get("RssAnon", 0))


def worker(args) -> None:
    """One rank (started by torchrun): prepare the job's data and write what it measured to `<out>/rank-N.json`."""
    # Run as a script: its folder (pipeline/bench) must not shadow top-level modules, and `pipeline` must come from
    # PYTHONPATH (the checkout being measured), not from this file's checkout.
    sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != HERE]
    with _Memory() as memory:
        result = _prepare(args, memory)
    result["peak_anon"] = memory.peak_anon
    result["peak_rss"] = _Memory.status()["VmHWM"]
    Path(args.out, f"rank-{result['rank']}.json").write_text(json.dumps(result))


def _prepare(args, memory: _Memory) -> dict:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    import datasets

    datasets.disable_progress_bars()
    import pipeline.data as data
    import pipeline.tasks.loading as loading
    from pipeline.backbone import load_tokenizer
    from pipeline.config import DataArgs
    from pipeline.job import load_job_data
    from pipeline.options import build

    passes = _render_counter(loading)
    tokenizer = load_tokenizer(args.tokenizer)
    dist.barrier()
    baseline = _Memory.status()
    cpu0, start = time.process_time(), time.perf_counter()
    job = load_job_data(build(DataArgs, {"tasks": ["yelp"], "data_dir": args.data_dir}, "data"), seed=0)
    loaded, cpu1 = time.perf_counter(), time.process_time()
    if hasattr(data, "training_rows"):  # this checkout: tables end to end
        tokenized = data.training_rows(job.train, tokenizer, True, args.max_length, 32)
        lengths = data.row_lengths(tokenized)
        first = data.rows_at(tokenized, data.global_batch(len(tokenized), 32, 0, 0, lengths)[: 32 // args.nproc])
    else:  # the list path, as its train() drove it
        tokenized = data.tokenize(job.train, tokenizer, True, args.max_length, 32)
        lengths = [len(r["input_ids"]) for r in tokenized]
        first = [tokenized[i] for i in data.global_batch(len(tokenized), 32, 0, 0, lengths)[: 32 // args.nproc]]
    batch = data.collate(first, tokenizer.pad_token_id, True)
    ready, cpu2 = time.perf_counter(), time.process_time()
    dist.barrier()
    result = {
        "rank": rank,
        "code": str(Path(data.__file__).resolve().parents[1]),
        "train_rows": len(job.train),
        "train_type": type(job.train).__name__,
        "tokenized_rows": len(tokenized),
        "test_rows": sum(len(t) for _, t in job.held_out.values()),
        "batch_shape": list(batch["input_ids"].shape),
        "render_passes": passes(),
        "baseline_rss": baseline["VmRSS"],
        "baseline_anon": baseline.get("RssAnon", 0),
        "load_s": loaded - start,
        "tokenize_s": ready - loaded,
        "prepare_s": ready - start,
        "load_cpu_s": cpu1 - cpu0,
        "tokenize_cpu_s": cpu2 - cpu1,
    }
    dist.destroy_process_group()
    return result


def _render_counter(loading):
    """A function returning the rendering passes this process made: the module's own counter, else a count of
    `render_rows` calls (a version without the counter renders through it)."""
    if hasattr(loading, "RENDER_PASSES"):
        return lambda: loading.RENDER_PASSES
    calls = [0]
    original = loading.render_rows

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    loading.render_rows = counted
    return lambda: calls[0]


# ----------------------------------------------------------------------------------------------- the runs


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(code: Path, label: str, cache: Path, data_dir: Path, args, out: Path) -> list[dict]:
    """One preparation on `args.nproc` ranks with the package found in `code`; the ranks' records."""
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(
        PYTHONPATH=str(code),
        DEPT_CACHE=str(cache),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_DATASETS_CACHE=str(cache / "hf"),
        HF_HUB_OFFLINE="1",
        PYTHONWARNINGS="ignore",
    )
    env.pop("DEPT_DATA_DIR", None)
    settings = out / "worker.json"
    settings.write_text(
        json.dumps(
            {
                "out": str(out),
                "data_dir": str(data_dir),
                "tokenizer": args.tokenizer,
                "max_length": args.max_length,
                "nproc": args.nproc,
            }
        )
    )
    env[WORKER_ENV] = str(settings)  # not flags: torchrun would read them as its own abbreviations
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(args.nproc),
        "--master_port",
        str(_free_port()),
        str(Path(__file__).resolve()),
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(code))
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{label}: the ranks failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    records = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(args.nproc)]
    for record in records:
        record.update(label=label, launch_wall_s=wall)
    return records


def _mb(value: int) -> str:
    return f"{value / 2**20:,.0f}"


def table(records: list[dict]) -> str:
    head = (
        "| code | cache | rank | training rows | rendering passes (node) | prepare s (load + tokenize) | CPU s | "
        "RSS before data MB | peak RSS MB | data: peak - before MB | peak anon RSS MB |"
    )
    lines = [head, "|" + "|".join(["---"] * 11) + "|"]
    by_run: dict = {}
    for r in records:
        by_run.setdefault((r["label"], r["cache"]), []).append(r)
    for (label, cache), ranks in by_run.items():
        node = sum(r["render_passes"] for r in ranks)
        for r in sorted(ranks, key=lambda x: x["rank"]):
            lines.append(
                f"| {label} | {cache} | {r['rank']} | {r['train_rows']:,} ({r['train_type']}) | "
                f"{r['render_passes']} ({node}) | {r['prepare_s']:.1f} ({r['load_s']:.1f} + {r['tokenize_s']:.1f}) | "
                f"{r['load_cpu_s'] + r['tokenize_cpu_s']:.1f} | {_mb(r['baseline_rss'])} | {_mb(r['peak_rss'])} | "
                f"{_mb(r['peak_rss'] - r['baseline_rss'])} | {_mb(r['peak_anon'])} |"
            )
    return "\n".join(lines)


def machine() -> str:
    import datasets
    import torch

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, datasets {datasets.__version__}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=560_000, help="training reviews (Yelp-2: 560,000)")
    parser.add_argument("--chars", type=int, default=700, help="characters per review (about)")
    parser.add_argument("--nproc", type=int, default=2, help="ranks")
    parser.add_argument("--max_length", type=int, default=256, help="s, the tokenized length (the paper's Yelp s)")
    parser.add_argument(
        "--tokenizer",
        default=str(T5_TOKENIZER) if T5_TOKENIZER.is_dir() else "random:tiny-t5",
        help="tokenizer directory or random:<preset> (default: T5's, from shared/weights)",
    )
    parser.add_argument("--before", default="", help="another checkout to measure the same way (e.g. a worktree)")
    parser.add_argument("--workdir", default="", help="where the data and caches go (default: a temporary folder)")
    parser.add_argument("--output", default="", help="also write every number to this JSON file")
    args = parser.parse_args(argv)
    if args.rows < 1002 or args.nproc < 1:
        sys.exit("--rows must exceed 1,001 (the large split rule holds out 1,000) and --nproc must be at least 1")
    versions = [("after", REPO)]
    if args.before:
        before = Path(args.before).resolve()
        if not (before / "pipeline" / "data.py").is_file():
            sys.exit(f"--before {before} holds no pipeline package (pipeline/data.py)")
        versions.insert(0, ("before", before))
    with tempfile.TemporaryDirectory(prefix="dept-bench-data-", dir=args.workdir or None) as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        sizes = write_yelp(root / "data", args.rows, args.chars)
        print(
            f"wrote {sizes['train']['rows']:,} training reviews ({sizes['train']['bytes'] / 2**20:,.0f} MiB) and "
            f"{sizes['test']['rows']:,} test reviews in {time.perf_counter() - start:.0f} s",
            flush=True,
        )
        records = []
        for label, code in versions:
            cache = root / f"cache-{label}"
            for state in ("cold", "warm"):
                ranks = run_ranks(code, label, cache, root / "data", args, root / f"out-{label}-{state}")
                for record in ranks:
                    record["cache"] = state
                records += ranks
                print(f"{label} {state}: {max(r['prepare_s'] for r in ranks):.1f} s", flush=True)
    report = table(records)
    print()
    print(report)
    print()
    print(f"machine: {machine()}")
    print(
        f"data: {args.rows:,} reviews of ~{args.chars} characters ({sizes['train']['bytes'] / 2**20:,.0f} MiB JSONL), "
        f"{args.nproc} ranks, tokenizer {args.tokenizer}, s = {args.max_length}"
    )
    if args.output:
        Path(args.output).write_text(
            json.dumps({"machine": machine(), "sizes": sizes, "records": records, "settings": vars(args)}, indent=1)
        )


if __name__ == "__main__":
    if os.environ.get(WORKER_ENV):
        worker(argparse.Namespace(**json.loads(Path(os.environ[WORKER_ENV]).read_text())))
    else:
        main()
