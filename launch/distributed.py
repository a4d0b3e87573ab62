"""Process-group setup and the few collectives the training stage needs (CPU/gloo and GPU/nccl alike).

One entry point serves every launcher: `deepspeed --num_gpus N`, `torchrun`, `accelerate launch`, and plain
`srun` with one task per GPU (SLURM_* variables are mapped to RANK/WORLD_SIZE/LOCAL_RANK when no launcher set
them; MASTER_ADDR/MASTER_PORT must then be exported by the job script).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch

from launch.process import free_port


@dataclass
class Dist:
    """Where this process sits in the job."""

    rank: int
    """Global rank."""
    world_size: int
    """Number of ranks."""
    local_rank: int
    """Rank on this node (selects the GPU)."""
    configured: bool
    """True when accelerate's PartialState was initialised here (training args must then use it)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def map_slurm_env() -> None:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK from Slurm when `srun` started one task per rank without a launcher."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    ntasks = int(os.environ.get("SLURM_NTASKS", "1"))
    if ntasks <= 1 or "MASTER_ADDR" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = str(ntasks)
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_PORT", "29500")


def init(deepspeed: bool) -> Dist:
    """Initialise the process group when there is more than one rank or DeepSpeed is requested."""
    map_slurm_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not deepspeed:
        return Dist(rank=0, world_size=1, local_rank=0, configured=False)
    if deepspeed:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    if world <= 1:
        # DeepSpeed needs a process group even for one rank
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    from accelerate import PartialState

    if torch.cuda.is_available():
        state = PartialState()
    elif deepspeed:
        # without a GPU accelerate picks no backend and believes world_size=1 (then gloo all-gathers fail at step 1)
        state = PartialState(backend="gloo")
    else:
        # plain torchrun on CPU: without cpu=True accelerate reports DistributedType.NO, the Trainer then skips DDP
        # and every rank trains its own copy on its own data shard (measured: TrainingArguments.parallel_mode
        # was NOT_PARALLEL with two gloo ranks)
        state = PartialState(cpu=True, backend="gloo")
    return Dist(rank=state.process_index, world_size=state.num_processes, local_rank=state.local_process_index,
                configured=True)


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any rank (a MAX all-reduce)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    if torch.distributed.get_backend() == "gloo":
        device = torch.device("cpu")
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def broadcast_error(message: str | None) -> str | None:
    """Share rank 0's error message (or None) with every rank, so all ranks fail together."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return message
    box = [message]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1; the trainer checks it at every step end (agreed across ranks)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None

    def install(self) -> dict:
        """Install the handlers; returns the previous ones (for `restore`)."""
        return {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    @staticmethod
    def restore(previous: dict) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, _frame) -> None:
        # only record it: the training loop stops at a step boundary every rank agrees on
        self.received = signum

    @property
    def set(self) -> bool:
        return self.received is not None
