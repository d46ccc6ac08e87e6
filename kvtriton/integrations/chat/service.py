"""The chat over ``torch.distributed``: :class:`AgentContext` (generation rank) asks a
:class:`~kvtriton.transfer.agent.TransferAgent` for the KV and sends prompts over a small
"router" channel; :func:`serve_context` is the context rank's loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from kvtriton.adapter import ReceivePlan
from kvtriton.integrations.chat.workers import ContextWorker

if TYPE_CHECKING:
    import torch


_PREFILL, _STOP = 1, 2


def _send_ints(values: Sequence[int], dst: int, group: Any) -> None:
    import torch
    import torch.distributed as dist

    data = torch.tensor([len(values), *values], dtype=torch.long)
    dist.send(data[:1].clone(), dst, group=group)
    dist.send(data[1:].clone(), dst, group=group)


def _recv_ints(src: int, group: Any) -> list[int]:
    import torch
    import torch.distributed as dist

    n = torch.empty(1, dtype=torch.long)
    dist.recv(n, src, group=group)
    data = torch.empty(int(n), dtype=torch.long)
    dist.recv(data, src, group=group)
    return [int(x) for x in data]


class AgentContext:
    """A :class:`ContextService` on another rank: the KV moves through the receiver's
    :class:`kvtriton.transfer.agent.TransferAgent` (protocol, sessions, chunked
    pipelining); prompts and logits go over ``router_group``.

    Args:
        agent: this (generation) rank's agent; its pools are the generation worker's pools.
        router_group: a gloo group shared with the context rank (not the agent's groups).
        peers: the context ranks (global ranks; several under context TP/PP: each prefills
            and serves its own heads and layers, the agent asks each for its part).
        vocab_size: length of the logits row the context rank sends back.
        timeout_s: how long to wait for one request's transfer.
        streaming: layer-wise streaming: the context rank registers the source before its
            prefill and marks each layer as its forward writes it; this rank asks at once
            (layer-major chunks, ``TransferOptions.layer_chunks``) and receives while the
            prefill runs.
    """

    def __init__(
        self,
        agent: Any,
        router_group: Any,
        peers: Sequence[int],
        vocab_size: int,
        *,
        timeout_s: float = 60.0,
        streaming: bool = False,
    ) -> None:
        self.agent = agent
        self.router_group = router_group
        self.peers = tuple(peers)
        if not self.peers:
            raise ValueError("AgentContext needs at least one context rank")
        self.vocab_size = vocab_size
        self.timeout_s = timeout_s
        self.streaming = streaming
        self._digests: dict[str, str] = {}
        self._handles: dict[str, Any] = {}

    def prefill(
        self,
        request_id: str,
        prompt: Sequence[int],
        *,
        send: bool = True,
        receive: ReceivePlan | None = None,
    ) -> torch.Tensor:
        import threading

        import torch
        import torch.distributed as dist

        from kvtriton.transfer.protocol import prompt_digest

        self._digests[request_id] = prompt_digest(prompt)
        stream = self.streaming and send and receive is not None
        rid = list(request_id.encode())
        for peer in self.peers:
            msg = [_PREFILL, int(send), int(stream), len(rid), *rid, *prompt]
            _send_ints(msg, peer, self.router_group)
        rows = [torch.empty(self.vocab_size, dtype=torch.float32) for _ in self.peers]
        if not stream:
            for peer, row in zip(self.peers, rows, strict=True):
                dist.recv(row, peer, group=self.router_group)
        else:
            for peer in self.peers:  # each context rank registered its streamed source
                _recv_ints(peer, self.router_group)
            assert receive is not None
            self._handles[request_id] = self.agent.request(
                receive.target, prompt_digest=self._digests.pop(request_id), mode=receive.mode
            )
            # receive the layers while the prefill runs; the logits come when it ends
            works = [
                dist.irecv(row, peer, group=self.router_group)
                for peer, row in zip(self.peers, rows, strict=True)
            ]
            done = threading.Event()
            waiter = threading.Thread(
                target=lambda: ([w.wait() for w in works], done.set()), daemon=True
            )
            waiter.start()
            while not done.is_set():
                self.agent.progress(0.002)
            waiter.join()
        for peer, row in zip(self.peers[1:], rows[1:], strict=True):
            if not torch.equal(row, rows[0]):
                raise RuntimeError(
                    f"request {request_id!r}: context ranks {self.peers[0]} and "
                    f"{peer} disagree on the first token's logits"
                )
        return rows[0]

    def transfer(self, request_id: str, rx: ReceivePlan, pools: Mapping[str, torch.Tensor]) -> int:
        from kvtriton.transfer.session import SessionState

        for name, tensor in pools.items():
            if self.agent.pools.pools.get(name) is not tensor:
                raise ValueError(
                    f"request {request_id!r}: pool {name!r} is not the agent's "
                    "pool; build the agent over the generation worker's pools"
                )
        handle = self._handles.pop(request_id, None)
        if handle is None:
            handle = self.agent.request(
                rx.target, prompt_digest=self._digests.pop(request_id), mode=rx.mode
            )
        done = self.agent.wait([request_id], timeout=self.timeout_s)
        if not done:
            self.agent.cancel(request_id, f"no transfer within {self.timeout_s} s")
            self.agent.wait([request_id], timeout=self.timeout_s)
        state, error = handle.state, handle.session.error
        self.agent.forget(request_id)
        if state is not SessionState.TRANSFERRED:
            raise RuntimeError(f"request {request_id!r}: transfer ended {state.value}: {error}")
        return int(handle.bytes_received)

    def stop(self) -> None:
        """Tell :func:`serve_context` on every context rank to return."""
        for peer in self.peers:
            _send_ints([_STOP], peer, self.router_group)


def serve_context(
    worker: ContextWorker, agent: Any, router_group: Any, peer: int, *, timeout_s: float = 60.0
) -> int:
    """Context rank loop: prefill what ``peer`` asks for, serve its transfer, free, repeat.

    Returns the number of requests served; ends when the peer sends stop.
    """
    import torch.distributed as dist

    from kvtriton.adapter import source_target
    from kvtriton.transfer.protocol import prompt_digest

    served = 0
    finished: set[str] = set()
    while True:
        msg = _recv_ints(peer, router_group)
        if msg[0] == _STOP:
            return served
        if msg[0] != _PREFILL:
            raise ValueError(f"unknown router message {msg[0]} from rank {peer}")
        send, stream, n = bool(msg[1]), bool(msg[2]), msg[3]
        request_id = bytes(msg[4 : 4 + n]).decode()
        prompt = msg[4 + n :]

        def register(streamed: bool, rid: str = request_id, prompt: list[int] = prompt) -> None:
            agent.register_source(
                source_target(worker.manager, rid),
                prompt_digest=prompt_digest(prompt),
                on_release=lambda r, _states: finished.add(r),
                streamed=streamed,
            )

        def registered() -> None:  # streamed: the source exists before the prefill runs
            register(True)
            _send_ints([1], peer, router_group)

        def layer_ready(layer: int, rid: str = request_id) -> None:
            agent.mark_ready(rid, [layer])
            agent.progress(0.0)  # this layer's chunks go while the next layer computes

        try:
            if stream:
                logits = worker.prefill(
                    request_id, prompt, on_allocated=registered, on_layer=layer_ready
                )
            else:
                logits = worker.prefill(request_id, prompt)
                if send:
                    register(False)
            dist.send(logits.contiguous(), peer, group=router_group)
            if send and not agent.serve(
                until=lambda rid=request_id: rid in finished, timeout=timeout_s
            ):
                raise RuntimeError(
                    f"request {request_id!r}: the receiver did not finish its "
                    f"transfer within {timeout_s} s"
                )
        finally:
            worker.release(request_id)
        served += 1
