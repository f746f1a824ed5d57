"""Is the compiled step's gradient the eager one's? The paper-shape benchmark (bench_gpu.py) found the LoRA gradient of
its compiled bf16 step 0.32 away (relative L2) from the eager bf16 one. This script puts that number beside the noise
floors that decide whether it is an error: the same eager step run twice, and eager bf16 against eager float32 (the
rounding that bf16 itself costs). One batch of the benchmark's paper shapes (random weights), with and without the
decorrelation loss (lambda 10, as in the benchmark).

    python examples/benchmarks/check_compiled_gradients.py --out compiled_gradients.json           # GPU, ~5 min
    python examples/benchmarks/check_compiled_gradients.py --quick --out q.json                    # CPU, code paths

Reading: compiled-vs-eager within the same dtype should be no larger than bf16-vs-float32 (the compiler may reorder
floating-point sums, as a different kernel would). On the H200 (RESULTS.md) float32 compiled-vs-eager was 1e-3 against
1e-6 between two eager runs, and bf16 compiled-vs-eager 0.055 against bf16's own 0.066-0.077.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import DECORRELATION_WEIGHT, PAD_TO, SHAPES, build, make_batch, trainable_gradients  # noqa: E402


def relative(a, b):
    return float((a - b).norm() / b.norm())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, dynamo without a code generator")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode (bench_gpu's fast path: "
                        "reduce-overhead, i.e. CUDA graphs)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    shapes = SHAPES["quick" if args.quick else "paper"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    compile_kwargs = shapes["compile_kwargs"] or {"mode": args.compile_mode}
    graphs = device == "cuda" and compile_kwargs.get("mode") == "reduce-overhead"
    torch.manual_seed(0)
    model, processors = build(shapes, device, torch.float32)
    model.train()
    # LoRA's B starts at zero, which makes A's gradient zero: give B values so that every LoRA weight has a gradient.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    batch = make_batch(processors["trimmed"], args.batch, shapes, device, pad_to=PAD_TO, video_output="uint8")
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
               "batch": args.batch, "compile": compile_kwargs, "decorrelation_weight": DECORRELATION_WEIGHT, "checks": {}}
    grads = {}
    for dtype_name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        model.to(dtype)
        float_batch = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
        for weight in (0.0, DECORRELATION_WEIGHT):
            for run in ("eager", "eager_again"):
                grads[dtype_name, weight, run] = trainable_gradients(model, float_batch, weight)
        compiled = model.compile_layers(decoder=True, encoders=True, **compile_kwargs)
        for weight in (0.0, DECORRELATION_WEIGHT):
            grads[dtype_name, weight, "compiled"] = trainable_gradients(model, float_batch, weight, graphs)
        for module in compiled:
            del module.forward
        torch._dynamo.reset()
    for weight in (0.0, DECORRELATION_WEIGHT):
        ref = grads["float32", weight, "eager"][1]
        row = {}
        for dtype_name in ("float32", "bfloat16"):
            eager = grads[dtype_name, weight, "eager"][1]
            row[f"{dtype_name}_eager_again_vs_eager"] = relative(grads[dtype_name, weight, "eager_again"][1], eager)
            row[f"{dtype_name}_compiled_vs_eager"] = relative(grads[dtype_name, weight, "compiled"][1], eager)
            row[f"{dtype_name}_compiled_vs_float32_eager"] = relative(grads[dtype_name, weight, "compiled"][1], ref)
            row[f"{dtype_name}_loss_eager"] = grads[dtype_name, weight, "eager"][0]
            row[f"{dtype_name}_loss_compiled"] = grads[dtype_name, weight, "compiled"][0]
        row["bfloat16_eager_vs_float32_eager"] = relative(grads["bfloat16", weight, "eager"][1], ref)
        results["checks"][f"lambda_{weight:g}"] = row
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return results


if __name__ == "__main__":
    main()
