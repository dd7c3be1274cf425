#!/usr/bin/env python3
"""A plain PyTorch MoE layer (Mixtral's: softmax router, top-k renormalised, SwiGLU experts) on the
shapes of a Switchyard bench, timed the way the bench times the in-process reference layer: the
yardstick of "the reference within 1.3x of PyTorch" (issue 11).

Two timings per token count, mean over --calls after warm-up, CUDA synchronised:
- `device_ms`: hidden states already on the device, output left there (what a model's forward pays);
- `host_ms`: f32 hidden states on the host in, f32 output on the host out (what the reference layer,
  which is called with host f32 rows, pays).

Two more layouts of the experts' products, with the hidden states on the device, for what a
worker's step could gain (the worker already keeps w1 and w3 as one `[2·d_ff, d_model]` matrix):
- `fused_loop_device_ms`: one product for w1 and w3 per expert, expert after expert (the worker's
  step today);
- `grouped_device_ms`: the rows sorted by expert and every expert's product in one launch
  (`torch._grouped_mm`, CUTLASS on sm90 in bf16; elsewhere torch loops over the experts itself).
Each layout's output is checked against the plain layer's (`max_abs_difference_*`).

    python3 scripts/torch_moe_baseline.py --dims 4096x14336 --experts 8 --top-k 2 \\
        --tokens 1,1024,4096 --dtype bf16 --out report/torch-baseline.json
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", default="4096x14336", help="d_model x d_ff")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", default="1,1024,4096", help="comma-separated tokens per call")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--out", help="write the figures as JSON here")
    return parser.parse_args()


class MoeLayer(torch.nn.Module):
    def __init__(self, d_model, d_ff, experts, top_k, dtype, device):
        super().__init__()
        self.top_k = top_k
        options = dict(dtype=dtype, device=device)
        self.gate = torch.randn(experts, d_model, **options) / d_model ** 0.5
        self.w1 = torch.randn(experts, d_ff, d_model, **options) / d_model ** 0.5
        self.w3 = torch.randn(experts, d_ff, d_model, **options) / d_model ** 0.5
        self.w2 = torch.randn(experts, d_model, d_ff, **options) / d_ff ** 0.5
        # `[experts, d_model, 2·d_ff]` and `[experts, d_ff, d_model]`: the column-major views of
        # the stacked `nn.Linear` weights that `_grouped_mm` takes as its right-hand operands.
        self.w13 = torch.cat([self.w1, self.w3], dim=1)
        self.w13_t = self.w13.transpose(-2, -1)
        self.w2_t = self.w2.transpose(-2, -1)

    def route(self, x):
        probabilities = F.softmax(x @ self.gate.T, dim=-1, dtype=torch.float32)
        weights, selected = torch.topk(probabilities, self.top_k, dim=-1)
        return (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype), selected

    @torch.no_grad()
    def forward(self, x):
        weights, selected = self.route(x)
        out = torch.zeros_like(x)
        for expert in range(self.gate.shape[0]):
            token, slot = torch.where(selected == expert)
            if token.numel() == 0:
                continue
            rows = x[token]
            hidden = F.silu(rows @ self.w1[expert].T) * (rows @ self.w3[expert].T)
            out.index_add_(0, token, (hidden @ self.w2[expert].T) * weights[token, slot, None])
        return out

    @torch.no_grad()
    def forward_fused_loop(self, x):
        weights, selected = self.route(x)
        d_ff = self.w1.shape[1]
        out = torch.zeros_like(x)
        for expert in range(self.gate.shape[0]):
            token, slot = torch.where(selected == expert)
            if token.numel() == 0:
                continue
            gate, up = (x[token] @ self.w13[expert].T).split(d_ff, dim=-1)
            out.index_add_(0, token, (F.silu(gate) * up @ self.w2[expert].T) * weights[token, slot, None])
        return out

    @torch.no_grad()
    def forward_grouped(self, x):
        weights, selected = self.route(x)
        d_ff = self.w1.shape[1]
        chosen = selected.flatten()
        order = chosen.argsort(stable=True)
        token = order // self.top_k
        ends = torch.bincount(chosen, minlength=self.gate.shape[0]).cumsum(0).to(torch.int32)
        gate, up = torch._grouped_mm(x[token], self.w13_t, ends).split(d_ff, dim=-1)
        rows = torch._grouped_mm(F.silu(gate) * up, self.w2_t, ends) * weights.flatten()[order, None]
        return torch.zeros_like(x).index_add_(0, token, rows)


def mean_ms(run, calls, warmup, device):
    def synchronize():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(warmup):
        run()
    synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        run()
    synchronize()
    return (time.perf_counter() - started) * 1e3 / calls


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d_model, d_ff = (int(size) for size in args.dims.split("x"))
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[args.dtype]
    layer = MoeLayer(d_model, d_ff, args.experts, args.top_k, dtype, args.device)
    results = []
    for tokens in (int(count) for count in args.tokens.split(",")):
        on_device = torch.randn(tokens, d_model, dtype=dtype, device=args.device)
        on_host = torch.randn(tokens, d_model, dtype=torch.float32)
        if args.device.startswith("cuda"):
            on_host = on_host.pin_memory()
        device_ms = mean_ms(lambda: layer(on_device), args.calls, args.warmup, args.device)
        host_ms = mean_ms(lambda: layer(on_host.to(args.device, dtype)).float().cpu(), args.calls, args.warmup,
                          args.device)
        flops = 2 * 3 * d_model * d_ff * tokens * args.top_k
        result = dict(tokens=tokens, device_ms=device_ms, host_ms=host_ms,
                      expert_tflops_on_device=flops / (device_ms * 1e-3) / 1e12)
        plain = layer(on_device).float()
        for name, forward in (("fused_loop", layer.forward_fused_loop), ("grouped", layer.forward_grouped)):
            result[f"{name}_device_ms"] = mean_ms(lambda: forward(on_device), args.calls, args.warmup, args.device)
            result[f"max_abs_difference_{name}"] = (forward(on_device).float() - plain).abs().max().item()
        print(json.dumps(result), flush=True)
        results.append(result)
    report = dict(device=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                  torch=torch.__version__, dims=args.dims, experts=args.experts, top_k=args.top_k,
                  dtype=args.dtype, calls=args.calls, results=results)
    if args.out:
        with open(args.out, "w") as file:
            json.dump(report, file, indent=2)


if __name__ == "__main__":
    main()
