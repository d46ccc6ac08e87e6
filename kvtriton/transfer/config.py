"""Configuration dataclasses of the transfer agent and the experiment (pure Python)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvtriton.transfer.chunking import DEFAULT_CHUNK_BYTES

if TYPE_CHECKING:
    from kvtriton.spec import KVCacheSpec

__all__ = ["DisaggConfig", "FaultInjection", "TransferOptions", "add_arguments", "config_from_args"]


@dataclass
class FaultInjection:
    """Deliberate faults of a sender, for tests (all off by default); applied by wrapping the
    data channel (:class:`kvtriton.transfer.faults.FaultyChannel`), never inside the library.

    Attributes:
        die_after_frames: the process is killed once this many chunks left it (0: when
            it is about to send its first chunk, with a request accepted).
        stall: accept requests but never send data (the receiver must time out).
        corrupt_chunk: flip one byte of this chunk index after its checksum was taken.
        frame_delay_s: wait this long between chunks (a slow sender).
    """

    die_after_frames: int | None = None
    stall: bool = False
    corrupt_chunk: int | None = None
    frame_delay_s: float = 0.0

    @property
    def active(self) -> bool:
        return (
            self.die_after_frames is not None
            or self.stall
            or self.corrupt_chunk is not None
            or self.frame_delay_s > 0
        )


@dataclass
class TransferOptions:
    """Tunables of a :class:`~kvtriton.transfer.agent.TransferAgent`.

    Attributes:
        chunk_bytes: target bytes per data chunk (``chunking.DEFAULT_CHUNK_BYTES``).
        timeout_s: per-session deadline in seconds from creation (both sides).
        lease_s: seconds a registered source waits for receivers that have not asked yet
            (default: twice ``timeout_s``).
        checksum: receivers ask senders for per-chunk checksums.
        max_frames_in_flight: chunks handed to the wire and not yet sent, per receiver
            (packed CPU channels; bounds staging memory).
        staging_slots: ring size of the CUDA staging buffers per peer and direction.
        backend: kernel backend (``"auto"``, ``"triton"``, ``"reference"``).
        layer_chunks: receivers ask for layer-major chunks (one layer of one group each), so
            a streamed source can send each layer as soon as it is written.
    """

    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    timeout_s: float = 60.0
    lease_s: float | None = None
    checksum: bool = False
    max_frames_in_flight: int = 4
    staging_slots: int = 4
    backend: str = "auto"
    layer_chunks: bool = False

    def __post_init__(self) -> None:
        for name in ("timeout_s", "lease_s"):
            v = getattr(self, name)
            if v is None and name == "lease_s":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < 1e9):
                raise ValueError(
                    f"TransferOptions.{name} must be a finite number of seconds > 0, got {v!r}"
                )
        for name in ("chunk_bytes", "max_frames_in_flight", "staging_slots"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TransferOptions.{name} must be a positive int, got {v!r}")

    @property
    def lease(self) -> float:
        """Seconds a source is leased for (``lease_s`` or twice the timeout)."""
        return self.lease_s if self.lease_s is not None else 2 * self.timeout_s


@dataclass
class DisaggConfig:
    """One experiment.

    Attributes:
        model: a :class:`KVCacheSpec`, a preset name (``kvtriton.spec.PRESETS``) or a
            Hugging Face config path/name (read with ``kvtriton.hf``).
        ctx_tp, ctx_pp, gen_tp, gen_pp: parallelism of the two sides.
        gen_tokens_per_block: receiver block size (default: the model's).
        dtype: pool dtype override.
        modes: ``"per_group"`` and/or ``"single_boundary"``: the stream runs once per mode on
            fresh caches.
        conversations, turns: the request stream (each turn extends the previous one).
        first_turn_tokens, turn_tokens: prompt length of turn 1, tokens added per turn
            (0 repeats the prompt: a full hit when it is block-aligned and nothing was
            evicted).
        draft_tokens: speculative positions the receiver allocates past ``P`` (never sent).
        in_flight: requests a receiver keeps in flight at once.
        evict_sliding: evict unreferenced sliding-window blocks after each turn (the pages a
            memory-pressured decoder drops first).
        chunk_bytes, checksum, timeout_s: transfer options.
        ctx_layout, gen_layout: ``"NHD"`` / ``"HND"`` pools on each side.
        channel: the data channel: ``"auto"`` (the direct channel when the ranks' GPUs are on
            one host and can reach each other's memory, NCCL for GPUs otherwise, gloo on
            CPU), ``"gloo"``, ``"nccl"`` or ``"ipc"``.
        kernel_backend: ``kernels`` backend for pack/unpack (``"auto"``/``"reference"``/...).
        devices: under torchrun with NCCL, the GPU of each local rank (default: its local
            rank); several ranks may share a GPU if every sender/receiver pair spans two.
        seed: token ids of the stream.
        faults: ``{rank: FaultInjection}`` (tests).
        cancel: request ids (``"c0t0"``) the receiver cancels right after asking (tests).
        cancel_during: request ids the receiver cancels once their first data arrived.
        gen_dtype: give the generation side a different dtype: a model-digest mismatch that
            the senders must refuse (tests).
    """

    model: str | KVCacheSpec = "tiny-hybrid"
    ctx_tp: int = 1
    ctx_pp: int = 1
    gen_tp: int = 1
    gen_pp: int = 1
    gen_tokens_per_block: int | None = None
    dtype: str | None = None
    modes: tuple[str, ...] = ("per_group", "single_boundary")
    conversations: int = 3
    turns: int = 2
    first_turn_tokens: int = 40
    turn_tokens: int = 21
    draft_tokens: int = 0
    in_flight: int = 4
    evict_sliding: bool = True
    chunk_bytes: int = 8192
    checksum: bool = True
    timeout_s: float = 30.0
    ctx_layout: str = "NHD"
    gen_layout: str = "HND"
    channel: str = "auto"
    kernel_backend: str = "auto"
    seed: int = 0
    devices: tuple[int, ...] = ()
    faults: dict[int, FaultInjection] = field(default_factory=dict)
    cancel: tuple[str, ...] = ()
    cancel_during: tuple[str, ...] = ()
    gen_dtype: str | None = None

    @property
    def world_size(self) -> int:
        return self.ctx_tp * self.ctx_pp + self.gen_tp * self.gen_pp


# ---------------------------------------------------------------------------------------
# command-line options (shared by scripts/disagg.py and `kvtriton demo`)
# ---------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the disaggregated experiment (no torch import)."""
    d = DisaggConfig()
    p.add_argument(
        "--model",
        default=d.model,
        help="preset name or Hugging Face config (path, class or model_type); default %(default)s",
    )
    for side in ("ctx", "gen"):
        for dim in ("tp", "pp"):
            p.add_argument(
                f"--{side}-{dim}",
                type=_positive,
                default=1,
                metavar="N",
                help=f"{'context' if side == 'ctx' else 'generation'} side "
                f"{dim.upper()} size (default 1)",
            )
    p.add_argument(
        "--gen-block-size",
        type=_positive,
        default=None,
        metavar="B",
        help="receiver tokens_per_block (default: the model's)",
    )
    p.add_argument("--dtype", default=None, help="pool dtype override (e.g. bfloat16)")
    p.add_argument(
        "--modes",
        default="per_group,single_boundary",
        help="comma-separated reuse modes to run (default %(default)s)",
    )
    p.add_argument("--conversations", type=_positive, default=d.conversations)
    p.add_argument("--turns", type=_positive, default=d.turns)
    p.add_argument("--first-turn-tokens", type=_positive, default=d.first_turn_tokens)
    p.add_argument(
        "--turn-tokens",
        type=_count,
        default=d.turn_tokens,
        help="tokens each later turn adds (default %(default)s)",
    )
    p.add_argument(
        "--draft-tokens",
        type=_count,
        default=0,
        help="speculative positions the receiver allocates past P (never sent)",
    )
    p.add_argument(
        "--keep-sliding",
        action="store_true",
        help="do not evict the receiver's unreferenced sliding-window blocks",
    )
    p.add_argument(
        "--in-flight",
        type=_positive,
        default=d.in_flight,
        help="requests a receiver keeps in flight (default %(default)s)",
    )
    p.add_argument("--chunk-bytes", type=_positive, default=d.chunk_bytes)
    p.add_argument("--no-checksum", action="store_true", help="skip per-chunk checksums")
    p.add_argument("--timeout", type=float, default=d.timeout_s, help="session timeout (s)")
    p.add_argument(
        "--channel",
        choices=("auto", "gloo", "nccl", "ipc"),
        default="auto",
        help="data channel: auto = the direct channel (ipc, CUDA IPC) for GPUs on one host, "
        "NCCL for GPUs otherwise, gloo on CPU",
    )
    p.add_argument("--kernel-backend", choices=("auto", "triton", "reference"), default="auto")
    p.add_argument("--ctx-layout", choices=("NHD", "HND"), default=d.ctx_layout)
    p.add_argument("--gen-layout", choices=("NHD", "HND"), default=d.gen_layout)
    p.add_argument(
        "--devices",
        default="",
        metavar="G,G,...",
        help="torchrun + NCCL: GPU index per local rank (default: the local rank)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report here")


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def config_from_args(args: argparse.Namespace) -> DisaggConfig:
    """A :class:`DisaggConfig` from :func:`add_arguments` options (``ValueError`` if bad)."""
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    bad = [m for m in modes if m not in ("per_group", "single_boundary")]
    if bad or not modes:
        raise ValueError(f"--modes takes per_group and/or single_boundary, got {args.modes!r}")
    return DisaggConfig(
        model=args.model,
        ctx_tp=args.ctx_tp,
        ctx_pp=args.ctx_pp,
        gen_tp=args.gen_tp,
        gen_pp=args.gen_pp,
        gen_tokens_per_block=args.gen_block_size,
        dtype=args.dtype,
        modes=modes,
        conversations=args.conversations,
        turns=args.turns,
        first_turn_tokens=args.first_turn_tokens,
        turn_tokens=args.turn_tokens,
        draft_tokens=args.draft_tokens,
        evict_sliding=not args.keep_sliding,
        in_flight=args.in_flight,
        chunk_bytes=args.chunk_bytes,
        checksum=not args.no_checksum,
        timeout_s=args.timeout,
        channel=args.channel,
        kernel_backend=args.kernel_backend,
        ctx_layout=args.ctx_layout,
        gen_layout=args.gen_layout,
        seed=args.seed,
        devices=tuple(int(x) for x in args.devices.split(",") if x.strip()),
    )
