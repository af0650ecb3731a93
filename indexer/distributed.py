"""The processes of one build (or valuation) under `torchrun`: rank and world size from the environment, the
process group (gloo on CPU; nccl for CUDA tensors, gloo for the rest, when the device is a GPU),
sums over processes, and agreement on failure.

A single process (no WORLD_SIZE, or 1) gets `Processes()`: rank 0 of 1, no process group, and
every collective below is the identity, so a one-process build runs exactly as it always did.

Failure policy. Every process reads every record, so an input error (a malformed record, a
duplicate id, a bad option: `ValueError`, `FileExistsError`) reaches all of them within about a
shard of each other; at the end of a `step` they agree on it, rank 0 discards the partial build,
and all exit with the error. Any other failure (out of memory, a crash) stops that process at once,
without waiting: torchrun then stops the others, the partial build stays, and the same command
resumes it. A process stuck in a collective gives up after LOGRA_DIST_TIMEOUT_S seconds (1800).
"""
from __future__ import annotations

import datetime
import os
from contextlib import contextmanager

import torch

from engine import resolve_device

OK, KEEP, DISCARD = 0, 1, 2  # a process's state at a step's end: fine, failed (resumable), failed (input error)
INPUT_ERRORS = (ValueError, FileExistsError)  # a rerun needs other data or options: nothing to resume


class PeerFailed(RuntimeError):
    """Another process of this build failed; its own error is printed by that process."""

    def __init__(self, code: int):
        super().__init__("stopped: another process of this build failed (its error is printed above)")
        self.code = code


def is_input_error(e: BaseException) -> bool:
    """Whether `e` (here or in another process) means the partial build is worth nothing."""
    return isinstance(e, INPUT_ERRORS) or (isinstance(e, PeerFailed) and e.code == DISCARD)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


class Processes:
    """This process's place among the build's processes, and the collectives the build uses."""

    def __init__(self, rank: int = 0, world: int = 1, device: str = "cpu", owns_group: bool = False):
        self.rank, self.world, self.device = rank, world, device
        self._owns_group = owns_group
        self._together = world > 1  # every process still takes the same collective steps

    @classmethod
    def from_env(cls, device: str) -> "Processes":
        """One process, or this rank of a torchrun launch (WORLD_SIZE, RANK, LOCAL_RANK and the
        rendezvous variables it sets). With a CUDA device each process takes cuda:LOCAL_RANK."""
        world = world_size()
        if world == 1:
            return cls(device=device)
        import torch.distributed as dist
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        on_gpu = resolve_device(device).type == "cuda"
        if on_gpu:
            if device not in ("cuda", "auto"):
                raise ValueError(f"under torchrun each process uses cuda:LOCAL_RANK; pass --device cuda, not {device!r}")
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        owns = not dist.is_initialized()  # a caller's own process group is used as it is, and left open
        if owns:
            timeout = datetime.timedelta(seconds=float(os.environ.get("LOGRA_DIST_TIMEOUT_S", "1800")))
            dist.init_process_group("cpu:gloo,cuda:nccl" if on_gpu else "gloo", timeout=timeout)
        if dist.get_world_size() != world:
            raise RuntimeError(f"WORLD_SIZE is {world} but the process group has {dist.get_world_size()} processes")
        return cls(rank=dist.get_rank(), world=world, device=device, owns_group=owns)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The float64 sum of `tensor` over all processes (nccl carries it when on a GPU)."""
        if self.world == 1:
            return tensor
        import torch.distributed as dist
        t = tensor.to(self.device if self.device.startswith("cuda") else "cpu", torch.float64)
        dist.all_reduce(t)
        return t.cpu()

    def total(self, counts: dict[str, int]) -> dict[str, int]:
        """Integer counts summed over all processes."""
        summed = self.sum(torch.tensor([float(v) for v in counts.values()], dtype=torch.float64))
        return {k: int(v) for k, v in zip(counts, summed.tolist())}

    def gather(self, obj):
        """Every process's `obj` (e.g. a numpy array), in rank order, in every process."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, make):
        """What `make()` returns on rank 0, in every process (e.g. a fitted state every process must
        use as it is); only rank 0 calls `make`."""
        if self.world == 1:
            return make()
        import torch.distributed as dist
        box = [make() if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def most(self, value: float) -> float:
        """The largest of one number over all processes (e.g. the slowest one's seconds)."""
        if self.world == 1:
            return value
        import torch.distributed as dist
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def _agree(self, code: int) -> int:
        return int(self.most(code)) if self._together else code

    @contextmanager
    def step(self):
        """Work every process does side by side, ending in agreement: if an input error stopped
        any of them, every one raises (`PeerFailed` where it was not its own). Other failures
        raise at once, without waiting for the others."""
        try:
            yield
        except INPUT_ERRORS:
            self._agree(DISCARD)
            raise
        except BaseException:
            self._together = False  # the others learn from torchrun, or from a closed connection
            raise
        worst = self._agree(OK)
        if worst != OK:
            raise PeerFailed(worst)

    def failed(self, e: BaseException) -> None:
        """After rank 0 has cleaned up for error `e`: the other processes wait for that before
        they exit (torchrun stops every process once one has exited with an error)."""
        if self._together and is_input_error(e):
            self.most(0)  # a barrier, on the CPU (gloo) whatever the device

    def part(self) -> None:
        """From here rank 0 goes on alone (writing the index); the others are done."""
        self._together = False

    def close(self) -> None:
        if self._owns_group:
            import torch.distributed as dist
            dist.destroy_process_group()
            self._owns_group = False
