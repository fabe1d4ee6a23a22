#!/usr/bin/env python3
"""Whole-model decode, tensor-parallel over N devices (issue 12): model_decode.py's runner with
its heads and FFN split Megatron-style, one process per device, NCCL (gloo on the CPU).

Why: at 1M tokens the Llama-3-8B cache alone is 128 GiB (+ 8 GiB of page digests), which with
15 GB of weights does not fit one H200; split over two, each GPU holds half the KV heads.

The split (world size N, rank r):
  QKV      column-parallel: rank r computes its q_heads/N query heads and kv_heads/N KV heads
  attention local: each rank keeps the paged cache and digests of its own KV heads and runs the
           placement's attention (dense SDPA, mempipe dense paged, or mempipe sparse) on them;
           GQA groups never straddle ranks, so the sparse selection per KV head is unchanged
  O        row-parallel: partial sums over the rank's heads, then one all-reduce
  gate/up  column-parallel over the FFN; down row-parallel, then one all-reduce
  norms    replicated; embedding replicated; LM head split by vocabulary rows, the logits
           all-gathered (so every step ends with the full logits on every rank)
The step is model_decode.Runner.step itself; this module overrides its two hooks (`reduce`,
`lm_logits`) and the cache fill. The whole step, collectives included, is captured as one CUDA
graph per placement on every rank (NCCL collectives are capturable).

Weights and caches are generated so that they do not depend on the split: every weight matrix
and every (layer, KV head, page chunk) of the cache has its own generator seeded from (--seed,
name), each rank generates the full matrix and keeps its rows/columns, and generates only its
own KV heads. So `--tp 1` and `--tp 2` compute the same model on the same data, and
tests/python/test_model_decode_tp.py checks that their outputs agree (on the CPU, gloo).

Per configuration it reports what model_decode.py reports (same `mempipe.throughput/1` rows),
with these differences:
  step_ms      the slower rank's median graph replay (the collectives keep ranks in lockstep;
               both ranks' medians are kept in `rank_step_ms`)
  steps_ms     from one profiled eager step on rank 0; `linear` includes the collectives.
               Their share of that eager step is `comm_eager_ms` (scaled like the stages), but
               an eager step is launch-bound and its all-reduces also absorb the ranks' skew,
               so the truer figure is `comm_graph_ms`: the step's collectives alone (2 x layers
               all-reduces of [B, hidden] and the logits all-gather), captured in one CUDA
               graph and replayed on otherwise idle GPUs (median of 20 replays, slower rank)
  bytes        summed over the ranks (weights once, KV once); byte_floor_ms = bytes / (N x
               --hbm_tbs): every device streams its share in parallel; byte_floor_copy_ms uses
               the sum of the devices' measured copy bandwidths. The all-reduce traffic is not
               in the floor.
  energy       NVML's total-energy counter of every device over the same timed window, summed
               (J per token of both GPUs together)
  rel_err      last layer's attention output (gathered over ranks) and the logits against
               dense-sdpa on the same token and cache, as in model_decode.py

  python3 integration/bench/model_decode_tp.py --tp 2 --json out.json --md out.md
        [--model llama3-8b] [--contexts 524288,1048576] [--batches 1,max]
        [--placements dense-sdpa,dense-paged,gpu] [--budget 4096 --page 16 --dense_layers 2]
  torchrun --nproc-per-node 2 integration/bench/model_decode_tp.py --json out.json  # same,
        one host (the rank is torchrun's LOCAL_RANK)
  python3 integration/bench/model_decode_tp.py --device cpu --tp 2 --json smoke.json  # gloo

Flags (the sparse configuration and measurement flags mean what they mean in model_decode.py):
  --tp            number of processes/devices (default 2); heads, KV heads, FFN and vocabulary
                  must divide by it. Under torchrun the world size comes from torchrun instead
  --device        cuda (default; one GPU per rank, NCCL) or cpu (gloo; tiny model, fp32, no
                  CUDA graphs, no NVML: for tests)
  --model         llama3-8b (default), llama3-70b-slice or tiny (CPU default): model_decode.py's
  --contexts      tokens per sequence, comma list (default 524288,1048576; cpu 128,256)
  --batches       comma list, `max` = the largest batch whose per-rank weights + KV + digests
                  fit every rank's free memory with --headroom_gib spare (default 1,max; cpu 1,2)
  --placements    dense-sdpa,dense-paged,gpu (all by default); `fpga` rows are labelled gaps
  --budget --page --dense_layers --sinks --locals --steps --min_window_s --hbm_tbs
  --headroom_gib --seed   as in model_decode.py (defaults 4096, 16, 2, 1, 1, 10, 0.5, 4.8, 3.0, 1;
                  on cpu budget 64, 1 dense layer, 2 steps, no minimum window)
  --json, --md    outputs (rank 0 writes them; the JSON is rewritten after every configuration,
                  so a run cut short keeps the configurations it finished)
  --dump          torch.save of every configuration's last-step outputs (attention output of the
                  last layer and logits, per placement) to this path: for tests
  --fault         test only: `no_allreduce` drops the row-parallel all-reduces (a known-wrong
                  run, to show the test's comparison rejects it)
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import model_decode as md  # noqa: E402

LOG = "[model_decode_tp]"


def _seed(seed: int, *key) -> int:
    """A 63-bit seed from (seed, name...): the same on every rank and for every split."""
    h = hashlib.blake2b(repr((seed,) + key).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def _gen(device: torch.device, seed: int, *key) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(_seed(seed, *key))


def local_shape(full: md.Shape, world: int) -> md.Shape:
    """One rank's share: q/KV heads and FFN divided by `world`; hidden and vocab kept (the
    embedding is replicated; the LM head's vocabulary split is the model's business)."""
    for name, n in (("q_heads", full.q_heads), ("kv_heads", full.kv_heads), ("ffn", full.ffn),
                    ("vocab", full.vocab)):
        if n % world:
            raise ValueError(f"--tp {world}: {full.name} has {name} = {n}, not divisible by "
                             f"{world}")
    return dataclasses.replace(full, name=f"{full.name} (1/{world} per rank)",
                               q_heads=full.q_heads // world, kv_heads=full.kv_heads // world,
                               ffn=full.ffn // world)


class TPModel(md.Model):
    """Rank `rank` of `world`'s share of the random-weight model (model_decode.Model's layout:
    `layers[i]` holds n1, qkv, o, n2, gate_up, down; `s` is the local shape)."""

    def __init__(self, full: md.Shape, dtype: torch.dtype, device: torch.device, seed: int,
                 rank: int, world: int):
        s = local_shape(full, world)
        self.full, self.s, self.dtype, self.device = full, s, dtype, device
        self.rank, self.world = rank, world
        D = full.head_dim

        def w(rows, cols, *key):
            t = torch.empty(rows, cols, dtype=dtype, device=device)
            return t.normal_(0.0, 1.0 / math.sqrt(cols), generator=_gen(device, seed, *key))

        def part(n, r):  # rank r's block of n
            return slice(r * n, (r + 1) * n)

        qs, ks, fs = part(s.q_heads * D, rank), part(s.kv_heads * D, rank), part(s.ffn, rank)
        H, KVH = full.q_heads * D, full.kv_heads * D
        self.embed = w(full.vocab, full.hidden, "embed") * math.sqrt(full.hidden) / 8
        self.layers = []
        for i in range(full.layers):
            qkv = w(H + 2 * KVH, full.hidden, "qkv", i)
            gu = w(2 * full.ffn, full.hidden, "gate_up", i)
            self.layers.append({
                "n1": torch.ones(full.hidden, dtype=dtype, device=device),
                "qkv": torch.cat([qkv[:H][qs], qkv[H:H + KVH][ks], qkv[H + KVH:][ks]]),
                "o": w(full.hidden, H, "o", i)[:, qs].contiguous(),
                "n2": torch.ones(full.hidden, dtype=dtype, device=device),
                "gate_up": torch.cat([gu[:full.ffn][fs], gu[full.ffn:][fs]]),
                "down": w(full.hidden, full.ffn, "down", i)[:, fs].contiguous()})
            del qkv, gu
        self.norm = torch.ones(full.hidden, dtype=dtype, device=device)
        vs = part(full.vocab // world, rank)
        self.lm_head = w(full.vocab, full.hidden, "lm_head")[vs].contiguous()
        inv = 1.0 / (full.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
        self.inv_freq = inv.float().to(device)


class TPTimer(md.Timer):
    """model_decode.Timer with one more stage, `comm` (the collectives)."""

    STAGES = md.STAGES + ("comm",)


class TPRunner(md.Runner):
    """model_decode.Runner on one rank: its KV heads' caches, the collectives in the hooks."""

    def __init__(self, model: TPModel, context: int, batch: int, args, gen: torch.Generator,
                 fault: str | None = None):
        self.world, self.rank, self.fault = model.world, model.rank, fault
        self.nccl = self.world > 1 and dist.get_backend() == "nccl"
        super().__init__(model, context, batch, args, gen)
        self.attn_out.fill_(float("nan"))  # an output never written shows as NaN
        self.logits.fill_(float("nan"))
        if self.world > 1:
            self._gathered = torch.empty(self.world, batch, model.full.vocab // self.world,
                                         dtype=model.dtype, device=model.device)

    def fill_caches(self, nb: int, gen: torch.Generator):
        """Like model_decode.Runner.fill_caches, but every (layer, KV head, chunk of pages) has
        its own generator, so a rank's heads hold what they hold in the unsplit model."""
        m, page = self.model, self.args.page
        s, D = m.s, m.s.head_dim
        chunk = max(1, (1 << 26) // (page * D))  # pages per generated chunk (~256 MB bf16)
        caches, digests = [], []
        for i in range(s.layers):
            kv = torch.empty(2, nb, page, s.kv_heads, D, dtype=m.dtype, device=m.device)
            dg = torch.empty(nb, 2, s.kv_heads, D, dtype=m.dtype, device=m.device)
            for h in range(s.kv_heads):
                head = self.rank * s.kv_heads + h  # the head's index in the unsplit model
                for a in range(0, nb, chunk):
                    b = min(nb, a + chunk)
                    t = torch.empty(2, b - a, page, D, dtype=m.dtype, device=m.device)
                    t.normal_(generator=_gen(m.device, self.args.seed, "kv", i, head, a))
                    kv[:, a:b, :, h] = t
                    dg[a:b, 0, h] = t[0].amax(1)
                    dg[a:b, 1, h] = t[0].amin(1)
                    del t
            caches.append(kv)
            digests.append(dg)
        return caches, digests

    def reduce(self, partial: torch.Tensor, timer) -> torch.Tensor:
        if self.world == 1:
            return partial
        timer.mark("linear")
        if self.fault != "no_allreduce":
            dist.all_reduce(partial)
        timer.mark("comm")
        return partial

    def lm_logits(self, h: torch.Tensor, timer) -> torch.Tensor:
        local = F.linear(h, self.model.lm_head)
        if self.world == 1:
            return local
        timer.mark("linear")
        if self.nccl:
            dist.all_gather_into_tensor(self._gathered, local)
        else:
            dist.all_gather(list(self._gathered.unbind(0)), local)
        timer.mark("comm")
        return self._gathered.permute(1, 0, 2).reshape(self.B, -1)

    def gather_heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, local heads, D] of every rank -> [B, heads, D] in the unsplit model's order."""
        if self.world == 1:
            return t.clone()
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t.contiguous())
        return torch.cat(out, dim=1)


class TPEnergy(md.Energy):
    """NVML energy of this rank's GPU, found by UUID (NVML's and CUDA's indices may differ)."""

    def __init__(self, device: torch.device):
        super().__init__(device)
        self.nvml_device = None
        if self.handle is None:
            return
        try:
            uuid = str(torch.cuda.get_device_properties(device).uuid)
            uuid = uuid if uuid.startswith("GPU-") else "GPU-" + uuid
            self.handle = self.nv.nvmlDeviceGetHandleByUUID(uuid.encode())
            self.nvml_device = uuid
        except Exception as e:  # noqa: BLE001 -- reported; NVML index = CUDA index assumed
            self.nvml_device = f"index {device.index} (UUID lookup failed: {e})"


def _allreduce(vals, op, device) -> list[float]:
    """Element-wise reduction of a few floats over the ranks (identity on one)."""
    if not dist.is_initialized():
        return list(vals)
    t = torch.tensor(list(vals), dtype=torch.float64,
                     device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=op)
    return t.tolist()


def rel_errors(ref: dict, got: dict) -> list[tuple]:
    """(config, placement, output, relative L2 error of `got` against `ref`) for every output
    of two --dump files (attention = last layer's attention output, logits); NaN stays NaN."""
    if set(ref) != set(got):
        raise ValueError(f"the dumps hold different configurations: {sorted(ref)} vs "
                         f"{sorted(got)}")
    out = []
    for key in ref:
        if set(ref[key]) != set(got[key]):
            raise ValueError(f"{key}: different placements {sorted(ref[key])} vs "
                             f"{sorted(got[key])}")
        for p, pair_ref in ref[key].items():
            for what, x, y in zip(("attention", "logits"), got[key][p], pair_ref):
                if x.shape != y.shape:
                    raise ValueError(f"{key} {p} {what}: shape {tuple(x.shape)} vs "
                                     f"{tuple(y.shape)}")
                err = float((x.double() - y.double()).norm() / y.double().norm())
                out.append((key, p, what, err))
    return out


def comm_probe(runner: TPRunner, replays: int = 20) -> float:
    """ms for one step's collectives alone (2 x layers all-reduces of [B, hidden] in the model's
    dtype, then the logits all-gather), as one CUDA graph (eager on the CPU); slower rank's
    median over `replays`. Zeros are reduced, so repeated sums stay finite."""
    m = runner.model
    dev, cuda = m.device, m.device.type == "cuda"
    x = torch.zeros(runner.B, m.full.hidden, dtype=m.dtype, device=dev)
    lg = torch.zeros(runner.B, m.full.vocab // runner.world, dtype=m.dtype, device=dev)

    def body():
        for _ in range(2 * m.full.layers):
            dist.all_reduce(x)
        if runner.nccl:
            dist.all_gather_into_tensor(runner._gathered, lg)
        else:
            dist.all_gather(list(runner._gathered.unbind(0)), lg)

    run = body
    if cuda:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            body()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        run = graph.replay
    for _ in range(3):
        run()
    times = []
    for _ in range(replays):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            run()
            times.append((time.perf_counter() - t) * 1e3)
    return _allreduce([statistics.median(times)], dist.ReduceOp.MAX, dev)[0]


def measure_tp(runner: TPRunner, placement: str, args, energy: TPEnergy) -> dict:
    """model_decode.measure on every rank, in lockstep: the same step count everywhere, the
    timed windows aligned, step time = the slower rank's median, energy summed."""
    dev = runner.model.device
    cuda = dev.type == "cuda"
    runner.step(placement, TPTimer(dev, False))  # warm-up; sizes every buffer
    prof = TPTimer(dev, True)
    runner.step(placement, prof)
    profiled = prof.totals()

    def eager():
        runner.step(placement, TPTimer(dev, False))

    graphs = md.capture_graphs(eager, 1) if cuda else []
    run_once = md.replayer(graphs, eager)
    steps = int(_allreduce([md.steps_for_window(run_once, 1, args, cuda)], dist.ReduceOp.MAX,
                           dev)[0])
    _allreduce([0.0], dist.ReduceOp.SUM, dev)  # align the windows
    e0 = energy.read_j()
    times, window = md.timed_steps(run_once, steps, cuda)
    e1 = energy.read_j()
    median = statistics.median(times)
    joules = -1.0 if e0 is None else e1 - e0
    world = runner.world
    medians = [0.0] * world
    medians[runner.rank] = median
    medians = _allreduce(medians, dist.ReduceOp.SUM, dev)
    mx = _allreduce([window, statistics.fmean(times)], dist.ReduceOp.MAX, dev)
    e_min, e_sum = _allreduce([joules], dist.ReduceOp.MIN, dev)[0], \
        _allreduce([joules], dist.ReduceOp.SUM, dev)[0]
    return {"graph": graphs[0] if graphs else None, "step_ms": max(medians),
            "rank_step_ms": medians, "steps": steps, "window_s": mx[0], "mean_step_ms": mx[1],
            "profiled_ms": profiled, "energy_j": None if e_min < 0 else e_sum}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=2)
    md.add_common_args(ap)
    ap.add_argument("--dump", default=None)
    ap.add_argument("--fault", default=None, choices=("no_allreduce",))
    args = ap.parse_args(argv)
    md.fill_device_defaults(args, contexts=("128,256", "524288,1048576"),
                            batches=("1,2", "1,max"), steps=(2, 10))
    if args.tp < 1:
        raise ValueError(f"--tp {args.tp}: must be at least 1")
    for p in args.placements.split(","):
        if p not in md.PLACEMENTS:
            raise ValueError(f"--placements: unknown placement {p!r}; one of "
                             f"{', '.join(md.PLACEMENTS)}")
    for c in args.contexts.split(","):
        if not c.isdigit() or int(c) <= 0 or int(c) % args.page:
            raise ValueError(f"--contexts: {c} is not a positive multiple of --page {args.page}")
    for b in args.batches.split(","):
        if b != "max" and (not b.isdigit() or int(b) < 1):
            raise ValueError(f"--batches: {b!r} is neither a positive integer nor `max`")
    if args.budget % args.page:
        raise ValueError(f"--budget {args.budget} is not a multiple of --page {args.page}")
    local_shape(md.MODELS[args.model], args.tp)  # raises on a split that does not divide
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.command = "python3 " + " ".join(
        [os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else list(argv)))
    if "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ:  # under torchrun
        args.tp = int(os.environ["WORLD_SIZE"])
        local_shape(md.MODELS[args.model], args.tp)
        return _rank_main(int(os.environ["LOCAL_RANK"]), args.tp, args, None)
    if args.tp == 1:
        return _rank_main(0, 1, args, None)
    if args.device == "cuda" and torch.cuda.device_count() < args.tp:
        raise RuntimeError(f"--tp {args.tp} needs {args.tp} CUDA devices; this machine has "
                           f"{torch.cuda.device_count()}")
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory(prefix="mempipe_tp_") as d:
        mp.start_processes(_rank_main, args=(args.tp, args, os.path.join(d, "store")),
                           nprocs=args.tp, join=True, start_method="spawn")
    return 0


def _rank_main(rank: int, world: int, args, store: str | None) -> int:
    cpu = args.device == "cpu"
    if cpu:
        torch.set_num_threads(1)  # the CPU run shares small CI machines
    else:
        torch.cuda.set_device(rank)
    if world > 1:
        if cpu:  # every rank is on this host: loopback works where the hostname may not resolve
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        kw = {"backend": "gloo" if cpu else "nccl", "rank": rank, "world_size": world,
              "init_method": f"file://{store}" if store else "env://",
              "timeout": datetime.timedelta(minutes=10)}
        if not cpu:
            kw["device_id"] = torch.device("cuda", rank)
        dist.init_process_group(**kw)
    try:
        return _run(rank, world, args)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _run(rank: int, world: int, args) -> int:
    cpu = args.device == "cpu"
    lead = rank == 0

    def log(msg):
        if lead:
            print(f"{LOG} {msg}", flush=True)

    import mempipe
    if not cpu and "cuda" not in mempipe.devices:
        raise RuntimeError(f"--device cuda needs a GPU build of mempipe (module runs "
                           f"{mempipe.devices})")
    dev = torch.device("cpu") if cpu else torch.device("cuda", rank)
    full = md.MODELS[args.model]
    dtype = torch.float32 if cpu else torch.bfloat16
    elem = torch.empty(0, dtype=dtype).element_size()
    placements = [p for p in args.placements.split(",") if p]
    warn = md.no_dense_message(placements)
    if warn:
        log(f"note: {warn}")
    t_start = time.perf_counter()
    log(f"seed {args.seed}; {full.name} split over {world} ranks ({args.device}"
        f"{', NCCL' if world > 1 and not cpu else ', gloo' if world > 1 else ''}); "
        f"{md.weight_params(full) / 1e9:.2f} B parameters read per step, {dtype}")
    t0 = time.perf_counter()
    model = TPModel(full, dtype, dev, args.seed, rank, world)
    if not cpu:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    log(f"weights built in {time.perf_counter() - t0:.1f} s")
    energy = TPEnergy(dev)
    info = {"rank": rank}
    copy_bps = None
    if not cpu:
        p = torch.cuda.get_device_properties(dev)
        info.update(gpu=torch.cuda.get_device_name(dev), sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / (1 << 30), 1),
                    nvml_energy=energy.why or "ok", nvml_device=energy.nvml_device)
        bw = md.copy_bandwidth(dev)
        info["copy_bandwidth_tbs"] = round(bw / 1e12, 3)
        copy_bps = _allreduce([bw], dist.ReduceOp.SUM, dev)[0]
    ranks = [None] * world
    if world > 1:
        dist.all_gather_object(ranks, info)
    else:
        ranks = [info]
    machine = {"torch": torch.__version__, "mempipe_devices": list(mempipe.devices),
               "tp": world, "ranks": ranks}
    if cpu:
        machine.update(gpu=None, host=f"CPU ({os.cpu_count()} threads), {world} gloo ranks")
    else:
        machine.update(gpu=f"{world} x {ranks[0]['gpu']} (tensor-parallel, NCCL)",
                       cuda=torch.version.cuda,
                       nccl=".".join(map(str, torch.cuda.nccl.version())),
                       copy_bandwidth_tbs=round(copy_bps / 1e12, 3))
        log(f"{machine['gpu']}: copy bandwidth " + ", ".join(
            f"{r['copy_bandwidth_tbs']:.2f}" for r in ranks) + " TB/s")
    floor_bps = world * args.hbm_tbs * 1e12

    configs = []
    for L in [int(c) for c in args.contexts.split(",")]:
        if cpu:
            free = 1 << 40
        else:
            torch.cuda.empty_cache()
            free = int(_allreduce([torch.cuda.mem_get_info(dev)[0]], dist.ReduceOp.MIN,
                                  dev)[0])
        bmax = md.max_batch(model.s, L, args, free, elem)
        configs += [(L, B, bmax) for B in md.batch_sizes(args.batches, bmax)]

    rows, dumps = [], {}
    doc = None
    for ci, (L, B, bmax) in enumerate(configs):
        where = f"[{ci + 1}/{len(configs)}] {md._ctx(L)} x {B}"
        if B < 1 or B > bmax:
            log(f"{where}: does not fit (largest batch {bmax})")
            rows.append(md.gap_row("dense", L, B, f"does not fit: weights + KV exceed free "
                                   f"memory on a rank (largest batch at {md._ctx(L)} is "
                                   f"{bmax})", variant="sdpa"))
            doc = _write(args, machine, full, dtype, rows, lead)
            continue
        t0 = time.perf_counter()
        runner, oom = None, 0.0
        try:
            runner = TPRunner(model, L, B, args, torch.Generator(device=dev).manual_seed(
                _seed(args.seed, "tokens", L, B)), fault=args.fault)
        except torch.OutOfMemoryError:
            oom = 1.0
        if _allreduce([oom], dist.ReduceOp.MAX, dev)[0]:
            log(f"{where}: out of memory filling the cache on a rank")
            rows.append(md.gap_row("dense", L, B, f"does not fit: out of memory while filling "
                                   f"the cache (estimated largest batch {bmax})",
                                   variant="sdpa"))
            del runner
            if not cpu:
                torch.cuda.empty_cache()
            doc = _write(args, machine, full, dtype, rows, lead)
            continue
        backend = None
        if "dense-sdpa" in placements:
            backend = runner.pick_sdpa_backend() if lead else None
            if world > 1:  # every rank runs rank 0's choice
                pick = [backend, None if runner.sdpa_backend is None
                        else runner.sdpa_backend.name, runner.sdpa_form]
                dist.broadcast_object_list(pick, src=0)
                backend, name, runner.sdpa_form = pick
                if name is not None:
                    from torch.nn.attention import SDPBackend
                    runner.sdpa_backend = getattr(SDPBackend, name)
        if not cpu:
            torch.cuda.synchronize()
        log(f"{where}: cache filled in {time.perf_counter() - t0:.1f} s "
            f"({L * md.kv_bytes_per_token(model.s, elem) * B / 2**30:.1f} GiB of KV per rank); "
            f"SDPA backend {backend}")
        comm_graph = comm_probe(runner) if world > 1 else 0.0
        log(f"{where}: the step's {2 * full.layers + 1} collectives alone: {comm_graph:.3f} ms "
            f"({'CUDA graph' if not cpu else 'eager'})")
        results, outs = {}, {}
        for p in placements:
            t1 = time.perf_counter()
            r = measure_tp(runner, p, args, energy)
            if r["graph"] is not None:  # the comparison step: same token, same cache
                r["graph"].replay()
                torch.cuda.synchronize()
            else:
                runner.step(p, TPTimer(dev, False))
            outs[p] = (runner.gather_heads(runner.attn_out), runner.logits.clone())
            r.pop("graph")
            results[p] = r
            log(f"{where} {p:<11}: {r['step_ms']:.3f} ms/step (ranks " + ", ".join(
                f"{x:.3f}" for x in r["rank_step_ms"]) + f"), {B * 1000 / r['step_ms']:.1f} "
                f"tokens/s ({r['steps']} steps, {r['window_s']:.2f} s; "
                f"{time.perf_counter() - t1:.1f} s with capture; "
                f"{time.perf_counter() - t_start:.0f} s since start)")
        dense_best, ref = md.dense_reference(results, outs)
        for p, r in results.items():
            prof = dict(r["profiled_ms"])
            comm = prof.pop("comm")
            prof["linear"] += comm  # the schema's stages; comm reported beside them
            r["profiled_ms"] = prof
            row = md.make_row(p, r, L, B, full, args, elem, floor_bps, copy_bps, dense_best,
                              ref, outs[p], energy, runner, backend, cpu)
            row["tp"] = world
            row["comm_eager_ms"] = row["step_ms"] * comm / sum(prof.values())
            row["profiled_comm_ms"] = comm
            row["comm_graph_ms"] = comm_graph
            row["rank_step_ms"] = r["rank_step_ms"]
            if world > 1:
                row["notes"].append(
                    f"TP={world}: linear includes {2 * full.layers} all-reduces + the logits "
                    f"all-gather (comm_graph_ms); bytes and energy summed over {world} devices, "
                    f"floor over {world} x bandwidth")
            rows.append(row)
        rows.append(md.gap_row("fpga", L, B, "gap: the GPU+FPGA placement (issue 11, branch "
                               "`schemes`) had not landed on main when this ran; see "
                               "DESIGN_SPACE.md for modeled fpga rows"))
        if args.dump:
            dumps[(L, B)] = {p: (a.cpu(), lg.cpu()) for p, (a, lg) in outs.items()}
        del runner, outs
        if not cpu:
            torch.cuda.empty_cache()
        doc = _write(args, machine, full, dtype, rows, lead)
        if lead and args.json:
            log(f"{where}: done; {args.json} rewritten ({len(rows)} rows)")
    if lead:
        if args.dump:
            torch.save(dumps, args.dump)
        md_text = markdown(doc)
        if args.md:
            Path(args.md).write_text(md_text)
        print(md_text, flush=True)
    return 0


def _write(args, machine, full, dtype, rows, lead) -> dict:
    """The document of the rows so far; rank 0 validates it and rewrites --json."""
    elem = torch.empty(0, dtype=dtype).element_size()
    dt = str(dtype).replace("torch.", "")
    doc = {"schema": md.SCHEMA, "kind": "measured", "machine": machine,
           "command": args.command,
           "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
               timespec="seconds"),
           "model": {**dataclasses.asdict(full), "random_weights": True,
                     "weight_bytes_per_step": md.weight_params(full) * elem},
           "config": {"page": args.page, "budget": args.budget, "digest": "max/min, " + dt,
                      "dtype": dt, "dense_layers": args.dense_layers, "sinks": args.sinks,
                      "locals": args.locals, "seed": args.seed, "tp": machine["tp"],
                      "byte_floor_tbs": args.hbm_tbs, "byte_floor_devices": machine["tp"],
                      "min_window_s": args.min_window_s},
           "note": (f"tensor-parallel over {machine['tp']} ranks (Megatron split); random "
                    f"weights and random KV; context held constant during timing; steps split "
                    f"from one profiled eager step on rank 0, scaled to the graph step; linear "
                    f"includes the collectives"),
           "rows": rows, "maps": []}
    if lead:
        bad = md.validate(doc)
        if bad:
            raise RuntimeError("the runner's own JSON fails validation: " + "; ".join(bad))
        if args.json:
            tmp = args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump(doc, f, indent=1)
            os.replace(tmp, args.json)
    return doc


def markdown(doc: dict) -> str:
    """model_decode.py's table, then the TP columns (collectives, per-rank step times)."""
    lines = [md.markdown(doc), f"Tensor-parallel over {doc['config']['tp']} ranks: the step's "
             f"collectives (inside `linear` above) timed alone in a CUDA graph, their share in "
             f"the eager profile, and each rank's median step.", "",
             "| context | batch | placement | collectives alone, CUDA graph (ms; CPU: eager) "
             "| share of step | eager profile's comm (ms, launch-bound) | ms/step per rank |",
             "|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        if r["step_ms"] is None:
            continue
        name = r["placement"] + (f" ({r['variant']})" if r.get("variant") else "")
        lines.append(f"| {md._ctx(r['context'])} | {r['batch']} | {name} | "
                     f"{r['comm_graph_ms']:.3f} | {r['comm_graph_ms'] / r['step_ms']:.1%} | "
                     f"{r['comm_eager_ms']:.3f} | "
                     + ", ".join(f"{x:.3f}" for x in r["rank_step_ms"]) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, RuntimeError) as e:
        print(f"model_decode_tp.py: error: {e}", file=sys.stderr)
        sys.exit(2)
