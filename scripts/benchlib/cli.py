"""The command line and the run's order: machine, servers, streaming phases, fidelity, report, jobs."""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from .fidelity import fidelity_section
from .jobs import auth_overhead, jobs_section
from .machine import probe, weight_bytes_per_token
from .peer import Peer
from .report import report, summarize
from .server import bench_server
from .stall import stall_section
from .streams import streaming_section

DESCRIPTION = "InferQL benchmark: the GraphQL `generate` subscription against the engine called directly."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--url", help="an already running server (default: start one on a free port)")
    ap.add_argument("--api-key", default=os.environ.get("INFERQL_API_KEY"),
                    help="API key for --url (default: $INFERQL_API_KEY; the server started here makes its own)")
    ap.add_argument("--concurrency", default="1,4,16,64", help="comma-separated stream counts (default 1,4,16,64)")
    ap.add_argument("--max-tokens", type=int, default=128, help="maxTokens per generation (default 128)")
    # 3: a target's verdict is the median of the per-round ratios, and on a shared 2-core machine one
    # round in a few lands 0.1-0.35 off the others (README "Performance"); with 2 the median is their mean
    ap.add_argument("--rounds", type=int, default=3, help="rounds of API+direct(+peer) phases (default 3)")
    # 4: a 16-stream phase is one burst of ~3 s, a 64-stream one ~12 s, and back-to-back phases of one
    # mode differed by up to 10-20 % on a shared 2-core machine, against an API overhead of a few percent
    # (README "Benchmark"); four of each mode per round, A B B A A B B A, cut the weight of one such phase
    ap.add_argument("--pairs", type=int, default=4,
                    help="API and direct phases of each mode per round and concurrency, in the order A B B A ...;"
                    "\na round's tok/s of each is over all of them (default 4)")
    ap.add_argument("--requests", type=int, default=4,
                    help="generations per phase, at least the concurrency (default 4)")
    ap.add_argument("--max-batch", type=int, default=64,
                    help="INFERQL_MAX_BATCH_SIZE of the server started here and of the direct engine (default 64)")
    ap.add_argument("--peer", action="store_true",
                    help="also run `transformers serve MODEL --continuous-batching` (pip install -e '.[bench]')")
    ap.add_argument("--peer-dtype", default="default",
                    help="the peer's --dtype (default: its own default, i.e. the weights' dtype)")
    ap.add_argument("--fidelity-tokens", type=int, default=16,
                    help="greedy tokens per prompt for the fidelity check over 20 prompts (0 = skip)")
    ap.add_argument("--model-path", type=Path, help="model folder for the server and the direct engine"
                    " (default: the default model)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for the direct engine and the server it starts (INFERQL_TORCH_THREADS);"
                    "\n0 = torch's default, as the server runs by default (the default, except --smoke: 1,"
                    "\nsince 2+ threads on a busy small machine can stall for seconds in OpenMP barriers)")
    ap.add_argument("--no-jobs", action="store_true",
                    help="skip the job section (submission/poll latency, auth overhead)")
    ap.add_argument("--jobs-only", action="store_true",
                    help="only the job section (no streaming phases, no direct engine): about a minute")
    ap.add_argument("--jobs-client", choices=("lean", "httpx"), default="lean",
                    help="the job section's load generator: a lean keep-alive HTTP/1.1 client (default), or the"
                    "\nbundled httpx client, whose own CPU per request competes with the server on a small machine")
    ap.add_argument("--ws-client", choices=("lean", "websockets"), default="lean",
                    help="the streaming phases' websocket client: a lean one (benchlib/wsclient.py: each message\n"
                    "handled as it arrives, no task woken per message; the default), or app.client's, on the\n"
                    "websockets library's asyncio connection")
    ap.add_argument("--cluster", action="store_true",
                    help="only the scale-out section: an API-only replica and 2 workers on PostgreSQL + Redis\n"
                    "against the embedded server and the direct engine (benchlib/cluster.py): a few minutes")
    ap.add_argument("--stall", action="store_true",
                    help="only the stall section (no server): --stall-streams streams decode in the engine in-process"
                    "\nwhile one --stall-tokens prompt arrives, fed whole, then in chunks; prints the streams' largest"
                    "\ngap between two tokens during its prefill (about a minute)")
    ap.add_argument("--kernels", action="store_true",
                    help="only the kernels section (no server): packed vs plain matmuls, the decode attention vs SDPA,"
                    "\na decode step alone vs beside a second OpenMP pool (benchlib/kernels.py; about a minute)")
    ap.add_argument("--events", action="store_true",
                    help="only the events section (no server, no model): CPU per subscription event through"
                    "\nschema.subscribe, strawberry's executor vs the server's (benchlib/events.py; about 20 s)")
    ap.add_argument("--stall-tokens", type=int, default=2048, help="the long prompt's tokens (default 2048)")
    ap.add_argument("--stall-streams", type=int, default=4, help="streams decoding meanwhile (default 4)")
    ap.add_argument("--smoke", action="store_true",
                    help="a few seconds: 1 round, concurrency 1,2, max-tokens 8, 4 generations per phase,"
                    " 1 torch thread")
    args = ap.parse_args(argv)
    if args.smoke:
        args.rounds, args.concurrency, args.max_tokens, args.requests, args.pairs = 1, "1,2", 8, 4, 1
        args.fidelity_tokens = min(args.fidelity_tokens, 4)
        if args.threads is None:
            args.threads = 1
    if args.threads is None:
        args.threads = 0
    args.concurrency = sorted({int(c) for c in str(args.concurrency).split(",") if c.strip()})
    if (not args.concurrency or min(args.concurrency) < 1 or args.rounds < 1 or args.max_tokens < 1
            or args.pairs < 1):
        ap.error("--concurrency, --rounds, --pairs and --max-tokens must be positive")
    if args.threads < 0:
        ap.error("--threads must be 0 (torch's default) or more")
    return args


async def bench(args: argparse.Namespace) -> int:
    import torch

    from app.settings import Settings

    settings = Settings()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.url is None:
        server_threads = args.threads or settings.torch_threads
        server_note = f"the server started here: {server_threads or torch.get_num_threads()}"
    else:
        server_note = "the server at --url: its own INFERQL_TORCH_THREADS"
    print(f"CPU cores: {os.cpu_count()}   torch threads: {torch.get_num_threads()} in this process;"
          f" {server_note}")
    load1, load5, _ = os.getloadavg()
    print(f"load average before the run: {load1:.2f} (1 min), {load5:.2f} (5 min) on {os.cpu_count()} cores"
          + ("  -- the machine is busy: absolute figures will be low and noisy" if load1 > 0.5 * (os.cpu_count() or 1)
             else ""))
    if args.cluster:
        return await cluster_only(args, settings)
    print(f"rounds {args.rounds}, concurrency {','.join(map(str, args.concurrency))}, maxTokens {args.max_tokens},"
          f" temperature 0, generations per phase max(c, {args.requests}), API and direct phases {args.pairs} each"
          " per round", flush=True)

    if args.stall:
        return await stall_only(args, settings)
    if args.kernels:
        return await kernels_only(args, settings)
    if args.events:
        from .events import events_section

        await events_section(quick=args.smoke)
        return 0
    machine = None if args.jobs_only else probe(settings, quick=args.smoke)

    def default_model() -> Path:
        from app.inference.weights import pull_default_model

        return pull_default_model(Path(settings.cache_dir))

    model_path = args.model_path
    server = peer = None
    tmp = tempfile.TemporaryDirectory(prefix="inferql-bench-")
    workdir = Path(tmp.name)
    try:
        if args.url is None:
            if model_path is None:  # resolve once here so the server does not fetch it a second time
                model_path = default_model()
            server = bench_server(workdir, model_path, args.threads, INFERQL_MAX_BATCH_SIZE=str(args.max_batch))
            server.spawn()
            base_url = server.url
        else:
            base_url = args.url.rstrip("/")
        api_key = args.api_key

        lm = None
        if not args.jobs_only:
            # Load the direct model while the server loads its own (load time is not measured).
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            if model_path is None:
                model_path = default_model()
            t0 = time.perf_counter()
            lm = await _engine_model(args, settings, model_path)
            print(f"direct: loaded {lm.info.id} ({lm.info.version}, {lm.info.device}: {lm.matrix_format})"
                  f" in {time.perf_counter() - t0:.1f}s", flush=True)
        if server is not None:
            t0 = time.perf_counter()
            await server.wait_ready()
            print(f"server: ready at {base_url} after {time.perf_counter() - t0:.1f}s more"
                  f" ({'with its bootstrap API key' if server.key else 'no API key printed: auth off?'})", flush=True)
            api_key = server.key
        if not args.jobs_only and args.peer:
            peer = Peer(workdir, model_path, args.threads, args.peer_dtype)
            peer.start()
            t0 = time.perf_counter()
            await peer.wait_ready()
            print(f"peer: transformers serve --continuous-batching (dtype {args.peer_dtype}) ready at {peer.url}"
                  f" after {time.perf_counter() - t0:.1f}s", flush=True)
        if not args.jobs_only:
            phases, connect_ms, modes = await streaming_section(
                base_url, api_key, lm, peer, concurrency=args.concurrency, rounds=args.rounds,
                requests=args.requests, max_tokens=args.max_tokens, max_batch=args.max_batch,
                server_pid=server.proc.pid if server is not None else None, ws_client=args.ws_client, pairs=args.pairs)
            if peer is not None:
                peer.stop()
                peer = None
            fidelity = await fidelity_section(lm, args.fidelity_tokens, args.smoke)
            weight_bytes, macs = weight_bytes_per_token(lm)
            facts = {"weight_bytes": weight_bytes, "macs": macs, "dtype": lm.info.dtype}
            summaries = {key: summarize(ps) for key, ps in phases.items()}
            report(summaries, args.concurrency, connect_ms, modes, machine, facts, fidelity)
        if not args.no_jobs:
            scale = 4 if args.smoke else 1
            await jobs_section(base_url, api_key, client_kind=args.jobs_client, saturate=16 // scale,
                               submitters=10 // (scale // 2 or 1), per_submitter=50 // scale, polls=200 // scale)
            if server is not None:
                server.stop()
                server = None
                await auth_overhead(workdir, model_path, args.threads, polls=100 // scale,
                                    rounds=3 if not args.smoke else 1)
        return 0
    finally:
        if server is not None:
            server.stop()
        if peer is not None:
            peer.stop()
        tmp.cleanup()


async def cluster_only(args: argparse.Namespace, settings) -> int:
    from app.inference.weights import pull_default_model

    from .cluster import cluster_section

    model_path = args.model_path or pull_default_model(Path(settings.cache_dir))
    lm = await _engine_model(args, settings, model_path)
    with tempfile.TemporaryDirectory(prefix="inferql-bench-") as tmp:
        await cluster_section(Path(tmp), model_path, lm, args.threads, rounds=args.rounds,
                              max_tokens=args.max_tokens if args.max_tokens != 128 or args.smoke else 64,
                              smoke=args.smoke)
    return 0


async def _engine_model(args: argparse.Namespace, settings, model_path: Path | None = None):
    """The model the bench's direct engine runs in this process, with the same engine options
    (INFERQL_DTYPE, INFERQL_INT8_SMALL_BATCH, ...) as the servers it starts."""
    from app.inference.model import EngineOptions, load_model
    from app.inference.weights import pull_default_model

    model_path = model_path or args.model_path or pull_default_model(Path(settings.cache_dir))
    return await asyncio.to_thread(load_model, model_path, settings.device, args.threads,
                                   options=EngineOptions.from_settings(settings))


async def stall_only(args: argparse.Namespace, settings) -> int:
    lm = await _engine_model(args, settings)
    print(f"direct: {lm.info.id} ({lm.info.device}: {lm.matrix_format});"
          f" prefill chunk {lm.options.prefill_chunk} (INFERQL_PREFILL_CHUNK)", flush=True)
    await stall_section(lm, streams=args.stall_streams, prompt_tokens=args.stall_tokens,
                        chunk=lm.options.prefill_chunk, max_batch=max(args.stall_streams + 1, 2))
    return 0


async def kernels_only(args: argparse.Namespace, settings) -> int:
    from .kernels import kernels_section

    lm = await _engine_model(args, settings)
    if lm.fast_weights() is None:
        print("kernels: the model runs the Hugging Face forward, not the fast path: nothing to measure")
        return 0
    kernels_section(lm, quick=args.smoke)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return asyncio.run(bench(args))
