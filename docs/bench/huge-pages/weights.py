"""Does it matter whether an expert's weights lie on huge pages? One process, one libtorch thread:
eight SwiGLU experts of D_MODEL x D_FF whose weights lie on 2 MiB pages, eight on 4 KiB pages, the
same 1-token top-2 calls through each set in alternated blocks.

    .venv/bin/python docs/bench/huge-pages/weights.py [D_MODEL D_FF [BLOCKS CALLS_PER_BLOCK]]
"""

import ctypes
import random
import statistics
import sys
import time

import torch

MADV_HUGEPAGE, MADV_NOHUGEPAGE = 14, 15
HUGE_PAGE, PAGE = 2 << 20, 4096
libc = ctypes.CDLL("libc.so.6", use_errno=True)
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def weight(rows, cols, huge):
    """A [rows, cols] f32 weight that begins where a huge page does, advised before its first touch."""
    size = rows * cols * 4
    allocation = torch.empty(size + HUGE_PAGE, dtype=torch.uint8)
    start = allocation.data_ptr()
    offset = -start % HUGE_PAGE
    advice = MADV_HUGEPAGE if huge else MADV_NOHUGEPAGE
    assert libc.madvise(start + offset, size // PAGE * PAGE, advice) == 0, ctypes.get_errno()
    w = allocation[offset:offset + size].view(torch.float32).view(rows, cols)
    w.copy_(torch.randn(rows, cols) * 0.02)
    return w


def anon_huge_kib():
    with open("/proc/self/smaps") as smaps:
        return sum(int(line.split()[1]) for line in smaps if line.startswith("AnonHugePages"))


def main():
    defaults = [512, 1024, 40, 100]
    given = [int(argument) for argument in sys.argv[1:5]]
    d_model, d_ff, blocks, calls = given + defaults[len(given):]
    torch.set_num_threads(1)
    experts = {}
    for huge in (True, False):
        before = anon_huge_kib()
        experts[huge] = [(weight(2 * d_ff, d_model, huge), weight(d_model, d_ff, huge)) for _ in range(8)]
        print(f"{'2 MiB' if huge else '4 KiB'} pages: {anon_huge_kib() - before} KiB of the weights on huge pages")
    x = torch.randn(1, d_model)
    random.seed(1)
    pairs = [tuple(random.sample(range(8), 2)) for _ in range(calls)]

    def block(huge):
        start = time.perf_counter()
        for pair in pairs:
            for expert in pair:
                w_in, w2 = experts[huge][expert]
                gate, up = (x @ w_in.T).split(d_ff, dim=1)
                _ = (torch.nn.functional.silu(gate) * up) @ w2.T
        return (time.perf_counter() - start) / calls * 1e3

    block(True)  # warm-up, unmeasured
    block(False)
    times = {True: [], False: []}
    for index in range(blocks):
        for huge in (True, False) if index % 2 else (False, True):
            times[huge].append(block(huge))
    for huge in (True, False):
        spread = sorted(times[huge])
        print(f"{'2 MiB' if huge else '4 KiB'} pages: a call's two experts {statistics.median(spread):.3f} ms at the"
              f" median ({spread[len(spread) // 10]:.3f}-{spread[-len(spread) // 10 - 1]:.3f} p10-p90), {blocks} blocks"
              f" of {calls} calls")
    faster = sum(a < b for a, b in zip(times[True], times[False]))
    print(f"2 MiB pages faster in {faster} of {blocks} alternated pairs of blocks")


main()
