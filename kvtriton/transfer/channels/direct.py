"""The direct channel: one kernel moves KV from the sender's paged pool into the receiver's.

No staging buffer, no packed bytes, no per-block descriptors: the receiver maps each
sender's pools into its own address space once (CUDA IPC, exchanged at connect as explicit
handle bytes and metadata, never pickled), and for each request runs ONE prepared copy per
chunk that reads the sender's blocks and writes its own, with prefix-offset alignment, block
size mismatch, NHD/HND conversion and TP/PP head/layer selection in the same pass.

Direction: the receiver *pulls*. Its kernel writes only its own memory, and the only thing a
sender tells it is which of the sender's blocks hold the asked positions (``Blocks``), which
the receiver checks against the mapped pool's shape before any kernel uses them; the mapped
view itself was checked against the real size of the mapped allocation at connect. Pull and
push run the same kernel at the same rate on one device (BENCHMARKS.md).

Ordering: the sender records a CUDA event when a source is registered (and, streaming, each
time layers are marked written); a completion thread watches it, and the sender announces a
chunk (``Blocks``) only once the event of its layers fired, so the receiver copies at once
and never opens another process's event (measured: each interprocess event open costs ~0.4
ms). The receiver commits only after its own copy events completed, and the sender keeps the
source leased until the receiver's final word (Ack, or Cancel after an error), which it
sends only after its last copy of that request completed.

:class:`CudaIpcMemory` maps real CUDA pools; :class:`LocalMemory` lets agents of one process
(the loopback world, CPU tests) run the same channel logic on CPU tensors.
"""

from __future__ import annotations

import contextlib
import ctypes
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Protocol

import torch

from kvtriton.ranges import BlockSpan
from kvtriton.spec import KVCacheSpec
from kvtriton.target import TransferTarget
from kvtriton.transfer import protocol as P
from kvtriton.transfer.channels.base import DataChannel
from kvtriton.transfer.jobs import Handed, Landed, RecvJob, SendJob, WriteDone
from kvtriton.transfer.moves import PoolSet, prepare_copy
from kvtriton.transfer.trace import trace

#: The receiver's loop waits in place for the copies it just launched when they hold at most
#: _SPIN_BYTES (a 1-block copy lands ~10 us after its launch on an H200, 8 MiB in ~15 us;
#: the completion thread's round trip costs ~0.2 ms), for at most _SPIN_S seconds (the GPU
#: may be busy with other work): then the completion thread takes over. Larger copies go
#: to the thread at once, so the loop stays free for other requests meanwhile.
_SPIN_BYTES = 8 << 20
_SPIN_S = 200e-6

__all__ = ["CudaIpcMemory", "DirectChannel", "LocalMemory", "PeerMemory"]


class PeerMemory(Protocol):
    """How a rank shares its pools with peers and maps theirs."""

    def export(self, pools: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
        """Handle fields per group (see :class:`~kvtriton.transfer.protocol.PoolHandles`)."""
        ...

    def open(self, peer: int, group: str, fields: Mapping[str, Any]) -> torch.Tensor:
        """The peer's pool tensor of ``group``, viewed as the fields say, after checking the
        view lies inside what was really mapped (``ValueError`` otherwise)."""
        ...

    def close(self) -> None: ...


def _view_extent(fields: Mapping[str, Any], itemsize: int) -> int:
    """Bytes from the storage start to one past the view's last element."""
    end = fields["storage_offset"]
    for n, st in zip(fields["shape"], fields["stride"], strict=True):
        end += (n - 1) * st
    return (end + 1) * itemsize


def _fields(t: torch.Tensor) -> dict[str, Any]:
    return {
        "dtype": str(t.dtype).removeprefix("torch."),
        "shape": list(t.shape),
        "stride": list(t.stride()),
        "storage_offset": t.storage_offset(),
    }


class LocalMemory:
    """In-process "mapping": a peer's pools are looked up by a random token (CPU tests)."""

    registry: ClassVar[dict[bytes, torch.Tensor]] = {}

    def export(self, pools: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
        out = {}
        for g, t in pools.items():
            token = secrets.token_bytes(16)
            self.registry[token] = t
            out[g] = {
                **_fields(t), "device": 0, "handle": token, "size": t.untyped_storage().nbytes(),
                "offset": 0, "ref_handle": b"", "ref_offset": 0, "event": b"",
                "event_sync": False,
            }  # fmt: skip
        return out

    def open(self, peer: int, group: str, fields: Mapping[str, Any]) -> torch.Tensor:
        base = self.registry.get(fields["handle"])
        if base is None:
            raise ValueError(f"rank {peer} group {group!r}: unknown handle")
        storage = base.untyped_storage()
        if fields["size"] > storage.nbytes():
            raise ValueError(
                f"rank {peer} group {group!r}: claims {fields['size']} bytes, the "
                f"mapped storage has {storage.nbytes()}"
            )
        dtype = getattr(torch, fields["dtype"])
        return _build(storage, dtype, fields, peer, group)

    def close(self) -> None:
        pass


def _build(
    storage: Any, dtype: torch.dtype, fields: Mapping[str, Any], peer: int, group: str
) -> torch.Tensor:
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if _view_extent(fields, itemsize) > fields["size"]:
        raise ValueError(
            f"rank {peer} group {group!r}: a view of shape {list(fields['shape'])} and strides "
            f"{list(fields['stride'])} reaches past the {fields['size']} mapped bytes"
        )
    t = torch.empty(0, dtype=dtype, device=storage.device)
    t.set_(storage, fields["storage_offset"], tuple(fields["shape"]), tuple(fields["stride"]))
    return t


class CudaIpcMemory:
    """CUDA IPC through torch's storage sharing (the handle of the allocation block, its size
    and offset, torch's reference counter and sync event), with every field sent as plain
    bytes/ints. :meth:`open` checks the claimed size against the real size of the mapped
    allocation (``cuMemGetAddressRange``), so a peer cannot make this rank read outside it."""

    def __init__(self) -> None:
        self._opened: list[Any] = []

    def export(self, pools: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
        out = {}
        for g, t in pools.items():
            (device, handle, size, offset, ref_handle, ref_offset, event, event_sync) = (
                t.untyped_storage()._share_cuda_()
            )
            out[g] = {
                **_fields(t), "device": int(device), "handle": bytes(handle), "size": int(size),
                "offset": int(offset), "ref_handle": bytes(ref_handle),
                "ref_offset": int(ref_offset), "event": bytes(event or b""),
                "event_sync": bool(event_sync),
            }  # fmt: skip
        return out

    def open(self, peer: int, group: str, fields: Mapping[str, Any]) -> torch.Tensor:
        dtype = getattr(torch, fields["dtype"])
        storage = torch.UntypedStorage._new_shared_cuda(
            torch.cuda.current_device(),
            fields["handle"],
            fields["size"],
            fields["offset"],
            fields["ref_handle"],
            fields["ref_offset"],
            fields["event"] or None,
            fields["event_sync"],
        )
        self._opened.append(storage)
        base, real = _allocation_range(storage.data_ptr())
        if storage.data_ptr() + fields["size"] > base + real:
            raise ValueError(
                f"rank {peer} group {group!r}: claims {fields['size']} bytes at offset "
                f"{fields['offset']}, the mapped allocation holds {real} bytes"
            )
        return _build(storage, dtype, fields, peer, group)

    def close(self) -> None:
        self._opened.clear()


def _allocation_range(ptr: int) -> tuple[int, int]:
    """``(base, size)`` of the CUDA allocation holding ``ptr`` (driver API)."""
    lib = ctypes.CDLL("libcuda.so.1")
    fn = lib.cuMemGetAddressRange_v2
    fn.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t),
                   ctypes.c_uint64]  # fmt: skip
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    err = fn(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr))
    if err != 0:
        raise ValueError(f"cuMemGetAddressRange failed (CUresult {err}) for a mapped pool")
    return int(base.value), int(size.value)


class DirectChannel(DataChannel):
    """Receiver-pull copies from peers' mapped pools (see the module docstring).

    Args:
        memory: how pools are shared and mapped (:class:`CudaIpcMemory` on CUDA,
            :class:`LocalMemory` in one process).
        device: this rank's device (CUDA: copies run on a stream of their own and a
            completion thread reports them; CPU: copies run synchronously).
    """

    name = "ipc"
    checksums = False
    announce_ends = True  # the receiver pulls: once it holds every block id, nothing is owed

    def __init__(self, memory: PeerMemory, device: torch.device | str) -> None:
        super().__init__()
        self.memory = memory
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._remote: dict[int, PoolSet] = {}
        self._unmapped: dict[int, str] = {}  # peer -> why its pools could not be mapped
        self._pending = 0
        if self.cuda:
            from kvtriton.transfer.channels.cuda import Completions

            self.copy_stream = torch.cuda.Stream(self.device)
            self._done = Completions("kvtr-ipc-copies")
            self._markers = Completions("kvtr-ipc-written")

    # -- set-up ----------------------------------------------------------------------------
    def connect_start(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Send this rank's pool handles to every receiver that reads from it."""
        host = self._host
        rank = host.rank
        handles = P.PoolHandles(rank, self.memory.export(host.pools.pools))
        for peer in sorted({r for s, r in pairs if s == rank}):
            host.control.send(peer, handles)

    def connect_finish(self, pairs: Sequence[tuple[int, int]], timeout_s: float = 60.0) -> None:
        """Map the pools of every sender this rank reads from."""
        host = self._host
        rank = host.rank
        need = {s for s, r in pairs if r == rank}
        got: dict[int, P.PoolHandles] = {}
        deadline = time.monotonic() + timeout_s
        while need - got.keys():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"rank {rank}: no pool handles from ranks "
                    f"{sorted(need - got.keys())} within {timeout_s} s"
                )
            for peer, msg in host.control.poll(0.1):
                if isinstance(msg, P.PoolHandles) and peer in need:
                    got[peer] = msg
                elif not isinstance(msg, P.PoolHandles):
                    raise P.ProtocolError(
                        f"rank {rank}: a {type(msg).__name__} from rank "
                        f"{peer} before the direct channel was connected"
                    )
        for peer in sorted(need):
            try:
                self._remote[peer] = self._map(peer, got[peer], host.topology.spec(peer))
            except ValueError as exc:  # another model: its requests are refused anyway
                self._unmapped[peer] = str(exc)

    def _map(self, peer: int, msg: P.PoolHandles, spec: KVCacheSpec) -> PoolSet:
        if msg.rank != peer:
            raise P.ProtocolError(f"rank {peer} sent pool handles in the name of rank {msg.rank}")
        missing = sorted(set(spec.group_names) - set(msg.pools))
        extra = sorted(set(msg.pools) - set(spec.group_names))
        if missing or extra:
            raise ValueError(
                f"rank {peer}: pool handles for groups {sorted(msg.pools)}, its "
                f"shard holds {list(spec.group_names)}"
            )
        tensors = {}
        for g in spec.groups:
            fields = msg.pools[g.name]
            want = g.item_dtype(spec.dtype)
            if fields["dtype"] != want:
                raise ValueError(
                    f"rank {peer} group {g.name!r}: dtype {fields['dtype']}, the "
                    f"topology says {want}"
                )
            tensors[g.name] = self.memory.open(peer, g.name, fields)
        return PoolSet(spec, tensors)  # checks shapes and strides against the shard spec

    # -- sender ---------------------------------------------------------------------------
    def ready_marker(self) -> Any:
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._markers.add(event, self._host.control.wake)  # the sender pumps once it fired
        return event

    def marker_done(self, marker: Any) -> bool:
        # announce only KV that is written: the receiver then copies at once, without
        # opening another process's event (each cuIpcOpenEventHandle costs ~0.4 ms)
        return marker is None or bool(marker.query())

    def chunk_bytes(self, requested: int) -> int:
        return P.MAX_CHUNK_BYTES  # one copy per request: nothing is staged

    def capacity(self, peer: int) -> int:
        return 1 << 30  # nothing staged on this side

    def schedule(self, job: SendJob, count: int) -> None:
        req = job.request
        first = job.scheduled
        blocks: dict[str, Any] = {}
        slots: dict[str, int] = {}
        if first == 0:  # the block ids go once; later Blocks only open more chunks
            blocks = {g: job.target.kv[g].ids_for(rng) for g, rng in req.tokens.items()}
            slots = {g: job.target.state_slots[g] for g in req.states}
            job.remote_lease = True  # the receiver reads the blocks until its final word
            job.in_flight += 1
        self._host.control.send(
            job.peer, P.Blocks(job.request_id, blocks, slots, b"", first, count)
        )
        job.scheduled = job.handed = first + count
        if job.handed == len(job.chunks) and not req.checksum:
            job.done_sent = True  # this Blocks doubles as the Done (announce_ends)
        self._events.put(Handed(job))

    # -- receiver -------------------------------------------------------------------------
    def on_announce(self, job: RecvJob, message: P.Schedule | P.Blocks) -> str | None:
        if not isinstance(message, P.Blocks):
            return f"a {type(message).__name__} on the direct channel"
        n = len(job.chunks)
        if message.first != job.posted or not 0 < message.count <= n - message.first:
            return (
                f"chunks [{message.first}, {message.first + message.count}) opened, "
                f"expected from {job.posted} of {n}"
            )
        if job.posted == 0:
            error = self._prepare(job, message)
            if error is not None:
                return error
        elif message.block_ids or message.slots:
            return "block ids after the request's first Blocks"
        self._copy(job, message.first, message.count, message.event)
        return None

    def _prepare(self, job: RecvJob, message: P.Blocks) -> str | None:
        """Check the sender's block ids against its mapped pool and prepare the copy."""
        remote = self._remote.get(job.peer)
        if remote is None:
            why = self._unmapped.get(job.peer, "no handles arrived")
            return f"Blocks from a rank whose pools are not mapped ({why})"
        req = job.request
        if set(message.block_ids) != set(req.tokens) or set(message.slots) != set(req.states):
            return (
                f"Blocks for groups {sorted(message.block_ids)} / states "
                f"{sorted(message.slots)}; asked for {sorted(req.tokens)} / "
                f"{sorted(req.states)}"
            )
        bsz = remote.spec.tokens_per_block
        spans = {}
        for g, rng in req.tokens.items():
            ids = message.block_ids[g]
            if len(ids) != len(rng.blocks(bsz)):
                return (
                    f"group {g!r}: {len(ids)} block ids for positions {rng}, which touch "
                    f"{len(rng.blocks(bsz))} blocks of {bsz} tokens"
                )
            spans[g] = BlockSpan(rng.start // bsz, ids.tolist())
        try:
            src = TransferTarget.from_spans(
                req.request_id, req.num_tokens, req.tokens, spans, dict(message.slots),
                tokens_per_block=bsz, num_blocks={g: remote.num_blocks(g) for g in req.tokens},
                num_slots={g: remote.num_slots(g) for g in req.states}, destination=False,
            )  # fmt: skip
            host = self._host
            layouts = [c.layout for c in job.chunks]
            trace("prepare", req.request_id)
            # staged on the copy stream, which runs it: no cross-stream join per request
            with torch.cuda.stream(self.copy_stream) if self.cuda else contextlib.nullcontext():
                job.moves = prepare_copy(
                    remote, src, host.pools, job.handle.target, layouts, host.options.backend
                )
        except ValueError as exc:
            return str(exc)
        return None

    def _copy(self, job: RecvJob, first: int, count: int, event: bytes) -> None:
        """Copy chunks ``[first, first + count)`` into this rank's pools (only while the
        request is live; the bytes of a request that ended are not read)."""
        job.posted = first + count
        live = job.live
        host = self._host
        if not self.cuda:
            for k in range(first, first + count):
                if live:
                    job.moves.run(k)
                    host.counters["bytes_received"] += job.chunks[k].nbytes
                self._events.put(Landed(job, k, live))
            return
        with torch.cuda.stream(self.copy_stream):
            if event:
                ready = torch.cuda.Event.from_ipc_handle(self.device, event)
                self.copy_stream.wait_event(ready)  # the sender's KV is written
            launched = []
            for k in range(first, first + count):
                if live:
                    job.moves.run(k)
                    job.pending += 1
                    host.counters["bytes_received"] += job.chunks[k].nbytes
                done = torch.cuda.Event()
                done.record(self.copy_stream)
                trace("launched", job.request_id)
                self._pending += 1
                launched.append((done, _landed(self, job, k, live)))
        # Small copies finish within microseconds of their launch: wait for them here,
        # briefly, rather than through the completion thread (its wake-up, the callback and
        # the wake of this loop cost ~0.2 ms on the H200 host). Only when nothing waits in
        # that thread (Landed stays in launch order) and no peer event gates the copy.
        small = sum(job.chunks[k].nbytes for k in range(first, first + count)) <= _SPIN_BYTES
        if small and not event and self._done.outstanding == 0:
            last = launched[-1][0]
            until = time.perf_counter() + _SPIN_S
            while not last.query():
                if time.perf_counter() > until:
                    break
            else:
                for _, landed in launched:
                    landed()
                return
        for done, landed in launched:
            self._done.add(done, landed)

    def events(self) -> list[Any]:
        out = super().events()
        self._pending -= sum(isinstance(ev, Landed) for ev in out) if self.cuda else 0
        return out

    def busy(self) -> bool:
        return self._pending > 0

    def close(self) -> None:
        if self.cuda:
            if not self.busy():
                torch.cuda.synchronize(self.device)
            self._done.close()
            self._markers.close()
        self._remote.clear()
        self.memory.close()

    def describe(self) -> dict[str, Any]:
        where = torch.cuda.get_device_name(self.device) if self.cuda else "cpu"
        return {"channel": self.name, "device": where}


def _landed(ch: DirectChannel, job: RecvJob, k: int, written: bool) -> Any:
    def done() -> None:
        if written:
            ch._post(WriteDone(job))
        ch._post(Landed(job, k, written))

    return done
