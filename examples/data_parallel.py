"""Offline data parallelism, one process per DP rank (the shape of vLLM's
examples/offline_inference/data_parallel.py): each rank takes its own slice of the
prompts, with its own sampling parameters, and its LLM joins the others' DP group.

Single node:
    python examples/data_parallel.py --dp-size 2 --tp-size 1
Two nodes (node 0's address is 10.99.48.128):
    node 0: python examples/data_parallel.py --dp-size 4 --tp-size 1 --node-size 2 \\
                --node-rank 0 --master-addr 10.99.48.128 --master-port 13345
    node 1: python examples/data_parallel.py --dp-size 4 --tp-size 1 --node-size 2 \\
                --node-rank 1 --master-addr 10.99.48.128 --master-port 13345

The model is SmolLM2-135M-Instruct by default (pd.default_model); ``--model tiny``
generates a tiny one. On CPU it runs in float32. (One LLM can also run every rank:
``LLM(model, data_parallel_size=N)`` spreads one prompt list over N engine processes.)
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys

PROMPTS = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]


def main(
    args: argparse.Namespace,
    local_dp_rank: int,
    global_dp_rank: int,
    master_addr: str,
    master_port: int,
) -> None:
    """DP rank ``global_dp_rank``'s process: its prompts, its sampling, its LLM."""
    from engine.config import resolve_device
    from pd import LLM, SamplingParams

    # With DP, each rank takes a different slice of the whole set.
    prompts = PROMPTS * (args.num_prompts // len(PROMPTS))
    per_rank = len(prompts) // args.dp_size
    prompts = prompts[global_dp_rank * per_rank : (global_dp_rank + 1) * per_rank]
    if not prompts:
        prompts = ["Placeholder"]  # a rank with no prompts still joins the group
    print(f"DP rank {global_dp_rank} needs to process {len(prompts)} prompts", flush=True)

    # Each rank may sample differently: here, different max_tokens.
    sampling_params = SamplingParams(
        temperature=0.8, top_p=0.95, max_tokens=[16, 20][global_dp_rank % 2]
    )
    on_cpu = resolve_device(args.device) == "cpu"
    with LLM(
        model=args.model,
        device=args.device,
        dtype="float32" if on_cpu and args.dtype == "auto" else args.dtype,
        max_model_len=args.max_model_len,
        tensor_parallel_size=args.tp_size,
        data_parallel_size=args.dp_size,
        data_parallel_rank=global_dp_rank,
        data_parallel_rank_local=local_dp_rank,
        data_parallel_address=master_addr,
        data_parallel_rpc_port=master_port,
        enforce_eager=True,
        enable_expert_parallel=True,
    ) as llm:
        outputs = llm.generate(prompts, sampling_params)
    for output in outputs[:5]:  # print only 5 outputs
        print(
            f"DP rank {global_dp_rank}, Prompt: {output.prompt!r}, "
            f"Generated text: {output.outputs[0].text!r}",
            flush=True,
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Data Parallel Inference")
    parser.add_argument("--model", default=None, help="HF folder or .gguf file; 'tiny' for "
                        "a generated tiny model (default: SmolLM2-135M-Instruct)")  # fmt: skip
    parser.add_argument("--dp-size", type=int, default=2, help="Data parallel size")
    parser.add_argument("--tp-size", type=int, default=1, help="Tensor parallel size")
    parser.add_argument("--node-size", type=int, default=1, help="Total number of nodes")
    parser.add_argument("--node-rank", type=int, default=0, help="Rank of the current node")
    parser.add_argument("--master-addr", default="", help="Master node IP address")
    parser.add_argument("--master-port", type=int, default=0, help="Master node port")
    parser.add_argument("--num-prompts", type=int, default=40, help="over all DP ranks")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="auto", help="auto: float32 on CPU")
    parser.add_argument("--max-model-len", type=int, default=512)
    return parser.parse_args(argv)


def model_path(name: str | None) -> str:
    from pd.default_model import default_model_path, tiny_model_path

    if name == "tiny":
        return str(tiny_model_path())
    return name or str(default_model_path())


if __name__ == "__main__":
    args = parse_args()
    args.model = model_path(args.model)
    if args.dp_size % args.node_size:
        sys.exit("dp_size should be divisible by node_size")
    if args.node_size == 1:
        from pd.args import pick_free_port

        master_addr, master_port = "127.0.0.1", pick_free_port()
    else:
        master_addr, master_port = args.master_addr, args.master_port
    dp_per_node = args.dp_size // args.node_size

    procs = []
    first = args.node_rank * dp_per_node
    for local_dp_rank, global_dp_rank in enumerate(range(first, first + dp_per_node)):
        proc = multiprocessing.get_context("spawn").Process(
            target=main, args=(args, local_dp_rank, global_dp_rank, master_addr, master_port)
        )
        proc.start()
        procs.append(proc)
    exit_code = 0
    for proc in procs:
        proc.join(timeout=300)
        if proc.exitcode is None:
            print(f"Killing process {proc.pid} that didn't stop within 5 minutes.")
            proc.kill()
            exit_code = 1
        elif proc.exitcode:
            exit_code = proc.exitcode
    sys.exit(exit_code)
