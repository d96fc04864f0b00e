"""Time of the gradient all-reduce of one optimizer step: torch.distributed.all_reduce of a
tensor of the model's size, in a torchrun job (the same backend and links training would use).

    torchrun --nproc-per-node 2 benchmarks/allreduce.py                       # 517,448 float32 (3BPA members 2, 3)
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint NODE0:29500 \\
        benchmarks/allreduce.py --device cuda --numel 517448

Rank 0 prints the median of ``--repeats`` calls after 5 warm-ups.
"""

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--numel", type=int, default=517448, help="parameters of the model")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, the GPU of each local rank)")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    device = torch.device(args.device if args.device == "cpu" else f"cuda:{os.environ.get('LOCAL_RANK', '0')}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    gradient = torch.ones(args.numel, dtype=getattr(torch, args.dtype), device=device)
    seconds = []
    for k in range(5 + args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        dist.all_reduce(gradient)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if k >= 5:
            seconds.append(time.perf_counter() - start)
    if dist.get_rank() == 0:
        megabytes = gradient.numel() * gradient.element_size() / 1e6
        print(f"all_reduce of {megabytes:.2f} MB over {dist.get_world_size()} processes ({dist.get_backend()}): "
              f"median {1000 * statistics.median(seconds):.2f} ms, min {1000 * min(seconds):.2f} ms")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
