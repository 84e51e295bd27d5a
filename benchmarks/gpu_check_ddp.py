"""The GPU check's DDP part: a few DistributedDataParallel steps over NCCL (the GPU) or gloo (2 CPU
processes), each rank in a spawned process with a timeout, so a hang is a failed row, not a stuck check."""


import importlib
import json
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from dfineseg.benchmarks.gpu_check_setup import (
    GLOO,
    NUM_CLASSES,
    Clock,
    Settings,
    _sync,
    failed,
    loss_cfg,
    model_cfg,
    row,
    skipped,
    synthetic_batch,
    train_cfg,
)


# ------------------------------------------------------------------ DDP
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world: int, backend: str, init_method: str, device_index: int, size: str, imgsz: int,
                batch: int, steps: int, out_dir: str) -> None:
    """One rank of the DDP check (spawned): a few training steps through DistributedDataParallel, then an
    all-reduce check and the weights' agreement across ranks; writes `rank<N>.json` into `out_dir`."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from dfineseg.loss.criterion import build_criterion, total_loss
    from dfineseg.model.dfine import build_model
    from dfineseg.train.optim import build_optimizer

    if backend == "gloo":
        torch.set_num_threads(1)  # two processes on a small CPU: one thread each
    device = torch.device("cuda", device_index + rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=120), **kwargs)
    try:
        torch.manual_seed(0)  # DDP broadcasts rank 0's weights anyway; the data differ per rank
        model = build_model(model_cfg(size), NUM_CLASSES).to(device).train()
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
        criterion = build_criterion(loss_cfg(), NUM_CLASSES, model.task)
        optimizer = build_optimizer(model, train_cfg(), size)
        images, targets = synthetic_batch(batch, imgsz, device, seed=1 + rank)
        losses, times = [], []
        for _ in range(steps):
            _sync(device)
            t0 = time.perf_counter()
            loss = total_loss(criterion(ddp(images, targets), targets))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg().clip_grad)
            optimizer.step()
            _sync(device)
            times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
        probe = torch.full((1,), float(rank + 1), device=device)
        dist.all_reduce(probe)
        flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
        digest = torch.stack([flat.sum(), flat.abs().sum(), (flat * flat).sum()])
        gathered = [torch.zeros_like(digest) for _ in range(world)]
        dist.all_gather(gathered, digest)
        spread = max(float((g - digest).abs().max() / digest.abs().max().clamp_min(1e-12)) for g in gathered)
        result = {"rank": rank, "device": str(device), "losses": losses, "step_s": times,
                  "all_reduce_ok": float(probe.item()) == world * (world + 1) / 2, "weights_rel_spread": spread}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result), encoding="utf-8")
    finally:
        dist.destroy_process_group()


def ddp_case(backend: str, world: int, s: Settings, device: Any, clock: Clock) -> dict[str, Any]:
    """Spawn `world` ranks; ok when every rank finished with finite losses, a correct all-reduce and the same
    weights, failed (with the error text) otherwise, including a hang past the time left."""
    import torch.multiprocessing as mp

    if backend == "gloo":
        size, imgsz, batch, steps, index = GLOO["size"], GLOO["imgsz"], GLOO["batch"], GLOO["steps"], 0
        case = f"gloo, {world} CPU processes"
    else:
        size, imgsz, batch, steps, index = s.ddp_size, s.ddp_imgsz, s.ddp_batch, s.ddp_steps, device.index or 0
        case = f"nccl, world size {world} ({'one GPU' if world == 1 else f'{world} GPUs'})"
    fields = {"backend": backend, "world_size": world, "size": size, "imgsz": imgsz, "batch": batch, "steps": steps}
    reason = clock.spent_reason()
    if reason:
        return skipped("ddp", case, reason, **fields)
    # The worker is pickled by reference: take it from the importable module, not from a `__main__` copy.
    worker = importlib.import_module("dfineseg.benchmarks.gpu_check_ddp")._ddp_worker
    out_dir = tempfile.mkdtemp(prefix="dfineseg-gpu-check-ddp-")
    timeout = max(20.0, min(150.0, clock.left()))
    t0 = time.monotonic()
    try:
        ctx = mp.spawn(worker, args=(world, backend, f"tcp://127.0.0.1:{free_port()}", index, size, imgsz, batch,
                                     steps, out_dir), nprocs=world, join=False)
        while not ctx.join(timeout=max(0.1, timeout - (time.monotonic() - t0))):
            if time.monotonic() - t0 >= timeout:
                for proc in ctx.processes:
                    if proc.is_alive():
                        proc.kill()
                        proc.join(10)
                raise TimeoutError(f"{backend} ranks did not finish within {timeout:.0f} s (killed)")
        results = [json.loads(Path(out_dir, f"rank{r}.json").read_text(encoding="utf-8")) for r in range(world)]
    except Exception as exc:  # noqa: BLE001  (a failure is a result here)
        return failed("ddp", case, exc, **fields, wall_s=time.monotonic() - t0)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    problems = []
    if not all(all(map(_finite, r["losses"])) for r in results):
        problems.append("non-finite loss")
    if not all(r["all_reduce_ok"] for r in results):
        problems.append("all_reduce returned a wrong sum")
    spread = max(r["weights_rel_spread"] for r in results)
    if spread > 1e-6:
        problems.append(f"ranks' weights differ after the steps (relative {spread:.2e})")
    step_s = statistics.median(results[0]["step_s"])
    out = row("ddp", case, "failed" if problems else "ok", **fields, wall_s=time.monotonic() - t0, step_s=step_s,
              losses=results[0]["losses"], weights_rel_spread=spread, ranks=results)
    if problems:
        out["error"] = "; ".join(problems)
    return out


def _finite(v: float) -> bool:
    return v == v and abs(v) != float("inf")


