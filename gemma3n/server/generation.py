"""The generating endpoints: chat completions, text completions, audio transcription / translation.

Each handler validates the request, builds its prompt off the event loop, hands a `Job` to the scheduler thread and
relays the job's events: as one JSON object, or as server-sent events. A client that goes away cancels its job.
"""
from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import AsyncIterator

import torch
from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from ..structured import GrammarError
from ..structured.tools import CallStream, ToolChoice, parse_calls, read_tool_choice, read_tools, render_messages, \
    tool_grammar
from .errors import APIError, bad_request, served_models, unknown_model
from .media import Converted, check_audio, convert_messages
from .responses import Reply, chat_logprobs, completion_logprobs, sse
from .scheduler import REQUEST_ERRORS, Job, Scheduler
from .schemas import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, parse_json, validate
from .settings import ServerSettings

INSTRUCTIONS = {
    False: "Transcribe this audio{language}. Answer with the transcript only.",
    True: "Translate this audio into English. Answer with the translation only.",
}


class ClientGone(Exception):
    """The client closed the connection; its job was cancelled."""


class Generator:
    def __init__(self, model, settings: ServerSettings, scheduler: Scheduler):
        self.model, self.settings, self.scheduler = model, settings, scheduler
        self.context = model.config.text.max_position_embeddings
        tokenizer = model.tokenizer
        # A text of n characters is at least n / max_token_chars tokens: far-too-long prompts are refused from
        # their length alone, before seconds of tokenizing (computed once, here, not on the event loop later).
        self.max_token_chars = tokenizer.max_token_chars if tokenizer is not None else None

    # -- endpoints -------------------------------------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        req = validate(ChatRequest, parse_json(await read_body(request, self.settings.max_body_bytes)))
        adapter = self._check_model(req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs needs \"logprobs\": true", param="top_logprobs")
        try:
            functions = read_tools(req.tools)
            choice = read_tool_choice(req.tool_choice, functions)
        except GrammarError as e:
            raise bad_request(str(e), param=e.param) from None
        parallel = req.parallel_tool_calls is not False
        constraint = await asyncio.to_thread(self._constraint, req, functions, choice, parallel)
        params = self._params(req, req.requested_tokens(), self.settings.default_max_tokens,
                              logprobs=(req.top_logprobs or 0) if req.logprobs else None, constraint=constraint)
        self._check_text_size(sum(_text_chars(m.content) for m in req.messages), "messages")
        converted = await asyncio.to_thread(convert_messages, req.messages, self.settings)
        if functions or any(m.role == "tool" or m.tool_calls for m in req.messages):
            try:
                converted.messages = render_messages(converted.messages, functions, choice, parallel)
            except GrammarError as e:
                raise bad_request(str(e), param=e.param) from None
        ids, media = await asyncio.to_thread(self._chat_prompt, converted)
        job = Job(params, ids, media, request_id=request_id_of(request), adapter=adapter)
        calls = choice.mode != "none"
        tokenizer = self.model.tokenizer

        def render(result) -> dict:
            extras = {}
            if req.logprobs:
                extras["logprobs"] = chat_logprobs(tokenizer, result.logprobs)
            if calls:
                extras["content"], extras["tool_calls"] = parse_calls(result.text)
            return extras

        return await self._respond(request, job, Reply(req.model, chat=True), req.stream,
                                   req.include_usage, render, req.n or 1, calls)

    def _constraint(self, req, functions: list, choice: ToolChoice, parallel: bool):
        """The request's grammar, compiled (or found in the cache) in a worker thread: the first one also reads the
        vocabulary into the grammar engine (seconds). Errors are 400s that name the field and the construct."""
        asked = {"response_format": req.response_format, "json_schema": req.guided_json,
                 "regex": req.guided_regex, "grammar": req.guided_grammar}
        fields = [k for k, v in asked.items()
                  if v is not None and not (k == "response_format" and v == {"type": "text"})]
        param = {"json_schema": "guided_json", "regex": "guided_regex", "grammar": "guided_grammar"}.get(
            fields[0], fields[0]) if fields else "tools"
        if choice.mode != "none" and fields:
            raise bad_request(f"tools and {param} cannot be combined: a tool call's arguments already follow the "
                              "function's schema; use tool_choice \"none\" for a structured text answer", param=param)
        if self.model.tokenizer is None and (fields or choice.mode != "none"):
            raise bad_request("structured output needs the model's tokenizer", param=param)
        try:
            if choice.mode != "none":
                return tool_grammar(self.model.grammars, functions, choice, parallel)
            return self.model.constraint(**asked) if fields else None
        except GrammarError as e:
            raise bad_request(str(e), param=getattr(e, "param", param)) from None
        except ImportError as e:
            raise bad_request(str(e), param=param, code="structured_output_unavailable") from None

    async def completion(self, request: Request) -> Response:
        req = validate(CompletionRequest, parse_json(await read_body(request, self.settings.max_body_bytes)))
        adapter = self._check_model(req.model)
        if req.stream and req.echo:
            raise bad_request("echo is not available with \"stream\": true; ask without streaming", param="echo")
        constraint = await asyncio.to_thread(self._constraint, req, [], ToolChoice("none"), False)
        params = self._params(req, req.max_tokens, 16,  # OpenAI's default for text completions
                              logprobs=req.logprobs, prompt_logprobs=bool(req.echo and req.logprobs is not None),
                              constraint=constraint)
        if isinstance(req.prompt, str) or isinstance(req.prompt[0], str):
            self._check_text_size(len(req.prompt if isinstance(req.prompt, str) else req.prompt[0]), "prompt")
        ids = await asyncio.to_thread(self._completion_prompt, req.prompt)
        render = None
        if req.echo or req.logprobs is not None:
            render = lambda result: self._completion_extras(req, ids[0].tolist(), result)  # noqa: E731
        return await self._respond(request, Job(params, ids, request_id=request_id_of(request), adapter=adapter),
                                   Reply(req.model, chat=False), req.stream, req.include_usage, render, req.n or 1)

    def _completion_extras(self, req, prompt_ids: list[int], result) -> dict:
        """`echo` (the prompt's text before the answer) and `logprobs` (the prompt's tokens first, with echo)."""
        tokenizer = self.model.tokenizer
        if not req.echo:
            echo = ""
        elif isinstance(req.prompt, str) or isinstance(req.prompt[0], str):
            echo = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
        else:
            echo = tokenizer.decode(prompt_ids) if tokenizer is not None else ""
        extras = {"echo": echo}
        if req.logprobs is not None:
            if tokenizer is None:
                raise bad_request("logprobs need the model's tokenizer to name the tokens", param="logprobs")
            prompt = result.prompt_logprobs if req.echo else None
            extras["logprobs"] = completion_logprobs(tokenizer, result.logprobs, prompt, prompt_ids[0])
        return extras

    async def audio(self, request: Request, translate: bool) -> Response:
        form = await read_form(request, self.settings.max_body_bytes)
        adapter = self._check_model(_form_text(form, "model", required=True))
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise bad_request("multipart field 'file' (the audio file) is required", param="file")
        fmt = _form_text(form, "response_format") or "json"
        if fmt not in ("json", "text"):
            raise bad_request(f"response_format {fmt!r} is not supported; use json or text", param="response_format")
        data = await upload.read()
        if len(data) > self.settings.max_media_bytes:
            raise APIError(413, f"the audio file is larger than the limit of {self.settings.max_media_bytes} bytes",
                           param="file")
        await asyncio.to_thread(check_audio, data, "file", self.settings)
        temperature = _form_float(form, "temperature")
        temperature = 0.0 if temperature is None else temperature  # OpenAI's default here: a faithful transcript
        params = self._params(None, None, self.settings.max_tokens, temperature=temperature)
        messages = [{"role": "user", "content": [{"type": "audio", "audio": data},
                                                 {"type": "text", "text": _instruction(form, translate)}]}]
        converted = Converted(messages=messages, media=["audio"])
        ids, media = await asyncio.to_thread(self._chat_prompt, converted)
        result = await self._collect(request, self._submit(Job(params, ids, media, request_id=request_id_of(request),
                                                               adapter=adapter)))
        if isinstance(result, Response):
            return result
        return PlainTextResponse(result.text) if fmt == "text" else JSONResponse({"text": result.text})

    async def tokenize(self, request: Request) -> Response:
        req = validate(TokenizeRequest, parse_json(await read_body(request, self.settings.max_body_bytes)))
        if req.model is not None:
            self._check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give either 'prompt' (a text) or 'messages' (a chat), not both", param="prompt")
        tokenizer = self.model.tokenizer
        if tokenizer is None:
            raise bad_request("this model has no tokenizer", param="prompt")
        if req.prompt is not None:
            self._check_text_size(len(req.prompt), "prompt")
            ids = await asyncio.to_thread(tokenizer.encode, req.prompt, req.add_special_tokens)
        else:
            self._check_text_size(sum(_text_chars(m.content) for m in req.messages), "messages")
            converted = await asyncio.to_thread(convert_messages, req.messages, self.settings)
            if converted.has_media:
                raise bad_request("/tokenize takes text only; media expand to their placeholder tokens when "
                                  "generating", param="messages")
            if any(m.role == "tool" or m.tool_calls for m in req.messages):  # as the chat endpoint renders them
                try:
                    converted.messages = render_messages(converted.messages, [], ToolChoice("none"))
                except GrammarError as e:
                    raise bad_request(str(e), param=e.param) from None
            try:
                ids = (await asyncio.to_thread(self.model.encode_prompt, converted.messages))[0].tolist()
            except REQUEST_ERRORS as e:
                raise bad_request(str(e), param="messages") from None
        return JSONResponse({"count": len(ids), "max_model_len": self.context, "tokens": ids})

    def tokenizer_info(self) -> Response:
        """`GET /tokenizer_info`: what a client-side tokenizer needs to match the server's (vLLM's shape, used by
        lm-evaluation-harness's remote tokenizer): the special token strings and the chat template."""
        tokenizer = self.model.tokenizer
        if tokenizer is None:
            raise APIError(404, "this model has no tokenizer", code="no_tokenizer")
        return JSONResponse({"tokenizer_class": "gemma3n.Tokenizer", "bos_token": tokenizer.bos_token,
                             "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token,
                             "chat_template": tokenizer.chat_template, "model_max_length": self.context,
                             "add_bos_token": True})

    async def detokenize(self, request: Request) -> Response:
        req = validate(DetokenizeRequest, parse_json(await read_body(request, self.settings.max_body_bytes)))
        if req.model is not None:
            self._check_model(req.model)
        vocab = self.model.config.text.vocab_size
        if any(t >= vocab for t in req.tokens):
            raise bad_request(f"token ids must be < {vocab} (the vocabulary size)", param="tokens")
        if self.model.tokenizer is None:
            raise bad_request("this model has no tokenizer", param="tokens")
        return JSONResponse({"prompt": self.model.tokenizer.decode(req.tokens)})

    # -- prompts (run in worker threads) ---------------------------------------------------------------------------

    def _chat_prompt(self, converted: Converted) -> tuple[torch.Tensor, dict]:
        """(prompt ids, the processor's media tensors) for a chat; the media towers run later, in the scheduler."""
        if converted.has_media:
            media = self._process_media(converted)
            ids = media.pop("input_ids")
            media.pop("attention_mask", None)
        else:
            try:
                ids, media = self.model.encode_prompt(converted.messages), {}
            except REQUEST_ERRORS as e:
                raise bad_request(str(e), param="messages") from None
        self._check_length(ids.shape[1])
        return ids, media

    def _completion_prompt(self, prompt) -> torch.Tensor:
        if isinstance(prompt, list) and isinstance(prompt[0], int):
            vocab = self.model.config.text.vocab_size
            if max(prompt) >= vocab:
                raise bad_request(f"prompt token ids must be < {vocab} (the vocabulary size)", param="prompt")
            ids = list(prompt)
        else:
            text = prompt[0] if isinstance(prompt, list) else prompt
            if self.model.tokenizer is None:
                raise bad_request("this model has no tokenizer; send the prompt as token ids", param="prompt")
            ids = self.model.tokenizer.encode(text, add_special_tokens=True)
        if not ids:
            raise bad_request("the prompt is empty", param="prompt")
        self._check_length(len(ids))
        return torch.tensor([ids], dtype=torch.long)

    def _process_media(self, converted: Converted) -> dict:
        """The processor's tensors for a chat with media; refuses media the model cannot take before the request
        waits in the queue."""
        for kind, section in (("image", "vision"), ("audio", "audio")):
            if kind in converted.media and (getattr(self.model, "multimodal", None) is None
                                            or getattr(self.model.config, section, None) is None):
                raise bad_request(f"the model {self.settings.model_name!r} is text-only (its checkpoint has no "
                                  f"{section} encoder), so it cannot take {kind} input", code="unsupported_media")
        try:
            inputs = self.model.processor(converted.messages)
        except REQUEST_ERRORS as e:
            raise bad_request(f"the model cannot take this input: {e}", code="unsupported_media") from None
        except ImportError as e:  # a preprocessor this build does not have yet
            raise bad_request(f"this build of gemma3n cannot read this media yet ({e})",
                              code="unsupported_media") from None
        for kind, key in (("image", "pixel_values"), ("audio", "input_features")):
            if kind in converted.media and inputs.get(key) is None:
                raise bad_request(f"this build of gemma3n cannot read {kind} input yet", code="unsupported_media")
        return dict(inputs)

    def _check_text_size(self, chars: int, param: str) -> None:
        limit = min(self.settings.max_prompt_tokens, self.context - 1)
        if self.max_token_chars and chars > limit * self.max_token_chars:
            raise bad_request(f"the prompt has {chars} characters, more than the {limit} tokens this server accepts "
                              f"can hold (at most {self.max_token_chars} characters a token)", param=param,
                              code="context_length_exceeded")

    def _check_length(self, tokens: int) -> None:
        limit = min(self.settings.max_prompt_tokens, self.context - 1)
        if tokens > limit:
            raise bad_request(f"the prompt is {tokens} tokens; this server accepts at most {limit} "
                              f"(the model's context is {self.context})", param="messages",
                              code="context_length_exceeded")

    def _check_model(self, name: str) -> str | None:
        """The adapter a request's model id names (None: the base model); an id this server does not serve is a
        404 that lists the ones it does."""
        if name == self.settings.model_name:
            return None
        adapters = getattr(self.model, "adapters", None)
        if adapters is not None and name in adapters:
            return name
        raise unknown_model(name, served_models(self.model, self.settings))

    def _params(self, req, max_tokens: int | None, default: int, **extra):
        if max_tokens is not None and max_tokens > self.settings.max_tokens:
            raise bad_request(f"max_tokens is {max_tokens}; this server allows at most {self.settings.max_tokens}",
                              param="max_tokens")
        fields = dict(max_new_tokens=max_tokens or default, **extra)
        if req is not None:
            fields.update(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                          repetition_penalty=req.repetition_penalty, seed=req.seed, stop=req.stop_strings() or None)
        try:
            return self.model.sampling_params(**fields)
        except ValueError as e:
            raise bad_request(str(e)) from None

    # -- relaying the job's events ---------------------------------------------------------------------------------

    def _submit(self, job: Job) -> Job:
        self.scheduler.submit(job)
        return job

    async def _respond(self, request: Request, job: Job, reply: Reply, stream: bool, include_usage: bool,
                       render=None, n: int = 1, calls: bool = False):
        """`render(result)`: the response's extra parts (logprobs, echo) for `Reply.whole`. `n` choices are `n`
        sequences of the batch, prefilled once (the i-th seeded seed + i when a seed is given, so each is
        reproducible)."""
        jobs = [job] + [Job(replace(job.params, seed=None if job.params.seed is None else job.params.seed + i),
                            job.ids, job.media, job.cache_key, job.request_id, job.adapter) for i in range(1, n)]
        self.scheduler.submit(*jobs)
        if not stream:
            results = await asyncio.gather(*(self._collect(request, each) for each in jobs))
            failed = next((r for r in results if isinstance(r, Response)), None)
            if failed is not None:
                for each in jobs:
                    self.scheduler.cancel(each)
                return failed
            return JSONResponse(reply.choices([(r, render(r) if render else {}) for r in results]))
        try:
            for each in jobs:  # the choices start together (one prefill); an error refuses the whole request
                first = await self._next(request, each)
                if first[0] == "error":
                    for other in jobs:
                        self.scheduler.cancel(other)
                    return first[1].response()
        except ClientGone:
            for each in jobs:
                self.scheduler.cancel(each)
            return Response(status_code=499)
        return StreamingResponse(self._events(jobs, reply, include_usage, job.params.logprobs is not None, calls),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _collect(self, request: Request, job: Job):
        """Wait for the job's result; an error or a vanished client gives a Response instead."""
        try:
            while True:
                kind, value = await self._next(request, job)
                if kind == "done":
                    return value
                if kind == "error":
                    return value.response()
        except ClientGone:
            return Response(status_code=499)
        finally:
            job.watcher.cancel()

    async def _next(self, request: Request | None, job: Job) -> tuple:
        """The job's next event; the moment the client disconnects (even while tokens keep arriving), the job is
        cancelled, so it leaves the batch at the scheduler's next step."""
        if job.watcher is None:
            job.watcher = asyncio.ensure_future(_disconnected(request))
        event = asyncio.ensure_future(job.events.get())
        try:
            await asyncio.wait((event, job.watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not event.done():
                event.cancel()
        if event.done() and not event.cancelled():
            return event.result()
        self.scheduler.cancel(job)
        raise ClientGone

    async def _events(self, jobs: list[Job], reply: Reply, include_usage: bool, logprobs: bool, calls: bool = False
                      ) -> AsyncIterator[str]:
        """SSE chunks after "started", each choice's chunks carrying its `index` (and the logprobs of the tokens of
        its text); if the client disconnects, Starlette cancels this and the jobs are dropped. With `calls` (a chat
        with tools) each choice's text is parsed as it comes: call blocks leave as tool_calls deltas, the rest as
        content (held back only while it could still begin a call; its tokens' logprobs go with the next text)."""
        finished = False
        waiting: dict[int, asyncio.Future] = {}
        pending_logprobs: dict[int, list] = {i: [] for i in range(len(jobs))}
        offsets = [0] * len(jobs)  # completions' text_offset of each choice's next token
        results: dict[int, object] = {}
        parsers = [CallStream() if calls else None for _ in jobs]
        sent_calls = [0] * len(jobs)

        def chunk_logprobs(index: int) -> dict | None:
            entries, pending_logprobs[index] = pending_logprobs[index], []
            if not logprobs:
                return None
            if reply.chat:
                return chat_logprobs(self.model.tokenizer, entries)
            out = completion_logprobs(self.model.tokenizer, entries, start=offsets[index])
            if entries:
                offsets[index] = out["text_offset"][-1] + len(out["tokens"][-1])
            return out

        def text_chunks(index: int, text: str) -> list[str]:
            if parsers[index] is None:
                return [sse(reply.chunk(text, index=index, logprobs=chunk_logprobs(index)))]
            return call_chunks(index, parsers[index].push(text))

        def call_chunks(index: int, events) -> list[str]:
            out = []
            for what, value in events:
                if what == "text":
                    out.append(sse(reply.chunk(value, index=index, logprobs=chunk_logprobs(index))))
                else:
                    out.append(sse(reply.chunk(tool_call=(sent_calls[index], value), index=index)))
                    sent_calls[index] += 1
            return out

        try:
            if reply.chat:
                for index in range(len(jobs)):
                    yield sse(reply.chunk(role=True, index=index))
            waiting = {i: asyncio.ensure_future(job.events.get()) for i, job in enumerate(jobs)}
            failed = False
            watchers = [job.watcher for job in jobs if job.watcher is not None]
            while waiting and not failed:
                await asyncio.wait([*waiting.values(), *watchers], return_when=asyncio.FIRST_COMPLETED)
                if any(w.done() for w in watchers):  # the client is gone
                    return
                for index, event in sorted(waiting.items()):
                    if not event.done():
                        continue
                    kind, value = event.result()
                    del waiting[index]
                    if kind == "logprobs":
                        pending_logprobs[index] += value
                    elif kind == "text":
                        for chunk in text_chunks(index, value):
                            yield chunk
                    elif kind == "error":
                        yield sse({"error": {"message": value.message, "type": "server_error", "code": value.code}})
                        failed = True
                        break
                    elif kind == "done":
                        results[index] = value
                        finish, parser = value.finish_reason, parsers[index]
                        if parser is not None:
                            for chunk in call_chunks(index, parser.finish()):
                                yield chunk
                            if parser.calls and finish == "stop":
                                finish = "tool_calls"
                        yield sse(reply.chunk(finish_reason=finish, index=index,
                                              logprobs=chunk_logprobs(index) if pending_logprobs[index] else None))
                        continue
                    waiting[index] = asyncio.ensure_future(jobs[index].events.get())
            if include_usage and len(results) == len(jobs):
                yield sse(reply.usage_chunk([results[i] for i in range(len(jobs))]))
            finished = True
            yield sse("[DONE]")
        finally:
            for event in waiting.values():
                event.cancel()
            for job in jobs:
                job.watcher.cancel()
                if not finished:
                    self.scheduler.cancel(job)


def request_id_of(request: Request) -> str | None:
    """The id the RequestIds middleware (app.py) gave this request."""
    return getattr(request.state, "request_id", None)


async def _disconnected(request: Request) -> None:
    """Returns when the client has closed the connection (the body was read, so the next ASGI message is the
    disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _text_chars(content) -> int:
    if isinstance(content, str):
        return len(content)
    return sum(len(part.text) for part in content or () if getattr(part, "type", None) == "text")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    return bytes(body)


async def read_form(request: Request, limit: int):
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise bad_request("send the audio as multipart/form-data with fields 'file' and 'model'")
    body = await read_body(request, limit)

    async def once():
        yield body
        yield b""

    try:
        return await MultiPartParser(request.headers, once(), max_files=1, max_fields=16).parse()
    except MultiPartException as e:
        raise bad_request(f"malformed multipart body: {e.message}") from None


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than the limit of {limit} bytes", code="request_too_large")


def _form_text(form, name: str, required: bool = False) -> str | None:
    value = form.get(name)
    if value is None and required:
        raise bad_request(f"multipart field {name!r} is required", param=name)
    if value is not None and not isinstance(value, str):
        raise bad_request(f"multipart field {name!r} must be text", param=name)
    return value


def _form_float(form, name: str) -> float | None:
    text = _form_text(form, name)
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        raise bad_request(f"{name} must be a number, got {text[:40]!r}", param=name) from None


def _instruction(form, translate: bool) -> str:
    language = _form_text(form, "language")
    text = INSTRUCTIONS[translate].format(language=f" (the speech is in {language})" if language else "")
    context = _form_text(form, "prompt")
    return f"{text}\nContext: {context}" if context else text
