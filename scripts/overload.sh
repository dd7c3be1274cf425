#!/usr/bin/env bash
# Goodput under overload, on a local cluster: the closed-loop capacity first (4 callers), then an
# open loop at 10x that rate, with the workers' RSS sampled every 5 s. Goodput is the open loop's
# successful calls per second over the real time its calls took (until the last one ended, not
# just its window), against capacity; both runs warm up for 2 s first.
#
#   scripts/overload.sh [--duration 60s] [--tokens 512] [--factor 10] [--out DIR] [-- loadtest flags]
#
# Extra flags after `--` go to both load tests (e.g. `-- --throttle-ratio 0`, `-- --on-refusal overflow`).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$SWITCHYARD_ROOT"

duration=60s tokens=512 factor=10 out=target/overload
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) duration=$2; shift 2 ;;
    --tokens) tokens=$2; shift 2 ;;
    --factor) factor=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "unknown flag $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
extra=("$@")
switchyard=target/release/switchyard
[ -x "$switchyard" ] || { echo "$switchyard is missing: run scripts/setup.sh first" >&2; exit 1; }
mkdir -p "$out"
model=(--d-model 1024 --d-ff 4096)

"$switchyard" local --workers 2 "${model[@]}" >"$out/local.out" 2>"$out/local.err" &
local_pid=$!
trap 'kill "$local_pid" 2>/dev/null || true; wait "$local_pid" 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  grep -q '^coordinator ' "$out/local.out" 2>/dev/null && break
  kill -0 "$local_pid" 2>/dev/null || { cat "$out/local.err" >&2; exit 1; }
  sleep 0.2
done
coordinator=$(awk '/^coordinator /{print $2}' "$out/local.out")
[ -n "$coordinator" ] || { echo "the local cluster did not start" >&2; exit 1; }
workers=$(pgrep -P "$local_pid" -f switchyard-worker | tr '\n' ' ')
echo "cluster: coordinator $coordinator, worker pids $workers" >&2

rss() { for pid in $workers; do awk '/VmRSS/{printf "%d ", $2/1024}' "/proc/$pid/status"; done; }

load=(--coordinator "$coordinator" --tokens "$tokens" --warmup 2s "${extra[@]}")
echo "closed loop, 4 callers, 10 s..." >&2
"$switchyard" loadtest "${load[@]}" --concurrency 4 --duration 10s --json "$out/capacity.json" >"$out/capacity.txt"
capacity=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[0]['calls_per_s'])" "$out/capacity.json")
rate=$(python3 -c "print(round($capacity * $factor, 2))")
echo "capacity $capacity calls/s; open loop at $rate calls/s for $duration..." >&2

: >"$out/rss.txt"
"$switchyard" loadtest "${load[@]}" --rate "$rate" --duration "$duration" --json "$out/open.json" >"$out/open.txt" &
open_pid=$!
elapsed=0
while kill -0 "$open_pid" 2>/dev/null; do
  echo "$elapsed $(rss)" >>"$out/rss.txt"
  sleep 5
  elapsed=$((elapsed + 5))
done
wait "$open_pid"

python3 - "$out" "$capacity" "$rate" <<'PY'
import json, sys
out, capacity, rate = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
summary = json.load(open(f"{out}/open.json"))[0]
closed = json.load(open(f"{out}/capacity.json"))[0]
wall, goodput = summary["elapsed_s"], summary["calls_per_s"]
# Under --on-refusal overflow or next-best calls succeed with refused assignments left out: the
# work done is the assignments computed (moved ones included), against the closed loop's.
computed = (summary["assignments"] - summary["refused"]) / wall
capacity_assignments = closed["assignments"] / max(closed["calls"], 1) * capacity
samples = [line.split() for line in open(f"{out}/rss.txt") if line.strip()]
after_10s = [s for s in samples if int(s[0]) >= 10]  # the open loop's first 10 s include its warm-up
lines = [
    f"capacity (closed loop, 4 callers): {capacity:.2f} calls/s",
    f"open loop at {rate:.2f} calls/s: {summary['calls']} ok, {summary['failed']} failed {summary['errors']} in {wall:.1f} s",
    f"goodput: {goodput:.2f} calls/s = {100 * goodput / capacity:.0f}% of capacity",
    f"assignments computed: {computed:.0f}/s = {100 * computed / capacity_assignments:.0f}% of capacity's "
    f"{capacity_assignments:.0f}/s ({summary['refused']} of {summary['assignments']} refused and overflowed, "
    f"{summary['rerouted']} moved to a next-best expert)",
]
if len(after_10s) > 1:
    times = [int(s[0]) for s in after_10s]
    for worker in range(len(after_10s[0]) - 1):
        rss = [int(s[worker + 1]) for s in after_10s]
        # Least-squares trend: growth shows as a slope, a step's transient tensors as the range.
        mean_t, mean_r = sum(times) / len(times), sum(rss) / len(rss)
        slope = sum((t - mean_t) * (r - mean_r) for t, r in zip(times, rss)) / sum((t - mean_t) ** 2 for t in times)
        lines.append(
            f"worker {worker} RSS after 10 s -> end: {rss[0]} -> {rss[-1]} MiB; range {min(rss)}-{max(rss)} "
            f"({100 * (max(rss) - rss[0]) / rss[0]:+.0f}% at most); trend {60 * slope:+.0f} MiB/min ({100 * 60 * slope / mean_r:+.1f}%/min)"
        )
print("\n".join(lines))
open(f"{out}/report.txt", "w").write("\n".join(lines) + "\n")
PY
