"""Ask a running pd-serve one chat question with the official openai client."""

from __future__ import annotations

import argparse

import openai


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="EMPTY")
    parser.add_argument("--message", default="What is the capital of France?")
    parser.add_argument("--temperature", type=float, default=0.0, help="(default: 0, greedy)")
    args = parser.parse_args()

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": args.message}],
        max_tokens=32,
        temperature=args.temperature,
        seed=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    print(f"{model} says: ", end="", flush=True)
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
        elif chunk.usage:
            usage = chunk.usage
            print(f"\n({usage.prompt_tokens} prompt + {usage.completion_tokens} new tokens)")


if __name__ == "__main__":
    main()
