"""One code path for 1..N processes: torch.distributed set-up from the ``torchrun`` environment.

``torchrun --nproc_per_node N -m masksc fit ...`` (or ``--nnodes``/``--rdzv-endpoint`` for
several machines) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address;
:func:`init_from_env` then joins the process group (NCCL on CUDA, gloo on CPU), pins rank
``LOCAL_RANK`` to GPU ``LOCAL_RANK`` and returns a :class:`DistContext`. Without those variables
(or ``WORLD_SIZE=1``) it returns a single-process context and every helper is a no-op, so the
same code runs on one CPU, one GPU or many.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Rank 0 alone streams the preprocessing statistics and trains the teacher while the other
# ranks wait in a collective; on a 10^7-cell atlas that is far longer than torch's default.
DEFAULT_TIMEOUT = datetime.timedelta(hours=6)
SHUTDOWN_WAIT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its node, the
    ``device`` it computes on (None: the caller's choice, single-process only)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that writes checkpoints and outputs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if self.distributed:
            if self.device is not None and self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    @contextlib.contextmanager
    def together(self):
        """Run a block on every rank and stop every rank if it fails on any. The failing rank
        raises its own error; the others raise a MaskscError naming it, instead of waiting in
        (NCCL) or dying with a lost connection in (gloo) the next collective. The block's end
        is a collective: every rank must enter it."""
        from masksc.errors import MaskscError
        error = None
        try:
            yield
        except Exception as exc:
            if not self.distributed:
                raise
            error = exc
        if not self.distributed:
            return
        flags = torch.zeros(self.world_size, device=self.device if self.device is not None else "cpu")
        flags[self.rank] = float(error is not None)
        dist.all_reduce(flags)
        flags = flags.cpu()  # one device-to-host copy, not one per rank read below
        if error is not None:
            raise error
        failed = [r for r in range(self.world_size) if flags[r] > 0]
        if failed:
            raise MaskscError(f"rank {', '.join(map(str, failed))} stopped with an error (its message is in that "
                              "rank's output); every rank stops with it.")

    def broadcast_object(self, obj, src: int = 0):
        """``obj`` of rank ``src`` (any picklable object), returned on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, device=self.device if self.device and self.device.type == "cuda"
                                   else None)
        return box[0]


def env_int(name: str, default: int) -> int:
    """The integer torchrun set in the environment variable ``name``; ``default`` when it is unset
    or empty. Raises ValueError for a value that is not an integer."""
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def context() -> DistContext:
    """The context of the current process: from the initialised process group, else single-process."""
    if dist.is_available() and dist.is_initialized():
        local = env_int("LOCAL_RANK", 0)
        device = torch.device("cuda", local) if dist.get_backend() == "nccl" else torch.device("cpu")
        return DistContext(dist.get_rank(), dist.get_world_size(), local, device)
    return DistContext()


def init_from_env(device: str | torch.device | None = None,
                  timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> DistContext:
    """Join the process group described by torchrun's environment (``WORLD_SIZE`` > 1).

    Backend: NCCL when CUDA is available and ``device`` is not ``cpu``, otherwise gloo. Each
    rank computes on ``cuda:LOCAL_RANK`` (NCCL) or the CPU. Returns the single-process context
    when ``WORLD_SIZE`` is unset or 1. Idempotent."""
    world = env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistContext()
    if dist.is_initialized():
        return context()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run a single process.")
    want_cpu = device is not None and torch.device(device).type == "cpu"
    local = env_int("LOCAL_RANK", 0)
    if torch.cuda.is_available() and not want_cpu:
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) are visible; launch "
                               "torchrun with --nproc_per_node <= the number of GPUs.")
        torch.cuda.set_device(local)
        dev, backend = torch.device("cuda", local), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend=backend, timeout=timeout,
                            **({"device_id": dev} if backend == "nccl" else {}))
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), local, dev)
    log.info("rank %d/%d (local %d) on %s, backend %s", ctx.rank, ctx.world_size, local, dev, backend)
    return ctx


def shutdown(wait_for_peers: bool = True) -> None:
    """Leave the process group if this process joined one. Under gloo the ranks first meet once
    more (``wait_for_peers``), so none tears its connections down while a peer is still using them
    (a rank leaving early could abort another at exit). A peer that is gone already is not waited
    for; one still working (rank 0 writing a large output) is, for up to ``SHUTDOWN_WAIT`` on rank 0
    (other ranks wait up to the group's timeout: gloo's barrier takes no shorter one there). A rank
    that stopped with an error passes ``wait_for_peers=False``: its peers may be blocked in a
    collective it will never join, and its exit is what lets torchrun stop them."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "gloo" and wait_for_peers:
            with contextlib.suppress(RuntimeError):
                dist.monitored_barrier(timeout=SHUTDOWN_WAIT)
        dist.destroy_process_group()


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous rows ``[start, stop)`` of rank ``rank``: the first ``n % world_size`` ranks get one extra row."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def wrap_model(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """``model`` on ``ctx.device`` wrapped in DistributedDataParallel (its forward(batch, seed) is
    the training loss); unchanged in a single process. DDP broadcasts rank 0's parameters and
    buffers at construction, so every rank starts from the same weights (teacher included)."""
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    model.to(ctx.device)
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)
