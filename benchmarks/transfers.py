"""Host-device copies of expert weights, the ways an offloaded model can make them, on one GPU.

LLM Compressor keeps an offloaded model's weights in (pageable) CPU memory: each weight is copied to the GPU when
first read in a layer, and each quantized weight is copied back with ``update_offload_parameter``. At
DeepSeek-V3's layer shape that is 22.5 GB each way. This measures, for ``--count`` weights of one shape:

- to the GPU: one ``.to`` after another (compressed-tensors' onload), the same from several threads (on the
  current stream, and each on a stream of its own), and through a pinned buffer (a CPU copy of a batch into it,
  then one transfer);
- back to the CPU: one ``copy_`` after another, the same from several threads, and through a pinned buffer
  (one device-to-host copy of a batch, then a CPU copy into each weight).

Prints the rates in GB/s per round, then one line of JSON.

    python benchmarks/transfers.py --count 256 --rows 2048 --columns 7168 --threads 4 8
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

import torch


def timed(function) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    function()
    torch.cuda.synchronize()
    return time.perf_counter() - started


def to_device(host: list[torch.Tensor], threads: int, streams: bool = False) -> list[torch.Tensor]:
    if threads == 1:
        return [weight.to("cuda") for weight in host]

    def send(weight: torch.Tensor) -> torch.Tensor:
        if not streams:
            return weight.to("cuda")
        with torch.cuda.stream(torch.cuda.Stream()):
            sent = weight.to("cuda")
            torch.cuda.current_stream().synchronize()
        return sent

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(send, host))


def to_device_pinned(host: list[torch.Tensor], batch: int) -> list[torch.Tensor]:
    """Through a pinned buffer: a (threaded) CPU copy of a batch into it, then one transfer."""
    pinned = torch.empty((batch, *host[0].shape), dtype=host[0].dtype, pin_memory=True)
    sent = []
    for start in range(0, len(host), batch):
        sources = host[start:start + batch]
        staged = pinned[:len(sources)]
        torch.stack(sources, out=staged)
        sent += list(staged.to("cuda").unbind(0))
    return sent


def to_host(host: list[torch.Tensor], device: list[torch.Tensor], threads: int) -> None:
    if threads == 1:
        for destination, source in zip(host, device):
            destination.copy_(source)
        return
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda pair: pair[0].copy_(pair[1]), zip(host, device)))


def to_host_pinned(host: list[torch.Tensor], device: list[torch.Tensor], batch: int) -> None:
    pinned = torch.empty((batch, *host[0].shape), dtype=host[0].dtype, pin_memory=True)
    for start in range(0, len(host), batch):
        sources = device[start:start + batch]
        staged = pinned[:len(sources)]
        staged.copy_(torch.stack(sources))
        for destination, source in zip(host[start:start + batch], staged):
            destination.copy_(source)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=256)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--columns", type=int, default=7168)
    parser.add_argument("--threads", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--batch", type=int, default=36, help="weights per pinned staging copy")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    host = [torch.randn(args.rows, args.columns).to(torch.bfloat16) for _ in range(args.count)]
    gigabytes = sum(w.numel() * w.element_size() for w in host) / 1e9
    results: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for threads in (1, *args.threads):
            device: list[torch.Tensor] = []
            seconds = timed(lambda: device.extend(to_device(host, threads)))
            results.setdefault(f"to_gpu_threads{threads}", []).append(gigabytes / seconds)
            seconds = timed(lambda: to_host(host, device, threads))
            results.setdefault(f"to_cpu_threads{threads}", []).append(gigabytes / seconds)
            if threads > 1:
                seconds = timed(lambda: to_device(host, threads, streams=True))
                results.setdefault(f"to_gpu_threads{threads}_streams", []).append(gigabytes / seconds)
            if threads == 1:
                seconds = timed(lambda: to_device_pinned(host, args.batch))
                results.setdefault(f"to_gpu_pinned_batch{args.batch}", []).append(gigabytes / seconds)
                seconds = timed(lambda: to_host_pinned(host, device, args.batch))
                results.setdefault(f"to_cpu_pinned_batch{args.batch}", []).append(gigabytes / seconds)
            del device
            torch.cuda.empty_cache()
    for key, rates in results.items():
        print(f"{key:28s} " + "  ".join(f"{rate:6.1f} GB/s" for rate in rates))
    print(json.dumps({"gigabytes": gigabytes, "torch_threads": torch.get_num_threads(),
                      "gb_per_s": results, "gpu": torch.cuda.get_device_name()}))


if __name__ == "__main__":
    main()
