"""Rank 0 decides, every rank follows: the one way a launch of several processes does a piece of work once (hash a
checkpoint, write a file, compute a reference) and goes on, or stops with the same message, on every rank."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ditpipe.pipeline.errors import DitpipeError


@dataclass(frozen=True)
class Group:
    """The collectives rank 0's decisions need; the defaults are one process's. Every decision that changes
    what the ranks do next (keep, write, fail) is rank 0's, broadcast: ranks that looked for themselves could
    disagree (NFS attribute caching) and then run different numbers of barriers, which hangs NCCL."""

    rank: int = 0
    broadcast: Callable[[object], object] = lambda value: value  # rank 0's value, returned on every rank
    gather: Callable[[object], list] = lambda value: [value]  # every rank's value, on every rank

    def on_rank0(self, work: Callable[[], object], error: type[DitpipeError] = DitpipeError, share: bool = True):
        """work() on rank 0 alone (hashing gigabytes, writing a file, computing a reference), its result returned on
        every rank (`share`; else on rank 0, None elsewhere: a result too large to send); when it raises `error`,
        rank 0 raises it and every other rank one with the same message, so all ranks go on, or stop, together."""
        answer, failed = None, None
        if self.rank == 0:
            try:
                answer = (work(), None)
            except error as e:
                answer, failed = (None, str(e)), e
        mine = answer[0] if answer else None
        result, failure = self.broadcast(answer if share or failed is not None else (None, None))
        if failed is not None:
            raise failed
        if failure is not None:
            raise error(failure)
        return result if share else mine


def group_of(acc) -> Group:
    """The collectives of accelerate's process group (`acc`, an Accelerator); one process's without one."""
    if acc.num_processes == 1:
        return Group()
    from accelerate.utils import broadcast_object_list, gather_object

    return Group(acc.process_index, lambda value: broadcast_object_list([value], from_process=0)[0],
                 lambda value: gather_object([value]))


def torch_group(rank: int, world: int) -> Group:
    """The collectives of torch.distributed's default group (a sample, evaluate or train launch), one process's
    without one."""
    if world == 1:
        return Group()
    import torch.distributed as dist

    def broadcast(value):
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(value):
        out = [None] * world
        dist.all_gather_object(out, value)
        return out

    return Group(rank, broadcast, gather)
