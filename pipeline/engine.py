"""Everything DeepSpeed, in one place: no other module of the package names DeepSpeed or its internals.

- the process group (`init_distributed`), started the same way under the deepspeed launcher, torchrun or a bare
  `python`; on the CPU accelerator DeepSpeed's shared-memory all-reduce op is built here, visibly and never
  behind a stale lock;
- DeepSpeed config I/O: shipped names or paths, batch geometry filled in from the job, the precision it implies;
- building a backbone already sharded (`sharded_construction`: transformers' ZeRO-3 hook kept alive);
- `gathered(params)`: a ZeRO-3 partitioned parameter is a 0-element tensor outside its module's forward, so any
  read (or write) of whole weights happens inside this context (PEFT's `gather_params_ctx`);
- `whole_for_inference(module)`: evaluation under ZeRO-3 gathers the model once (when it fits in free memory) instead
  of every layer for every generated token;
- `Engine`: the training engine of one job (two learning-rate groups, warmup-then-decay schedule, clipping,
  accumulation, precision from the config) with a world-size-independent trainable state for checkpoints;
- the sharding report and peak memory.

The backend (NCCL on NVIDIA GPUs, gloo on `DS_ACCELERATOR=cpu`) comes from DeepSpeed's accelerator, never from
this code, so one code path serves laptops and clusters.

Which ZeRO stage a job runs (`plan_stage`, logged once per job): ZeRO-3 shards the frozen backbone over the ranks,
and that is all it buys; its price is Python on every module call (each Linear's fetch/release hooks): +34% per step
on a small model in one process, where there is nothing to shard (#24). So:
  - several ranks: ZeRO-3, as the DeepSpeed config says: the backbone is built sharded, never whole on one rank.
    When each rank could hold it whole (`whole_model_fits`), the job says so once: `--sharding replicate` then
    trains stage 0 on every rank (`PlainEngine`, the trainable tensors' gradients averaged in one all-reduce per
    step), without ZeRO-3's gathers per layer, forward and backward. Not chosen for you: a cluster's memory plan
    should not change with the model's size behind the user's back;
  - one process: stage 0. The backbone is built whole (`from_pretrained` / `from_config`, no `zero.Init`) and the
    step is a plain PyTorch one (`PlainEngine`: the same AdamW groups and schedule, the loss scaled by 1/grad_accum
    as DeepSpeed does, clipping, fp32 master weights and fp32 gradient accumulation for a bf16 model), with the
    same results (tests/test_batch_split.py compares 1 rank with 2);
  - one process, but ZeRO-3 all the same: when the DeepSpeed config offloads parameters or optimizer state (a model
    too big for one device needs ZeRO-3's offload), when it is fp16 (DeepSpeed's dynamic loss scaling), or when the
    job asks for it (`--sharding zero3`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import resource
import socket
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import torch

from pipeline import distributed, logs
from pipeline.errors import PipelineError
from pipeline.resources import ds_config_path

log = logging.getLogger(__name__)

# transformers' ZeRO-3 hook (HfDeepSpeedConfig) is held through a weak reference inside transformers: it must stay
# referenced while a model is built (from_pretrained / from_config then create parameters already partitioned).
_hf_zero3_config = None


# ----------------------------------------------------------------------------------------------- process group


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_comm_timeout_s = 1800.0


def init_distributed(timeout_s: float = 1800, process_group: bool = False) -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed (once) when it is needed; returns (rank, world_size).

    Several ranks always start the process group. One process starts none (no DeepSpeed import, no gloo, no CPU
    comm op: seconds of start-up, #24) unless `process_group` is set; ZeRO-3 in one process starts it when it
    builds (`ensure_process_group`). A bare `python` run gets single-process launcher variables (DeepSpeed otherwise
    looks for MPI). `timeout_s` bounds every collective: a rank that dies makes the others fail within it instead of
    hanging.
    """
    global _comm_timeout_s
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    import torch.distributed as dist

    _comm_timeout_s = timeout_s
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
        )
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:  # the deepspeed launcher does not limit threads per rank; torchrun sets 1
        torch.set_num_threads(int(threads))
    if distributed.world_size() == 1 and not process_group:
        return 0, 1
    deepspeed = load_deepspeed()

    logs.adopt("DeepSpeed")  # its logger prints to stdout on its own: through ours (console rules, job.log)
    if on_cpu():
        prepare_cpu_comm_op()
    with logs.prints_logged("DeepSpeed"):  # "op ... built successfully" even from cache: the log, not stdout
        deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s), verbose=False)
    _unlink_shm_buffer()
    distributed.record_peers()  # rank -> host, address: so a lost rank can be named later
    return dist.get_rank(), dist.get_world_size()


def ensure_process_group() -> None:
    """Start the process group if one process has none yet: every DeepSpeed engine and ZeRO-3 construction needs
    one, even alone."""
    import torch.distributed as dist

    if not dist.is_initialized():
        init_distributed(_comm_timeout_s, process_group=True)


# Below this many backbone parameters one CPU thread per rank is the default: each op is too small to split, and
# on a busy machine threads that wait for each other cost up to 16x (numbers: README, "Threads"). #22
ONE_THREAD_BELOW_PARAMS = 100_000_000


def cpu_threads(requested: int | None, backbone_params: int) -> int:
    """Threads for torch's CPU ops on this rank: `requested` (--cpu_threads) when given; else 1 for a backbone
    under ONE_THREAD_BELOW_PARAMS; else this rank's share of the cores (OMP_NUM_THREADS when set, as launch.sh
    sets it: cores / local ranks), at most the cores the last minute's load average left idle (at least 1)."""
    if requested:
        return requested
    if backbone_params < ONE_THREAD_BELOW_PARAMS:
        return 1
    cores = len(os.sched_getaffinity(0))
    share = cores // distributed.local_world_size()
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        share = int(os.environ["OMP_NUM_THREADS"])
    idle = round(cores - os.getloadavg()[0])
    return max(1, min(share, idle))


def _extension_lock_is_stale(lock: Path) -> bool:
    """torch's build baton (a plain file created with O_EXCL and held open while building) is stale when no live
    process has it open: it was left by a build that was interrupted (Ctrl-C, a timeout, a killed job)."""
    target = str(lock.resolve())
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                if os.readlink(fd) == target:
                    return False
        except OSError:  # processes come and go, and others' fds may be unreadable
            continue
    return True


def prepare_cpu_comm_op() -> None:
    """Build DeepSpeed's CPU shared-memory all-reduce op before DeepSpeed does, visibly, and never wait forever.

    DeepSpeed JIT-compiles it (~50 s) on the first distributed start of a machine, under torch's file baton in the
    extensions cache. A build interrupted there leaves the baton behind, and every later start then waited on it
    silently, forever. Here local ranks take an flock (released by the kernel when a process dies) before looking:
    a baton nobody holds open is stale and removed with a message, and the build itself announces itself on
    stderr (never stdout, which `dept predict`/`evaluate` keep for results).
    """
    load_deepspeed()
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        return
    build_dir = Path(_get_build_directory(builder.NAME, verbose=False))
    build_dir.parent.mkdir(parents=True, exist_ok=True)
    built = any(build_dir.glob(f"{builder.NAME}*.so"))
    with open(build_dir.parent / f".dept-build-{builder.NAME}.lock", "w") as guard:
        try:
            fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"dept: waiting for another process building DeepSpeed's {builder.NAME} op", file=sys.stderr)
            fcntl.flock(guard, fcntl.LOCK_EX)
        baton = build_dir / "lock"
        if baton.exists() and _extension_lock_is_stale(baton):
            print(f"dept: removing the stale lock {baton} left by an interrupted build", file=sys.stderr)
            baton.unlink(missing_ok=True)
        if baton.exists():
            print(f"dept: a build outside dept holds {baton}; if none is running, remove that file", file=sys.stderr)
        if not built:
            print(
                f"dept: building DeepSpeed's {builder.NAME} op once for this machine (about a minute; cached in "
                f"{build_dir.parent})",
                file=sys.stderr,
            )
        started = time.time()
        with logs.prints_logged("DeepSpeed"):  # DeepSpeed prints progress; stdout is for results
            builder.load(verbose=False)
        if not built:
            print(f"dept: built in {time.time() - started:.0f} s", file=sys.stderr)


def _unlink_shm_buffer() -> None:
    """Remove this rank's DeepSpeed CPU all-reduce buffer from /dev/shm once every rank has mapped it.

    DeepSpeed's CPU accelerator creates `/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>` (66 MB)
    and never deletes it: every multi-rank run leaked 2 x 66 MB of RAM (seen: 4.8 GB after a test session). The
    mappings stay valid after the unlink; the memory is freed when the processes exit.
    """
    import torch.distributed as dist

    if dist.get_world_size() == 1:
        return
    name = (
        f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
        f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}"
    )
    dist.barrier()  # every rank has opened every buffer during init
    with contextlib.suppress(OSError):
        os.unlink(os.path.join("/dev/shm", name))


def load_deepspeed():
    """`import deepspeed`, without the `import mlflow` DeepSpeed's autotuner does when DeepSpeed is imported
    (deepspeed/autotuning/autotuner.py: `try: import mlflow`, for `deepspeed --autotuning` only, which dept never
    runs): 1.3 s of every rank's start on an idle 2-core machine, 4 s under load (#24). mlflow is hidden only while
    DeepSpeed imports, so the autotuner records that it has none; dept's own tracking imports it as before."""
    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    hide = "mlflow" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None  # `import mlflow` raises ImportError while this stands
    try:
        import deepspeed
    finally:
        if hide and sys.modules.get("mlflow", 0) is None:
            del sys.modules["mlflow"]
    return deepspeed


def accelerator_name() -> str:
    """DeepSpeed's accelerator ('cpu', 'cuda', ...): `DS_ACCELERATOR` when set, else cuda when torch sees a GPU, else
    cpu, as DeepSpeed chooses; for cpu and cuda without importing DeepSpeed (a one-process job never needs it)."""
    chosen = os.environ.get("DS_ACCELERATOR", "").strip()
    if "deepspeed" not in sys.modules and chosen in ("", "cpu", "cuda"):
        return chosen or ("cuda" if torch.cuda.is_available() else "cpu")
    load_deepspeed()
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def on_cpu() -> bool:
    return accelerator_name() == "cpu"


# ----------------------------------------------------------------------------------------------- configs


def read_ds_config(value: str, base_dir: Path | None = None) -> dict:
    """A DeepSpeed config (shipped name, path or `auto`), parsed and checked to be ZeRO stage 3."""
    path = ds_config_path(value, base_dir)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PipelineError(f"DeepSpeed config {path} is not valid JSON ({err.msg}, line {err.lineno})") from None
    stage = ds.get("zero_optimization", {}).get("stage") if isinstance(ds, dict) else None
    if stage != 3:
        raise PipelineError(
            f"DeepSpeed config {path} has ZeRO stage {stage!r}: dept-pipeline shards the frozen "
            "backbone with ZeRO stage 3; set zero_optimization.stage to 3"
        )
    if value == "auto":
        log.info("DeepSpeed config: %s (auto: %s)", path.name, "GPU" if "gpu" in path.stem else "no GPU visible")
    return ds


def training_ds_config(ds: dict, batch_size: int, grad_accum: int, grad_clip: float, world: int) -> dict:
    """The DeepSpeed config with the job's batch geometry and clipping (the job's values win over the file's)."""
    from pipeline.config import micro_batch_size

    return {
        **ds,
        "train_batch_size": batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_micro_batch_size_per_gpu": micro_batch_size(batch_size, grad_accum, world),
        "gradient_clipping": grad_clip,
        "steps_per_print": 10**9,
    }  # progress is ours


SHARDINGS = ("auto", "zero3", "replicate")


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def plan_stage(ds: dict, world: int, sharding: str = "auto") -> tuple[dict, str]:
    """(the DeepSpeed config the job runs with, why): ZeRO-3 over several ranks unless `sharding` is "replicate";
    stage 0 (a whole model, a plain PyTorch step) in one process unless the config offloads, is fp16, or `sharding`
    is "zero3". See the module docstring."""
    if sharding not in SHARDINGS:
        raise PipelineError(f"sharding must be one of {', '.join(SHARDINGS)}, got {sharding!r}")
    zero = ds.get("zero_optimization", {})
    offloads = [
        key for key in ("offload_param", "offload_optimizer") if (zero.get(key) or {}).get("device", "none") != "none"
    ]
    if sharding == "replicate" and (offloads or ds.get("fp16", {}).get("enabled")):
        why = (
            f"the DeepSpeed config offloads ({', '.join(offloads)})"
            if offloads
            else "fp16 needs DeepSpeed's loss scaling"
        )
        raise PipelineError(f"--sharding replicate cannot run this DeepSpeed config: {why}; use --sharding auto")
    if world > 1 and sharding != "replicate":
        return ds, f"ZeRO stage 3: the frozen backbone is sharded over {world} ranks"
    if sharding == "zero3":
        return ds, "ZeRO stage 3 in one process: asked for (--sharding zero3)"
    if offloads:
        return ds, f"ZeRO stage 3 in one process: the DeepSpeed config offloads ({', '.join(offloads)})"
    if ds.get("fp16", {}).get("enabled"):
        return ds, "ZeRO stage 3 in one process: fp16 needs DeepSpeed's loss scaling"
    unsharded = {**ds, "zero_optimization": {**zero, "stage": 0}}
    if world > 1:
        return unsharded, (
            f"ZeRO stage 0 on {world} ranks (--sharding replicate): each rank holds the whole model, a plain PyTorch "
            "step, the trainable gradients averaged over the ranks"
        )
    return unsharded, "ZeRO stage 0: one process holds the whole model (a plain PyTorch step, no ZeRO-3 hooks)"


def inference_ds_config(ds: dict, world: int) -> dict:
    """DeepSpeed insists on a batch geometry even without training: a trivial one."""
    return {**ds, "train_batch_size": world, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}


def dtype_of(ds: dict) -> torch.dtype:
    if ds.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


# ----------------------------------------------------------------------------------------------- ZeRO-3


@contextlib.contextmanager
def sharded_construction(ds: dict | None):
    """Models built inside are created already partitioned over the ranks (no rank ever holds the whole model).

    transformers consults a live `HfDeepSpeedConfig` (through a weak reference) in from_pretrained / from_config;
    it is released after the block, so a model loaded later in the same process without ZeRO-3 (`load_dept` after
    training, say) is built whole. Generation passes `synced_gpus` explicitly and needs no live config.
    """
    global _hf_zero3_config
    if ds is not None and ds.get("zero_optimization", {}).get("stage") == 3:
        load_deepspeed()  # before transformers' integration imports it
        from transformers.integrations import HfDeepSpeedConfig

        ensure_process_group()

        _hf_zero3_config = HfDeepSpeedConfig(ds)
    try:
        yield
    finally:
        _hf_zero3_config = None


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def full_numel(param: torch.Tensor) -> int:
    """The parameter's full element count (a partitioned parameter's local tensor is empty)."""
    return getattr(param, "ds_numel", param.numel())


def held_numel(param: torch.Tensor) -> int:
    """Elements this rank holds: its partition under ZeRO-3."""
    return param.ds_tensor.numel() if hasattr(param, "ds_tensor") else param.numel()


def gathered(params, modify: bool = False):
    """Whole parameters inside the block (a collective under ZeRO-3: every rank must enter it).

    modify=True: rank 0's changes are written back to every partition on exit.
    """
    params = [p for p in params if p is not None]
    if not any(is_partitioned(p) for p in params):
        return contextlib.nullcontext()
    deepspeed = load_deepspeed()

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)


def count_params(module: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) element counts at full size."""
    params = list(module.parameters())
    return sum(full_numel(p) for p in params if p.requires_grad), sum(full_numel(p) for p in params)


def sharding_report(module: torch.nn.Module) -> list[dict]:
    """Per rank: the share of `module`'s elements it holds (collective)."""
    held = full = 0
    shares = []
    for param in module.parameters():
        total, local = full_numel(param), held_numel(param)
        held, full = held + local, full + total
        shares.append(local / total)
    mine = {
        "rank": distributed.rank(),
        "held_elements": held,
        "full_elements": full,
        "held_fraction": held / full,
        "min_param_fraction": min(shares),
        "max_param_fraction": max(shares),
    }
    return distributed.gather_objects([mine])


def peak_memory_mb() -> float:
    """Peak accelerator memory (GPU) or peak resident set size of this process (CPU)."""
    name = accelerator_name()
    if name == "cpu":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    if name == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    load_deepspeed()
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().max_memory_allocated() / 2**20


def inference_module(model: torch.nn.Module, ds: dict) -> torch.nn.Module:
    """`model` ready for inference, in eval mode: under ZeRO-3 wrapped by a DeepSpeed inference-only engine (no
    optimizer; its hooks gather each layer for its forward); at stage 0 the whole model on this rank's device."""
    if zero_stage(ds) != 3:
        return whole_on_device(model, dtype_of(ds)).eval()
    deepspeed = load_deepspeed()

    ensure_process_group()
    engine, *_ = deepspeed.initialize(model=model, config=ds)
    engine.module.eval()
    _ENGINE_OF[engine.module] = engine
    return engine.module


# The DeepSpeed engine that wraps a module (Engine and inference_module record it): gathering the model once for
# inference goes through it.
_ENGINE_OF: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
GATHER_FRACTION_ENV = "DEPT_GATHER_FRACTION"
GATHER_FRACTION = 0.5  # default: gather once when the whole model takes at most half of the free memory
_last_gather_choice: str | None = None


def free_memory_bytes() -> tuple[int, int]:
    """(bytes free for this rank's gathered copy, how many local ranks share them): the GPU's free memory
    (`torch.cuda.mem_get_info`, one device per rank), or the machine's available RAM (MemAvailable in /proc/meminfo)
    shared by every rank on this node."""
    if not on_cpu():
        free, _ = torch.cuda.mem_get_info(torch.cuda.current_device())
        return int(free), 1
    with open("/proc/meminfo") as info:
        kib = next(int(line.split()[1]) for line in info if line.startswith("MemAvailable:"))
    return kib * 1024, distributed.local_world_size()


def whole_model_fits(module: torch.nn.Module, fraction: float | None = None) -> tuple[bool, str]:
    """Whether every local rank can hold a whole copy of `module`'s parameters within `fraction` of the free memory
    (default: $DEPT_GATHER_FRACTION, else GATHER_FRACTION; 0 never gathers), and the figures. This rank only: the
    caller agrees over the ranks."""
    if fraction is None:
        fraction = float(os.environ.get(GATHER_FRACTION_ENV, GATHER_FRACTION))
    need = sum(full_numel(p) * p.element_size() for p in module.parameters())
    free, sharing = free_memory_bytes()
    where = "of the GPU's free memory" if sharing == 1 and not on_cpu() else f"of free RAM shared by {sharing} rank(s)"
    figures = f"{need / 2**30:.2f} GiB per rank vs {free / 2**30:.1f} GiB free {where}, limit {fraction:g} x free"
    return fraction > 0 and need * sharing <= fraction * free, figures


@contextlib.contextmanager
def whole_for_inference(module: torch.nn.Module) -> Iterator[bool]:
    """Inside: `module` whole on every rank and without ZeRO-3 hooks when it is partitioned and fits in free memory
    (`whole_model_fits`, agreed over the ranks): yields True, and then each rank may generate on its own, with no
    collective per layer and token (no `synced_gpus`). Yields True too for a module that is not partitioned (already
    whole on each rank: one process, or `--sharding replicate`); False when it is too big: ZeRO-3's per-layer path
    stays. Collective when the module is partitioned: every rank enters.

    The gather-and-unhook is DeepSpeed's own `deepspeed.runtime.zero.unwrap_model_for_generation` (the parameters
    gathered once with GatheredParameters, the engine's forward/backward hooks removed, re-registered on exit, then
    the parameters partitioned again); tests/test_generation.py fails if it stops giving the per-layer path's texts.
    """
    global _last_gather_choice
    ds_engine = _ENGINE_OF.get(module)
    if not any(is_partitioned(p) for p in module.parameters()):
        yield True
        return
    if ds_engine is None:  # partitioned, but not by an engine of ours: only the per-layer path is safe
        yield False
        return
    fits, figures = whole_model_fits(module)
    fits = distributed.all_ranks(fits)  # every rank must take the same branch
    choice = f"{'gathered once' if fits else 'per layer (ZeRO-3 hooks)'}: {figures}"
    if choice.split(":")[0] != (_last_gather_choice or "").split(":")[0] and distributed.rank() == 0:
        log.info("evaluation under ZeRO-3, the model %s", choice)
    _last_gather_choice = choice
    if not fits:
        yield False
        return
    load_deepspeed()
    from deepspeed.runtime.zero import unwrap_model_for_generation

    with unwrap_model_for_generation(ds_engine):
        yield True


def device() -> torch.device:
    """This rank's accelerator device (DeepSpeed's choice: cuda:<local rank> on NVIDIA GPUs, cpu on DS_ACCELERATOR=cpu)."""
    name = accelerator_name()
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        torch.cuda.set_device(distributed.local_rank())
        return torch.device("cuda", distributed.local_rank())
    load_deepspeed()
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def whole_on_device(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model`'s floating-point parameters in `dtype` (the backbone was loaded in it; a fresh DePT module is fp32) and
    everything on this rank's device. Buffers keep their dtype, as under ZeRO-3 (which converts parameters only):
    LLaMA's rotary `inv_freq` stays fp32."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return model.to(device())


# ----------------------------------------------------------------------------------------------- training


def warmup_then_linear_decay(warmup: int, total: int) -> Callable[[int], float]:
    """Factor on each group's own rate: linear warmup from 0, then linear decay to 0 at `total` steps."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return step / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def training_engine(model, groups: list[dict], ds: dict, weight_decay: float, warmup: int, total_steps: int):
    """The training engine `ds` calls for: `Engine` (DeepSpeed) under ZeRO-3, `PlainEngine` at stage 0 (see
    `plan_stage`). Both have the same methods and give the same steps."""
    kind = Engine if zero_stage(ds) == 3 else PlainEngine
    return kind(model, groups, ds, weight_decay, warmup, total_steps)


class Engine:
    """The DeepSpeed engine of one training job.

    `groups` are optimizer parameter groups with their own `lr` and a `name` (prompt, lowrank, backbone): AdamW
    (eps 1e-6) is a client optimizer and the schedule a client LambdaLR, so each group keeps its own rate under
    warmup-then-decay (DeepSpeed's own schedulers would overwrite both with one rate).
    """

    def __init__(
        self, model: torch.nn.Module, groups: list[dict], ds: dict, weight_decay: float, warmup: int, total_steps: int
    ):
        deepspeed = load_deepspeed()

        ensure_process_group()
        self.group_names = [g["name"] for g in groups]
        self._factor = warmup_then_linear_decay(warmup, total_steps)
        optimizer = torch.optim.AdamW(groups, eps=1e-6, weight_decay=weight_decay)
        self._engine, self._optimizer, _, self._scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            config=ds,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, self._factor),
        )
        self.module = self._engine.module
        self.device = self._engine.device
        self.trainable = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        _ENGINE_OF[self.module] = self._engine

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def forward(self, batch: dict) -> torch.Tensor:
        """The loss of one micro-batch (tensors moved to the engine's device)."""
        return self._engine(**{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}).loss

    def backward(self, loss: torch.Tensor) -> None:
        self._engine.backward(loss)

    def step(self) -> None:
        """An optimizer + schedule step at the accumulation boundary (DeepSpeed counts micro-batches)."""
        self._engine.step()

    def learning_rates(self) -> dict[str, float]:
        """The rate each group applies at the coming step."""
        return dict(zip(self.group_names, self._engine.get_lr()))

    # -- checkpoint state, independent of the number of ranks

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Full fp32 copies of every trainable tensor and its AdamW moments (`param/`, `exp_avg/`, `exp_avg_sq/`
        + name). Collective: call on every rank. The frozen backbone is not part of it."""
        load_deepspeed()
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        state = {}
        for name, param in self.trainable:
            state[f"param/{name}"] = safe_get_full_fp32_param(param).detach().float().cpu().clone()
            for key in ("exp_avg", "exp_avg_sq"):
                state[f"{key}/{name}"] = safe_get_full_optimizer_state(param, key).detach().float().cpu().clone()
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor], step: int) -> None:
        """Restore `trainable_state()` (written on any number of ranks) and the optimizer/schedule position."""
        load_deepspeed()
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        # AdamW's state over ZeRO-3's flat fp32 partitions exists only after a first step: create it as AdamW would.
        base = self._optimizer.optimizer
        for flat in self._optimizer.fp32_partitioned_groups_flat:
            if "exp_avg" not in base.state[flat]:
                base.state[flat] = {
                    "step": torch.tensor(0.0),
                    "exp_avg": torch.zeros_like(flat),
                    "exp_avg_sq": torch.zeros_like(flat),
                }
        missing = [name for name, _ in self.trainable if f"param/{name}" not in state]
        if missing:
            raise PipelineError(
                f"checkpoint lacks the trainable tensor {missing[0]}: it was written by another "
                "method or DePT shape; start a new output directory"
            )
        for name, param in self.trainable:
            safe_set_full_fp32_param(param, state[f"param/{name}"].to(self.device))  # the optimizer's master copy
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(param, state[f"{key}/{name}"].to(self.device), key)
        # ... and the module's own (partitioned) copy, which the forward reads until the next optimizer step
        self.overwrite({name: state[f"param/{name}"] for name, _ in self.trainable}, prefix="")
        for flat in self._optimizer.fp32_partitioned_groups_flat:  # AdamW's bias correction needs its step count
            base.state[flat]["step"] = torch.tensor(float(step))
        self._scheduler.last_epoch = step
        for group in self._optimizer.param_groups:
            group["lr"] = group["initial_lr"] * self._factor(step)
        self._scheduler._last_lr = [g["lr"] for g in self._optimizer.param_groups]

    def overwrite(self, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        """Copy tensors into live (possibly partitioned) parameters named `prefix + name`, e.g. the best adapter
        before the test evaluation. Collective. Not for further training: the optimizer keeps its own copy."""
        params = dict(self.module.named_parameters())
        targets = [(params[prefix + name], tensor) for name, tensor in tensors.items()]
        with gathered([p for p, _ in targets], modify=True), torch.no_grad():
            for param, tensor in targets:
                param.copy_(tensor.to(param.dtype))


class PlainEngine:
    """The training engine of a rank holding the whole model (ZeRO stage 0): the step of `Engine` in plain
    PyTorch, with no DeepSpeed engine around the backbone (no per-module hooks, no engine bookkeeping per step).

    What DeepSpeed does for `Engine`, done here the same way: the model on this rank's device with its parameters in
    the config's precision; AdamW (eps 1e-6) over the groups with a LambdaLR warmup-then-decay schedule; each
    micro-batch's loss divided by grad_accum before its backward; at every grad_accum-th `step()` the gradient-norm
    clip (`gradient_clipping`: factor max_norm / (norm + 1e-6) when below 1), the optimizer step and the schedule
    step. On several ranks (`--sharding replicate`) the gradients of the trainable tensors are averaged over the
    ranks before the clip, in one all-reduce, as ZeRO averages them: the same step. For a 16-bit model the optimizer works on fp32 master copies of the trainable parameters, gradients are
    accumulated into the masters in fp32 and the updated masters are copied back (DeepSpeed's bf16 mixed precision).
    The checkpoint state is the same as `Engine`'s, so a checkpoint moves between this and ZeRO-3 on any world size.
    """

    def __init__(
        self, model: torch.nn.Module, groups: list[dict], ds: dict, weight_decay: float, warmup: int, total_steps: int
    ):
        self.group_names = [g["name"] for g in groups]
        self._factor = warmup_then_linear_decay(warmup, total_steps)
        self._grad_accum = int(ds.get("gradient_accumulation_steps", 1))
        self._clip = float(ds.get("gradient_clipping", 0.0) or 0.0)
        self._micro_steps = 0
        self.module = whole_on_device(model, dtype_of(ds))
        self.device = next(self.module.parameters()).device
        self.trainable = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        # fp32 parameters are their own masters; 16-bit ones get an fp32 copy that receives their gradients
        self._master = {
            p: p if p.dtype == torch.float32 else p.detach().float().requires_grad_(True) for _, p in self.trainable
        }
        for param, master in self._master.items():
            if master is not param:
                param.register_post_accumulate_grad_hook(self._accumulate_into(master))
        master_groups = [{**g, "params": [self._master[p] for p in g["params"]]} for g in groups]
        self._optimizer = torch.optim.AdamW(master_groups, eps=1e-6, weight_decay=weight_decay)
        self._scheduler = torch.optim.lr_scheduler.LambdaLR(self._optimizer, self._factor)

    @staticmethod
    def _accumulate_into(master: torch.Tensor):
        def hook(param: torch.Tensor) -> None:
            grad = param.grad.float()
            master.grad = grad if master.grad is None else master.grad.add_(grad)
            param.grad = None

        return hook

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def forward(self, batch: dict) -> torch.Tensor:
        """The loss of one micro-batch (tensors moved to the model's device)."""
        return self.module(**{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}).loss

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self._grad_accum).backward()

    def step(self) -> None:
        """Counts a micro-batch; at the accumulation boundary: clip, optimizer step, schedule step."""
        self._micro_steps += 1
        if self._micro_steps % self._grad_accum:
            return
        distributed.average_gradients(list(self._master.values()))
        if self._clip > 0:
            torch.nn.utils.clip_grad_norm_(list(self._master.values()), self._clip)
        self._optimizer.step()
        self._scheduler.step()
        self._optimizer.zero_grad(set_to_none=True)
        self._copy_masters_to_params()

    def _copy_masters_to_params(self) -> None:
        with torch.no_grad():
            for param, master in self._master.items():
                if master is not param:
                    param.copy_(master)

    def learning_rates(self) -> dict[str, float]:
        """The rate each group applies at the coming step."""
        return dict(zip(self.group_names, (g["lr"] for g in self._optimizer.param_groups)))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """`Engine.trainable_state`: full fp32 copies of every trainable tensor and its AdamW moments."""
        state = {}
        for name, param in self.trainable:
            master = self._master[param]
            state[f"param/{name}"] = master.detach().float().cpu().clone()
            moments = self._optimizer.state.get(master, {})
            for key in ("exp_avg", "exp_avg_sq"):
                value = moments.get(key)
                state[f"{key}/{name}"] = (
                    value.detach().float().cpu().clone()
                    if value is not None
                    else torch.zeros_like(state[f"param/{name}"])
                )
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor], step: int) -> None:
        """`Engine.load_trainable_state`: restore a checkpoint written on any number of ranks."""
        missing = [name for name, _ in self.trainable if f"param/{name}" not in state]
        if missing:
            raise PipelineError(
                f"checkpoint lacks the trainable tensor {missing[0]}: it was written by another "
                "method or DePT shape; start a new output directory"
            )
        with torch.no_grad():
            for name, param in self.trainable:
                master = self._master[param]
                master.copy_(state[f"param/{name}"].to(master.device))
                self._optimizer.state[master] = {
                    "step": torch.tensor(float(step)),
                    **{key: state[f"{key}/{name}"].to(master.device).clone() for key in ("exp_avg", "exp_avg_sq")},
                }
        self._copy_masters_to_params()
        self._scheduler.last_epoch = step
        for group in self._optimizer.param_groups:
            group["lr"] = group["initial_lr"] * self._factor(step)
        self._scheduler._last_lr = [g["lr"] for g in self._optimizer.param_groups]

    def overwrite(self, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        """`Engine.overwrite`: copy tensors into the live parameters `prefix + name` (not into the optimizer's copy)."""
        params = dict(self.module.named_parameters())
        with torch.no_grad():
            for name, tensor in tensors.items():
                params[prefix + name].copy_(tensor.to(params[prefix + name].dtype))
