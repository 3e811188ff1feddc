"""GPU benchmark of the fixed fan-in kernels against the dense baselines (needs CUDA).

For every (L, K): the Triton forward and forward + backward of the fixed fan-in layer, with bf16 weights and
with fp32 weights (the layer as trained: fp32 master weights, bf16 activations); beside them, in the same
process, the two dense baselines over the full (L, D) weight:

- ``dense-fp32-master``: the usual mixed-precision step, fp32 weights under bf16 autocast (autocast casts the
  weight to bf16 on every call; the weight gradient lands in fp32);
- ``dense-bf16``: a pure-bf16 ``F.linear`` (bf16 weights and gradients).

Every variant's floor is the time to move its bytes once (each input read once, each output written once;
the formula is printed with the dtypes) at the device-to-device copy bandwidth measured in the same run,
and each row gives its percentage of that floor. The gathers of ``x`` (B values per connection) are not
counted in the floor: they are what a better kernel keeps on chip.

Grouped fan-in (``--group``, labels in groups of G share one id row, products on tensor cores through
``tl.dot``): the same two timings; its floor is the larger of its bytes (G times fewer id bytes) over the copy
bandwidth and its tensor-core work (2 B L K FLOPs forward, 6 B L K forward + backward) over the bf16 matmul
rate measured in the same run.

The classifier training step (``--step-labels``, default 2,812,281; K = ``--memory-fan-in``): forward, loss
(BCE over 5 positives a row), backward and AdamW update (torch's fused AdamW, fp32 weights and moments), the
input a bf16 (B, D) batch that needs a gradient, as an encoder's output. Fixed fan-in runs its fused-loss
kernel; the dense baseline (fp32 master weights under bf16 autocast) its chunked loss with gradients computed
in the same pass. Each row has the step time, peak memory allocated, and the step's floor: the larger of the
bytes it must move (formula printed) over the copy bandwidth and its FLOPs (6 B L K for the fixed fan-in
gathers, on CUDA cores; 6 B L D for the dense products, on tensor cores) over the matching rate measured in
the same run (an fp32 matmul with TF32 off, a bf16 matmul).

Also measured: peak memory allocated by a forward + backward at K = 64 (fixed fan-in module with fp32
weights under bf16 autocast against the dense fp32-master recipe, parameters included), and the time of
one SET rewiring (prune 25% of every row, regrow at random, reset Adam moments) at the largest L and K,
without and with the rebuild of the column transpose the input-gradient kernel needs.

Rows (device, versions, git revision, date, medians with 20th / 80th percentiles from
``triton.testing.do_bench``) go to ``benchmarks/results/fixed_fanin.jsonl``. ``--device cpu`` smoke-tests
the script at small shapes (kernels in the Triton interpreter under ``TRITON_INTERPRET=1``, wall-clock
timings, no peak memory); its figures mean nothing.

    python benchmarks/bench_fixed_fanin.py [--labels 670091 2812281] [--fan-in 32 64 128] [--batch 128]
        [--group 16] [--device cuda]
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import (
    GIB,
    allocated,
    append_row,
    copy_bandwidth,
    environment,
    free,
    matmul_rate,
    peak_allocated,
    pick_device,
    reset_peak,
    synchronize,
    timed,
)

RESULTS = Path(__file__).parent / "results" / "fixed_fanin.jsonl"


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def floors(
    B: int, D: int, L: int, K: int | None, dt_x, dt_w, dt_i, dt_w_grad, group: int = 1
) -> dict[str, tuple[int, str]]:
    """Bytes that must move for the forward and the forward + backward, with the formula.

    ``K`` None: the dense (L, D) layer. Inputs read once (x, weight, ids, bias, grad_out), outputs written
    once (out, grad_x, grad_w, grad_b). ``group`` G: one id row per G labels."""
    sx, sw, sg = _size(dt_x), _size(dt_w), _size(dt_w_grad)
    if K is None:
        params, params_f = L * D * sw, f"L*D*{sw}"
        grads, grads_f = L * D * sg + L * sg, f"L*D*{sg} + L*{sg}"
    else:
        si = _size(dt_i)
        if group > 1:
            params, params_f = L * K * sw + -(-L // group) * K * si, f"L*K*{sw} + L/{group}*K*{si}"
        else:
            params, params_f = L * K * (sw + si), f"L*K*({sw}+{si})"
        grads, grads_f = L * K * sg + L * sg, f"L*K*{sg} + L*{sg}"
    bias, bias_f = L * sw, f"L*{sw}"
    act, act_f = B * D * sx + B * L * sx, f"B*D*{sx} + B*L*{sx}"  # x read, out written (x's dtype)
    forward = params + bias + act
    backward_extra = B * L * sx + B * D * sx + grads  # grad_out read, grad_x and weight grads written
    return {
        "forward": (forward, f"{params_f} + {bias_f} + {act_f}"),
        "forward_backward": (
            forward + backward_extra,
            f"{params_f} + {bias_f} + {act_f} + B*L*{sx} + B*D*{sx} + {grads_f}",
        ),
    }


def fanin_variants(x, g, L, K, device, group: int = 1):
    """(name, weight dtype, index dtype, forward fn, forward+backward fn) of the fixed fan-in layer's Triton
    kernels (``group`` 1), or of the grouped layer's (``group`` G > 1)."""
    from xmc.kernels.fanin_common import column_transpose
    from xmc.kernels.fixed_fanin import fixed_fanin_backward_triton, fixed_fanin_forward_triton
    from xmc.kernels.grouped_fanin import grouped_fanin_backward_triton, grouped_fanin_forward_triton

    from xmc.nn.fixed_fanin import FixedFanInLinear

    layer = FixedFanInLinear(x.shape[1], L, K, device=device, group=group)  # hashed ids, as training builds
    indices = layer.indices
    col_ptr, slots = column_transpose(indices, x.shape[1])
    if group == 1:
        fwd, bwd, name = fixed_fanin_forward_triton, fixed_fanin_backward_triton, "fixed"
        grouping = ()
    else:
        fwd, bwd, name = grouped_fanin_forward_triton, grouped_fanin_backward_triton, f"grouped-G{group}"
        grouping = (group,)
    for w_dtype in (torch.bfloat16, torch.float32):
        w = layer.weight.detach().to(w_dtype)
        b = layer.bias.detach().to(w_dtype)

        def forward(w=w, b=b):
            return fwd(x, w, indices, *grouping, b)

        def forward_backward(w=w, b=b):
            fwd(x, w, indices, *grouping, b)
            return bwd(g, x, w, indices, *grouping, col_ptr, slots, True, True, True)

        yield f"{name}-{_name(w_dtype)}-w", w_dtype, indices.dtype, forward, forward_backward


def dense_variants(x, g, L, device):
    """The two dense baselines over a random (L, D) weight, built one after the other."""
    D = x.shape[1]
    gen = torch.Generator(device=device).manual_seed(1)
    p = {}  # the current variant's parameters; cleared before the next variant allocates its own

    def forward_master():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            return F.linear(x, p["w"], p["b"])

    def forward_backward_master():
        p["w"].grad = p["b"].grad = None
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = F.linear(x, p["w"], p["b"])
        out.backward(g)

    def forward_bf16():
        with torch.no_grad():
            return F.linear(x, p["w"], p["b"])

    def forward_backward_bf16():
        p["w"].grad = p["b"].grad = None
        F.linear(x, p["w"], p["b"]).backward(g)

    for name, dtype, forward, forward_backward in (
        ("dense-fp32-master", torch.float32, forward_master, forward_backward_master),
        ("dense-bf16", torch.bfloat16, forward_bf16, forward_backward_bf16),
    ):
        p["w"] = (torch.randn(L, D, device=device, generator=gen) * D**-0.5).to(dtype).requires_grad_()
        p["b"] = torch.zeros(L, device=device, dtype=dtype, requires_grad=True)
        yield name, dtype, None, forward, forward_backward
        p.clear()
        free(device)


def peak_memory(kind: str, B: int, D: int, L: int, K: int, device) -> dict:
    """Peak allocated bytes of one forward + backward (second call, after a warm-up), parameters included,
    with fp32 weights under bf16 autocast (x requires a gradient, as an encoder's output does); None on
    the CPU."""
    from xmc.nn.fixed_fanin import FixedFanInLinear

    free(device)
    base = allocated(device)
    if kind == "fixed":
        module = FixedFanInLinear(D, L, K, device=device)
    else:
        module = torch.nn.Linear(D, L, device=device)
    x = torch.randn(B, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(B, L, device=device, dtype=torch.bfloat16)
    reset_peak(device)  # from here: parameters and inputs, plus what the step adds
    for _ in range(2):
        module.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = module(x)
        out.backward(g)
        del out
        synchronize(device)
    peak = peak_allocated(device)
    del module, x, g
    free(device)
    if peak is None:
        return {"peak_allocated_bytes": None, "peak_allocated_gib": None}
    return {"peak_allocated_bytes": peak - base, "peak_allocated_gib": (peak - base) / GIB}


def classifier_step(kind: str, B: int, D: int, L: int, K: int, device) -> dict:
    """Time and peak memory of one classifier training step (see the module docstring), and its floor terms:
    (bytes that must move, formula) and (FLOPs, the unit that does them)."""
    from xmc.classifiers import DenseClassifier, FixedFanInClassifier
    from xmc.losses import Positives

    free(device)
    base = allocated(device)
    gen = torch.Generator().manual_seed(0)
    positives = Positives.from_lists(torch.randint(0, L, (B, 5), generator=gen).tolist(), L, device=device)
    h = torch.randn(B, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    clf = (
        FixedFanInClassifier(D, L, K, device=device) if kind == "fixed" else DenseClassifier(D, L).to(device)
    )
    optimizer = torch.optim.AdamW(clf.parameters(), lr=1e-3, fused=True)

    def step():
        optimizer.zero_grad(set_to_none=True)
        h.grad = None
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = clf.loss(h, positives, "bce")
        loss.backward()
        optimizer.step()

    step()  # AdamW's moments exist from here on
    reset_peak(device)
    step()
    peak = peak_allocated(device)
    peak = None if peak is None else peak - base
    row = {**timed(step, device), "peak_allocated_bytes": peak}
    row["peak_allocated_gib"] = None if peak is None else peak / GIB
    if kind == "fixed":
        # weights + ids read, grad_w written, the gradient buffer written and read (bf16), the input
        # gradient's column-order weight and slot reads, AdamW: w, grad, m, v read and w, m, v written (fp32).
        row["floor_bytes"] = L * K * (4 + 2 + 4 + 4 + 4 + 28) + 2 * B * L * 2
        row["floor_formula"] = "L*K*(4+2+4+4+4+28) + 2*B*L*2"
        row["flops"], row["flop_unit"] = 6 * B * L * K, "fp32 CUDA cores (6*B*L*K)"
    else:
        # weights read (fp32, cast to bf16 by autocast: read twice), grad_w written, AdamW as above.
        row["floor_bytes"] = L * D * (4 + 4 + 4 + 28)
        row["floor_formula"] = "L*D*(4+4+4+28)"
        row["flops"], row["flop_unit"] = 6 * B * L * D, "bf16 tensor cores (6*B*L*D)"
    return row  # the classifier and its optimizer state go with this frame


def rewiring(L: int, K: int, D: int, device, repeats: int = 7) -> dict:
    """Median time of one SET rewiring (fraction 0.25, random regrowth, AdamW moments reset), and of the
    rewiring plus the rebuild of the column transpose."""
    from xmc.config import SETOptions
    from xmc.nn.fixed_fanin import FixedFanInLinear
    from xmc.sparse.dst import SET

    layer = FixedFanInLinear(D, L, K, device=device)
    optimizer = torch.optim.AdamW([layer.weight], lr=1e-3)
    layer.weight.grad = torch.randn_like(layer.weight)
    optimizer.step()  # creates the moments that rewiring resets
    layer.weight.grad = None
    schedule = SET(layer, total_steps=10**9, config=SETOptions(fraction=0.25), optimizer=optimizer)
    rewire_ms, with_transpose_ms, changed = [], [], 0
    for step in range(1, repeats + 3):
        synchronize(device)
        start = time.perf_counter()
        changed = schedule.rewire(step)
        synchronize(device)
        middle = time.perf_counter()
        layer.column_transpose()
        synchronize(device)
        end = time.perf_counter()
        if step > 2:  # warm-up rewirings
            rewire_ms.append((middle - start) * 1e3)
            with_transpose_ms.append((end - start) * 1e3)
    rewire_ms.sort()
    with_transpose_ms.sort()
    cuda = device.type == "cuda"
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as prof:
        schedule.rewire(repeats + 3)
        synchronize(device)
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=8))  # where a rewiring spends
    del layer, optimizer, schedule
    return {
        "rewire_ms": rewire_ms[len(rewire_ms) // 2],
        "rewire_all_ms": rewire_ms,
        "rewire_plus_transpose_ms": with_transpose_ms[len(with_transpose_ms) // 2],
        "slots_regrown": changed,
    }


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--labels", nargs="+", type=int, default=[670_091, 2_812_281])
    parser.add_argument("--fan-in", nargs="+", type=int, default=[32, 64, 128])
    parser.add_argument("--group", nargs="*", type=int, default=[16], help="grouped fan-in G (none: skip)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--memory-fan-in", type=int, default=64)
    parser.add_argument("--rewire-fan-in", type=int, default=128)
    parser.add_argument("--step-labels", type=int, default=2_812_281)
    parser.add_argument("--skip", nargs="*", default=[], choices=["kernels", "memory", "step", "rewire"])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument(
        "--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke test at small shapes"
    )
    args = parser.parse_args()
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    B, D = args.batch, args.dim
    meta = {**environment(device), "B": B, "D": D}
    bandwidth = copy_bandwidth(device, GIB if cuda else 64 * 2**20)
    rate = matmul_rate(device, torch.bfloat16, 8192 if cuda else 256)
    fp32_rate = matmul_rate(device, torch.float32, 8192 if cuda else 256)
    ceilings = {"copy_bytes_per_s": bandwidth, "bf16_flops": rate, "fp32_flops": fp32_rate}
    append_row(args.results, {**meta, "bench": "ceilings", **ceilings})
    print(
        f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write), bf16 matmul {rate / 1e12:.0f} TFLOP/s, "
        f"fp32 matmul (no TF32) {fp32_rate / 1e12:.0f} TFLOP/s"
    )

    table = []
    gen = torch.Generator(device=device).manual_seed(0)
    for L in args.labels:
        x = torch.randn(B, D, device=device, dtype=torch.bfloat16, generator=gen)
        g = torch.randn(B, L, device=device, dtype=torch.bfloat16, generator=gen)
        if "kernels" not in args.skip:
            # Lazily: each variant's tensors are freed before the next one's are built.
            runs = itertools.chain(
                ((K, 1, v) for K in args.fan_in for v in fanin_variants(x, g, L, K, device)),
                (
                    (K, G, v)
                    for K in args.fan_in
                    for G in args.group
                    for v in fanin_variants(x, g, L, K, device, G)
                ),
                ((None, 1, v) for v in dense_variants(x, g, L, device)),
            )
            for K, G, (name, w_dtype, i_dtype, forward, forward_backward) in runs:
                grad_dtype = w_dtype
                bytes_ = floors(B, D, L, K, torch.bfloat16, w_dtype, i_dtype, grad_dtype, G)
                for what, fn in (("forward", forward), ("forward_backward", forward_backward)):
                    row = {**meta, "bench": "kernel", "variant": name, "L": L, "K": K, "G": G, "what": what}
                    row["weight_dtype"], row["x_dtype"] = _name(w_dtype), "bfloat16"
                    row["id_dtype"] = _name(i_dtype) if i_dtype else None
                    try:
                        row.update(timed(fn, device))
                    except Exception as err:  # a failing variant is reported, the others still run
                        row["error"] = f"{type(err).__name__}: {err}"
                        append_row(args.results, row)
                        continue
                    floor_bytes, formula = bytes_[what]
                    row["floor_bytes"], row["floor_formula"] = floor_bytes, formula
                    row["floor_ms"] = row["bytes_floor_ms"] = floor_bytes / bandwidth * 1e3
                    if G > 1:  # tensor-core products: 2 B L K FLOPs each, one forward, three in all
                        flops = 2 * B * L * K * (1 if what == "forward" else 3)
                        row["compute_floor_ms"] = flops / rate * 1e3
                        row["compute_formula"] = (
                            f"{flops:.3e} FLOP ({'2' if what == 'forward' else '6'}*B*L*K)"
                        )
                        row["floor_ms"] = max(row["floor_ms"], row["compute_floor_ms"])
                    row["floor_pct"] = 100 * row["floor_ms"] / row["ms"]
                    append_row(args.results, row)
                    table.append(row)
                free(device)
        del g
        free(device)
        if "memory" not in args.skip:
            K = args.memory_fan_in
            peaks = {kind: peak_memory(kind, B, D, L, K, device) for kind in ("fixed", "dense")}
            row = {**meta, "bench": "peak_memory", "L": L, "K": K, "fixed": peaks["fixed"]}
            row["dense_fp32_master"] = peaks["dense"]
            if cuda:
                ratio = peaks["dense"]["peak_allocated_bytes"] / peaks["fixed"]["peak_allocated_bytes"]
                row["dense_over_fixed"] = ratio
                print(
                    f"L={L} K={K} peak allocated fwd+bwd: fixed "
                    f"{peaks['fixed']['peak_allocated_gib']:.2f} GiB, dense fp32-master "
                    f"{peaks['dense']['peak_allocated_gib']:.2f} GiB ({ratio:.1f}x)"
                )
            append_row(args.results, row)
    if "step" not in args.skip:
        L, K = args.step_labels, args.memory_fan_in
        steps = {}
        for kind in ("fixed", "dense"):
            row = {
                **meta,
                "bench": "classifier_step",
                "variant": kind,
                "L": L,
                "K": K if kind == "fixed" else None,
            }
            try:
                row.update(classifier_step(kind, B, D, L, K, device))
            except torch.OutOfMemoryError as err:
                row["error"] = f"OutOfMemoryError: {err}"
                append_row(args.results, row)
                continue
            row["bytes_floor_ms"] = row["floor_bytes"] / bandwidth * 1e3
            unit_rate = fp32_rate if kind == "fixed" else rate
            row["compute_floor_ms"] = row["flops"] / unit_rate * 1e3
            row["floor_ms"] = max(row["bytes_floor_ms"], row["compute_floor_ms"])
            row["floor_pct"] = 100 * row["floor_ms"] / row["ms"]
            append_row(args.results, row)
            steps[kind] = row
            free(device)
        if len(steps) == 2 and cuda:
            fixed, dense = steps["fixed"], steps["dense"]
            print(
                f"classifier step L={L} K={K}: fixed fan-in {fixed['ms']:.2f} ms "
                f"({fixed['floor_pct']:.0f}% of floor), {fixed['peak_allocated_gib']:.2f} GiB; "
                f"dense {dense['ms']:.2f} ms, "
                f"{dense['peak_allocated_gib']:.2f} GiB; dense / fixed {dense['ms'] / fixed['ms']:.1f}x"
            )
    if "rewire" not in args.skip:
        L, K = max(args.labels), args.rewire_fan_in
        row = {**meta, "bench": "set_rewiring", "L": L, "K": K, **rewiring(L, K, D, device)}
        append_row(args.results, row)
        print(
            f"SET rewiring L={L} K={K}: {row['rewire_ms']:.1f} ms median "
            f"({row['rewire_plus_transpose_ms']:.1f} ms with the column transpose)"
        )

    print(f"\n{'variant':<22}{'L':>10}{'K':>5} {'what':<17}{'ms':>9}{'floor ms':>10}{'% floor':>9}")
    for r in table:
        print(
            f"{r['variant']:<22}{r['L']:>10}{r['K'] or '-':>5} {r['what']:<17}{r['ms']:>9.3f}"
            f"{r['floor_ms']:>10.3f}{r['floor_pct']:>8.1f}%"
        )


if __name__ == "__main__":
    main()
