"""Can an idle core warm the next expert's weights for the core that computes it? One process, one
libtorch thread: a SwiGLU expert of D_MODEL x D_FF run on one token right after its weights were
read (summed) on the same core, right after they were read on a helper thread (the other core, while
this one waits), or cold (cycling through eight experts whose weights together outgrow the caches).
A worker could read its next expert's weights on a spare core while the current one computes, if
a read there reached this core's caches.

    .venv/bin/python docs/bench/pauses/other_core.py [ROUNDS]
"""

import os
import queue
import statistics
import sys
import threading
import time

import torch

D_MODEL, D_FF, EXPERTS, CALLS_PER_ROUND = 512, 1024, 8, 600


def expert(x, weights):
    w1, w3, w2 = weights
    linear, silu = torch.nn.functional.linear, torch.nn.functional.silu
    return linear(silu(linear(x, w1)) * linear(x, w3), w2)


def read(weights):
    for weight in weights:
        weight.sum()


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    torch.set_num_threads(1)
    experts = [
        (torch.randn(D_FF, D_MODEL), torch.randn(D_FF, D_MODEL), torch.randn(D_MODEL, D_FF)) for _ in range(EXPERTS)
    ]
    x = torch.randn(1, D_MODEL)
    jobs, done = queue.Queue(), queue.Queue()

    # Each thread held to a core of its own (on Linux, pid 0 is the calling thread), so that "the
    # other core" is one.
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[0]})

    def helper():
        os.sched_setaffinity(0, {cores[-1]})
        while True:
            read(jobs.get())
            done.put(None)

    threading.Thread(target=helper, daemon=True).start()
    print(f"{D_MODEL}x{D_FF}, {EXPERTS} experts cycled, one token, median µs of {CALLS_PER_ROUND // 3} calls each")
    for _ in range(rounds):
        times = {"read on this core": [], "read on the other core": [], "cold": []}
        for call in range(CALLS_PER_ROUND):
            weights = experts[call % EXPERTS]
            kind = list(times)[call % 3]
            if kind == "read on this core":
                read(weights)
            elif kind == "read on the other core":
                jobs.put(weights)
                done.get()
            start = time.perf_counter()
            expert(x, weights)
            times[kind].append(time.perf_counter() - start)
        print(", ".join(f"{kind} {1e6 * statistics.median(values):.0f}" for kind, values in times.items()))


if __name__ == "__main__":
    main()
