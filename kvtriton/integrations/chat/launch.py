"""A two-rank launcher for the chat (tests, notebooks, demos): :class:`ChatConfig`,
:func:`load_model`, :func:`chat_rank` (one rank's part) and :func:`launch_chat` (spawns both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvtriton.integrations.chat.service import AgentContext, serve_context
from kvtriton.integrations.chat.workers import ContextWorker, GenerationWorker, run_chat

if TYPE_CHECKING:
    pass


@dataclass(frozen=True)
class ChatConfig:
    """A disaggregated chat over local ranks: ``ctx_tp * ctx_pp`` context ranks, then one
    generation rank.

    Attributes:
        model: a :data:`~kvtriton.integrations.transformers.TINY_MODELS` kind (random weights
            from ``seed``) or a local directory with a ``transformers`` causal LM.
        user_turns: token ids of each user turn (turn ``k``'s prompt extends turn ``k-1``'s
            prompt and reply).
        steps: decode steps per turn (each turn generates ``steps + 1`` tokens).
        modes: ``"per_group"`` and/or ``"single_boundary"``; each runs on fresh caches.
        ctx_tokens_per_block, gen_tokens_per_block: block sizes of the two sides.
        ctx_tp, ctx_pp: context-side parallelism. Every context rank runs the whole (tiny)
            model and keeps only its shard's heads and layers; the generation rank (tp1 pp1)
            asks each for its part (kvtriton.transfer's topology). State groups need tp 1.
        num_blocks: blocks per group on each side.
        num_threads: torch intra-op threads of every rank (and of :func:`verify_chat`): CPU
            matmuls split their float32 sums by thread, so bit-exact comparisons need the
            same count on both sides of a comparison.
        evict_sliding_between_turns: see :func:`run_chat`.
        backend: kernel backend (``"auto"``: Triton on CUDA/interpreter, else reference).
        timeout_s: per-transfer timeout.
        streaming: layer-wise streaming: each decoder layer's KV is copied into the pools and
            marked ready by a forward hook while the prefill runs, and the generation rank
            receives it meanwhile (the same tokens either way).
    """

    model: str = "gemma3"
    user_turns: tuple[tuple[int, ...], ...] = ()
    steps: int = 8
    modes: tuple[str, ...] = ("per_group", "single_boundary")
    seed: int = 0
    window: int = 6
    ctx_tokens_per_block: int = 4
    gen_tokens_per_block: int = 5
    ctx_tp: int = 1
    ctx_pp: int = 1
    num_blocks: int = 64
    num_threads: int = 1
    evict_sliding_between_turns: bool = True
    backend: str = "auto"
    timeout_s: float = 60.0
    streaming: bool = False


def load_model(cfg: ChatConfig) -> Any:
    """The model of ``cfg`` (a tiny seeded model, or a local checkpoint in float32, eager)."""
    import os

    from kvtriton.integrations.transformers import TINY_MODELS, tiny_model

    if cfg.model in TINY_MODELS:
        return tiny_model(cfg.model, seed=cfg.seed, window=cfg.window)
    if not os.path.isdir(cfg.model):
        raise ValueError(
            f"model {cfg.model!r} is neither a tiny model ({', '.join(TINY_MODELS)}) "
            "nor a local checkpoint directory (kvtriton never downloads)"
        )
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        cfg.model, dtype=torch.float32, attn_implementation="eager", local_files_only=True
    )
    return model.eval()


def chat_rank(
    cfg: ChatConfig, rank: int, ctrl: Any, data: Any, router: Any
) -> dict[str, list[dict[str, Any]]] | None:
    """Run ``cfg`` on this rank over gloo groups of all ranks (context ranks first, then the
    generation rank; :class:`kvtriton.transfer.topology.Topology` order).

    Returns ``{mode: [turn record, ...]}`` on the generation rank (records hold tokens,
    logits as numpy, moved ranges, bytes), ``None`` on context ranks.
    """
    import torch.distributed as dist

    from kvtriton.integrations.transformers import spec_for_model
    from kvtriton.transfer.config import TransferOptions
    from kvtriton.transfer.launch import connect
    from kvtriton.transfer.topology import Topology

    model = load_model(cfg)
    spec = spec_for_model(model, tokens_per_block=cfg.ctx_tokens_per_block)
    topology = Topology(spec, cfg.ctx_tp, cfg.ctx_pp, gen_tokens_per_block=cfg.gen_tokens_per_block)
    local = topology.spec(rank)
    (gen_rank,) = topology.gen_ranks
    options = TransferOptions(
        timeout_s=cfg.timeout_s, backend=cfg.backend, layer_chunks=cfg.streaming
    )
    out: dict[str, list[dict[str, Any]]] = {}
    for mode in cfg.modes:
        if rank != gen_rank:
            worker = ContextWorker(model, local, num_blocks=cfg.num_blocks, backend=cfg.backend)
            agent = connect(
                topology, rank, worker.pool_map, ctrl_group=ctrl, data_group=data, options=options
            )
            try:
                serve_context(worker, agent, router, gen_rank, timeout_s=cfg.timeout_s)
            finally:
                agent.close(timeout=cfg.timeout_s)
        else:
            gen = GenerationWorker(model, local, num_blocks=cfg.num_blocks, backend=cfg.backend)
            agent = connect(
                topology, rank, gen.pool_map, ctrl_group=ctrl, data_group=data, options=options
            )
            context = AgentContext(
                agent,
                router,
                topology.ctx_ranks,
                int(model.config.vocab_size),
                timeout_s=cfg.timeout_s,
                streaming=cfg.streaming,
            )
            try:
                results = run_chat(
                    gen,
                    context,
                    cfg.user_turns,
                    steps=cfg.steps,
                    mode=mode,  # type: ignore[arg-type]
                    evict_sliding_between_turns=cfg.evict_sliding_between_turns,
                    prefix=mode,
                )
            finally:
                context.stop()
                agent.close(timeout=cfg.timeout_s)
            gen.manager.check_invariants()
            out[mode] = [r.to_record() for r in results]
        dist.barrier(group=ctrl)
    return out if rank == gen_rank else None


def _chat_worker(rank: int, cfg: ChatConfig, world: int, port: int, conn: Any) -> None:
    import datetime
    import traceback

    import torch
    import torch.distributed as dist

    from kvtriton.transfer.launch import exit_worker, send_result

    torch.set_num_threads(cfg.num_threads)
    store = dist.TCPStore(
        "127.0.0.1", port, world, rank == 0, timeout=datetime.timedelta(seconds=60)
    )
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    code = 0
    try:
        timeout = datetime.timedelta(seconds=max(120.0, 4 * cfg.timeout_s))
        ctrl, data, router = (
            dist.new_group(list(range(world)), backend="gloo", timeout=timeout) for _ in range(3)
        )
        result = chat_rank(cfg, rank, ctrl, data, router)
        if result is not None:
            send_result(conn, result)
    except BaseException:
        send_result(conn, {"error": f"rank {rank}: {traceback.format_exc()}"})
        code = 1
    exit_worker(conn, code)


def launch_chat(cfg: ChatConfig) -> dict[str, list[dict[str, Any]]]:
    """Spawn the ranks of ``cfg`` on this machine (gloo) and return the generation rank's
    records (see :func:`chat_rank`). Raises ``RuntimeError`` with the failing rank's error
    if a rank fails."""
    import numpy as np

    from kvtriton.transfer.launch import spawn_for_result

    if not cfg.user_turns:
        raise ValueError("ChatConfig.user_turns is empty: give the token ids of each turn")
    world = cfg.ctx_tp * cfg.ctx_pp + 1
    timeout_s = 120 + cfg.timeout_s * len(cfg.user_turns) * len(cfg.modes)
    result, codes = spawn_for_result(
        _chat_worker, world, lambda rank, port, conn: (rank, cfg, world, port, conn), timeout_s
    )
    if result is None:
        raise RuntimeError(f"the chat produced no result (exit codes {codes})")
    if "error" in result:
        raise RuntimeError(result["error"])
    for turns in result.values():  # the records came as JSON: logits back to float32 arrays
        for rec in turns:
            rec["logits"] = np.asarray(rec["logits"], dtype=np.float32)
            rec["moved"] = {g: tuple(r) for g, r in rec["moved"].items()}
    return result  # type: ignore[no-any-return]
