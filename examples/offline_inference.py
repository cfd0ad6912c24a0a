"""Offline generation with pd-serve's LLM API (greedy, sampled, and chat)."""

from __future__ import annotations

import argparse

from pd import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="local Hugging Face model folder")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    llm = LLM(model=args.model, device=args.device, dtype=args.dtype, max_model_len=512)
    prompts = ["Hello, my name is", "The capital of France is", "数据并行"]
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    sampled = SamplingParams(temperature=0.8, top_p=0.95, seed=0, max_tokens=24)
    for params in (greedy, sampled):
        for output in llm.generate(prompts, params):
            completion = output.outputs[0]
            print(f"{output.prompt!r} -> {completion.text!r} ({completion.finish_reason})")
    reply = llm.chat([{"role": "user", "content": "Who are you?"}], greedy)[0]
    print(f"chat -> {reply.outputs[0].text!r}")


if __name__ == "__main__":
    main()
