"""Speed of the selective scan's backends and of the history encoder, on the CPU and, where there is one, the GPU.

    python bench/scan_speed_bench.py [--batch 64] [--dim 128] [--state 16] [--lengths 16,64,256,1024]
                                     [--devices cpu,cuda]

Times one forward and backward pass (float32; the backward of a fixed random contraction of y)
of `twin.dynamics.selective_scan` for each backend and device it can run on:

    reference   the loop over time steps (lengths up to 256: it is the specification, not a path)
    torch       the chunked scan, at chunk sizes 4 (the default), 16 and 64
    cuda        mamba-ssm's fused kernel (a GPU with mamba-ssm's kernels installed)

then the history encoder (`HistoryEncoder`, 2 layers, d_model 64, batch 256 histories of 12
visits), forward and backward, on each device, in float32 and, on the GPU, under bfloat16
autocast. Each figure is the median of repeated runs after a warm-up, in milliseconds; on the
GPU the clock waits for the device (torch.cuda.synchronize).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from twin.dynamics.mamba import HistoryEncoder
from twin.dynamics.selective_scan import _kernel, selective_scan


def _timed(step, device: torch.device, budget: float = 0.5, most: int = 50) -> float:
    """Median milliseconds of step() after one warm-up, over up to `most` runs or `budget` seconds."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step()
    sync()
    times = []
    start = time.perf_counter()
    while len(times) < most and (len(times) < 3 or time.perf_counter() - start < budget):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def _scan_inputs(batch, dim, state, L, device):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = dict(u=r(batch, dim, L), delta=r(batch, dim, L).abs() * 0.5, A=-torch.rand(dim, state, generator=g) * 2 - 0.1,
             B=r(batch, state, L), C=r(batch, state, L), D=r(dim), z=r(batch, dim, L), delta_bias=r(dim).abs() * 0.1)
    return {k: v.to(device).requires_grad_(True) for k, v in x.items()}


def scan_step(x, backend, chunk=4):
    w = torch.ones_like(x["u"])

    def step():
        y = selective_scan(**x, delta_softplus=True, backend=backend, chunk=chunk)
        torch.autograd.grad((y * w).sum(), list(x.values()))
    return step


def encoder_step(device, autocast: bool):
    torch.manual_seed(0)
    encoder = HistoryEncoder(12, 8, d_model=64, n_layers=2).to(device)
    tokens, gap = torch.randn(256, 12, 12, device=device), torch.rand(256, 12, device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            q = encoder.posterior(tokens, gap)
            loss = q.mean.float().square().sum() + q.log_std.float().sum()
        encoder.zero_grad()
        loss.backward()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--lengths", default="16,64,256,1024")
    parser.add_argument("--devices", default="cpu,cuda", help="those of these that exist (default: cpu and the GPU if any)")
    args = parser.parse_args()
    lengths = [int(v) for v in args.lengths.split(",")]
    devices = [torch.device(d) for d in args.devices.split(",") if d == "cpu" or (d == "cuda" and torch.cuda.is_available())]
    kernel, error = _kernel()
    print(f"torch {torch.__version__}; threads {torch.get_num_threads()}; "
          + (f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no GPU")
          + f"; mamba-ssm kernels: {'yes' if kernel else f'no ({error})'}")

    print(f"\nselective scan, forward + backward, ms (batch {args.batch}, dim {args.dim}, state {args.state}, float32)")
    columns = [("reference", None), ("torch", 4), ("torch", 16), ("torch", 64), ("cuda", None)]
    print(f"{'device':7s} {'L':>5s} " + " ".join(f"{b + (f'/{c}' if c else ''):>11s}" for b, c in columns))
    for device in devices:
        for L in lengths:
            x = _scan_inputs(args.batch, args.dim, args.state, L, device)
            cells = []
            for backend, chunk in columns:
                runs = {"reference": L <= 256, "torch": True, "cuda": device.type == "cuda" and kernel is not None}[backend]
                cells.append(f"{_timed(scan_step(x, backend, chunk or 4), device):11.2f}" if runs else f"{'-':>11s}")
            print(f"{device.type:7s} {L:5d} " + " ".join(cells))

    print("\nhistory encoder (2 layers, d_model 64, 256 histories x 12 visits), forward + backward, ms")
    for device in devices:
        for autocast in ([False, True] if device.type == "cuda" else [False]):
            print(f"{device.type:7s} {'bfloat16 autocast' if autocast else 'float32':18s} "
                  f"{_timed(encoder_step(device, autocast), device):9.2f}")


if __name__ == "__main__":
    main()
