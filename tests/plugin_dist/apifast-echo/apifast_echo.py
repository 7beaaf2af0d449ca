"""A third-party provider plugin: answers with the number of messages it was sent."""

import time

from apifast import hookimpl
from apifast.providers import ChatRequest, ChatResponse, Provider, Usage


class EchoProvider(Provider):
    type = "echo"

    async def chat(self, request: ChatRequest) -> ChatResponse:
        n = len(request.body["messages"])
        return ChatResponse(
            body={
                "id": "echo-1",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": request.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": f"echo: {n} messages"},
                        "finish_reason": "stop",
                    }
                ],
            },
            usage=Usage(input_tokens=10 * n, output_tokens=3),
        )

    async def stream_chat(self, request):
        response = await self.chat(request)
        message = response.body["choices"][0]["message"]
        yield {"choices": [{"index": 0, "delta": message, "finish_reason": None}]}
        yield {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        yield response.usage


@hookimpl
def register_provider_types(register):
    register("echo", EchoProvider)
