"""A deliberately naive OpenAI-compatible chat server: one transformers ``generate`` call per request.

This is the baseline "hand-rolled service" of bench_serving.py: a FastAPI app that loads the model
with transformers and, for every request, starts ``model.generate`` in a thread of its own (the
usual ``Thread(target=model.generate, kwargs={..., "streamer": streamer})`` pattern). Requests are
served concurrently, but nothing is batched across requests: each generation is its own forward
pass per token.

    python tests/benchmarks/naive_server.py --model DIR --port 8003 --served-model-name rlhf-policy

Implements just enough of POST /v1/chat/completions (streamed and not, ``stream_options.include_usage``)
for the openai client, plus GET /v1/models and GET /health.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer


class QueueStreamer:
    """transformers streamer that hands each new token id to an asyncio queue (thread-safe)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        self.loop = loop
        self.queue = queue
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt
            self.prompt_seen = True
            return
        self.loop.call_soon_threadsafe(self.queue.put_nowait, value.reshape(-1).tolist())

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": "invalid_request_error", "code": status}}, status_code=status
    )


def create_app(model_dir: str, served_model_name: str, max_model_len: int) -> FastAPI:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos_id = model.generation_config.eos_token_id
    pad_id = model.generation_config.pad_token_id
    eos_ids = set(eos_id if isinstance(eos_id, list) else [eos_id])
    app = FastAPI()

    def run_generate(prompt_ids: list[int], body: dict, streamer: QueueStreamer, failure: list) -> None:
        temperature = float(body.get("temperature") if body.get("temperature") is not None else 1.0)
        kwargs: dict[str, Any] = dict(
            input_ids=torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=int(body["_max_tokens"]),
            pad_token_id=pad_id,
            eos_token_id=eos_id,
            streamer=streamer,
        )
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=float(body.get("top_p") or 1.0), top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        try:
            with torch.inference_mode():
                model.generate(**kwargs)
        except Exception as exc:  # noqa: BLE001 - reported to the client
            failure.append(exc)
            streamer.end()

    async def tokens(prompt_ids: list[int], body: dict):
        """Start one generate() in its own thread and yield its new token ids as they come."""
        queue: asyncio.Queue = asyncio.Queue()
        failure: list = []
        streamer = QueueStreamer(asyncio.get_running_loop(), queue)
        threading.Thread(target=run_generate, args=(prompt_ids, body, streamer, failure), daemon=True).start()
        while True:
            ids = await queue.get()
            if ids is None:
                break
            yield ids
        if failure:
            raise failure[0]

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": served_model_name, "object": "model", "created": 0, "owned_by": "naive"}],
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        if body.get("model") != served_model_name:
            return error(404, f"model {body.get('model')!r} does not exist")
        messages = [
            {
                "role": m["role"],
                "content": m["content"]
                if isinstance(m["content"], str)
                else "".join(p.get("text", "") for p in m["content"]),
            }
            for m in body.get("messages", [])
        ]
        prompt_ids = list(
            tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        )
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 256
        if len(prompt_ids) + max_tokens > max_model_len:
            return error(400, f"prompt ({len(prompt_ids)} tokens) + max_tokens exceeds {max_model_len}")
        body["_max_tokens"] = max_tokens
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        if not body.get("stream"):
            out: list[int] = []
            async for ids in tokens(prompt_ids, body):
                out += ids
            finish = "stop" if out and out[-1] in eos_ids else "length"
            return {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": served_model_name,
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": finish,
                        "logprobs": None,
                        "message": {"role": "assistant", "content": tokenizer.decode(out, skip_special_tokens=True)},
                    }
                ],
                "usage": {
                    "prompt_tokens": len(prompt_ids),
                    "completion_tokens": len(out),
                    "total_tokens": len(prompt_ids) + len(out),
                },
            }

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
            doc = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": served_model_name,
                "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            if usage:
                doc["usage"] = usage
            return f"data: {json.dumps(doc)}\n\n"

        async def events():
            out: list[int] = []
            sent = ""
            first = True
            async for ids in tokens(prompt_ids, body):
                out += ids
                text = tokenizer.decode(out, skip_special_tokens=True)
                if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                    continue
                delta = {"content": text[len(sent) :]}
                sent = text
                if first:
                    delta["role"] = "assistant"
                    first = False
                yield chunk(delta)
            finish = "stop" if out and out[-1] in eos_ids else "length"
            yield chunk({} if not first else {"role": "assistant", "content": ""}, finish)
            if include_usage:
                yield chunk(
                    {},
                    usage={
                        "prompt_tokens": len(prompt_ids),
                        "completion_tokens": len(out),
                        "total_tokens": len(prompt_ids) + len(out),
                    },
                )
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--served-model-name", default="rlhf-policy")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8003)
    args = ap.parse_args()
    app = create_app(args.model, args.served_model_name, args.max_model_len)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
