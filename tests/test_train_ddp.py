"""Two-process DDP training on CPU (gloo), launched the way `make train GPUS=2` launches it."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO_ROOT


def test_two_process_ddp_run_finishes_and_rank0_writes_checkpoints(tmp_path):
    from dfineseg.data.synthetic import write_synthetic_dataset
    from dfineseg.model.checkpoint import load_checkpoint

    data_yaml = write_synthetic_dataset(tmp_path / "data", n_train=4, n_val=1, seed=1)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "dfineseg.cli", "train", f"data={data_yaml}", "imgsz=64", "epochs=2", "batch=1", "workers=0",
        "device=cpu", f"project={tmp_path / 'runs'}", "name=ddp", "model.size=tiny", "model.num_queries=10",
        "model.num_denoising=4", "train.accumulate=2", "train.tensorboard=false", "train.plot_images=0",
        "eval.plots=false", "train.warmup_iters=1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "runs" / "ddp"
    ckpt = load_checkpoint(run / "last.pt")
    # 4 images over 2 ranks at batch 1 = 2 micro-batches per rank per epoch; accumulate 2 -> 1 step/epoch.
    assert ckpt["step"] == 2 and ckpt["epoch"] == 2
    assert (run / "best.pt").is_file() and (run / "results.csv").is_file()
    # Only rank 0 writes: one run folder, no second `ddp2` from another rank.
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["ddp"]
