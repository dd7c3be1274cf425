"""Does a step run slower after a longer pause? One process, one libtorch thread: the same 1-token
top-2 call through two SwiGLU experts of D_MODEL x D_FF, in blocks of calls with a fixed pause
after each call (half asleep, half spinning, as a compute thread waits and then wakes), the pauses
alternated block by block. A distributed call keeps its worker's compute thread idle longer between
steps than the in-process layer does (the call's network phase), so this is what that alone costs.

    .venv/bin/python docs/bench/pauses/pauses.py [BLOCKS [PAUSE_MS ...]]
"""

import statistics
import sys
import time

import torch

D_MODEL, D_FF, CALLS_PER_BLOCK = 512, 1024, 50


def main():
    blocks = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    pauses_ms = [float(pause) for pause in sys.argv[2:]] or [0.0, 0.13, 0.47]
    torch.set_num_threads(1)
    experts = [(torch.randn(2 * D_FF, D_MODEL) * 0.02, torch.randn(D_MODEL, D_FF) * 0.02) for _ in range(8)]
    x = torch.randn(1, D_MODEL)

    def call():
        start = time.perf_counter()
        for expert in (3, 5):
            w_in, w2 = experts[expert]
            gate, up = (x @ w_in.T).split(D_FF, dim=1)
            _ = (torch.nn.functional.silu(gate) * up) @ w2.T
        return time.perf_counter() - start

    def block(pause_s):
        times = []
        for _ in range(CALLS_PER_BLOCK):
            times.append(call())
            if pause_s:
                end = time.perf_counter() + pause_s
                time.sleep(pause_s / 2)
                while time.perf_counter() < end:
                    pass
        return statistics.median(times) * 1e3

    for pause_ms in pauses_ms:  # warm-up, unmeasured
        block(pause_ms / 1e3)
    medians = {pause_ms: [] for pause_ms in pauses_ms}
    for index in range(blocks):
        for pause_ms in pauses_ms if index % 2 else pauses_ms[::-1]:
            medians[pause_ms].append(block(pause_ms / 1e3))
    for pause_ms, times in medians.items():
        spread = sorted(times)
        print(f"pause {pause_ms:.2f} ms after each call: a call's two experts {statistics.median(spread):.3f} ms at the"
              f" median of {blocks} blocks' medians ({spread[len(spread) // 10]:.3f}-{spread[-len(spread) // 10 - 1]:.3f}"
              f" p10-p90), {CALLS_PER_BLOCK} calls a block")
    for shorter, longer in zip(pauses_ms, pauses_ms[1:]):
        slower = sum(b > a for a, b in zip(medians[shorter], medians[longer]))
        print(f"after {longer:.2f} ms slower than after {shorter:.2f} ms in {slower} of {blocks} blocks (each pair run back to back)")


main()
