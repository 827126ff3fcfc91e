"""POST /tokenize, POST /detokenize, GET /tokenizer_info: so clients need no local copy of the tokenizer."""

from __future__ import annotations

from server.errors import bad_request
from server.limits import check_token_ids
from server.protocol import DetokenizeRequest, TokenizeRequest
from server.serving_common import OpenAIServing, check_model, check_ready


class TokenizationServing(OpenAIServing):
    async def tokenize(self, request: TokenizeRequest) -> dict:
        check_ready(self.engine)  # the tokenizer comes with the model
        check_model(self.engine, request.model)
        if (request.prompt is None) == (request.messages is None):
            raise bad_request("give exactly one of prompt and messages", "prompt")
        if request.messages is not None:
            tokens = await self.encode_chat(request.messages, request.add_generation_prompt)
        else:
            tokens = await self.encode(request.prompt, add_special_tokens=request.add_special_tokens)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": self.engine.max_model_len}

    async def detokenize(self, request: DetokenizeRequest) -> dict:
        check_ready(self.engine)
        check_model(self.engine, request.model)
        check_token_ids(request.tokens, self.engine.vocab_size, "tokens")
        return {"prompt": await self.run_in_tokenizer_thread(self.tokenizer.decode, request.tokens)}

    def tokenizer_info(self) -> dict:
        check_ready(self.engine)
        tokenizer = self.tokenizer
        return {
            "tokenizer_class": type(tokenizer).__name__,
            "vocab_size": len(tokenizer),
            "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token,
            "pad_token": tokenizer.pad_token,
            "chat_template": getattr(tokenizer, "chat_template", None),
            "max_model_len": self.engine.max_model_len,
        }
