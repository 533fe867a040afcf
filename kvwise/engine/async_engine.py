"""Asyncio front over the synchronous `LLMEngine`, which runs in a thread of its own.

Owns: the engine-loop thread, its inbox of commands (add / abort / call / stop), one asyncio queue
per live request, and admission control (the bounded waiting queue).

One request, step by step:
1. `add_requests` (event loop) checks admission, creates the request's `RequestStream` and puts an
   `_Add` in the inbox, then awaits the engine thread's answer (None or the validation error).
2. The engine thread runs the command between two steps: it resolves the prompt (a callable runs
   with the engine's tokenizer) and calls `engine.add_request`.
3. After every `engine.step()` the thread snapshots each output and hands the batch to the event
   loop with one `call_soon_threadsafe`; each output lands in its request's asyncio queue.
4. The consumer iterates the stream; the finished output ends it. Closing a stream early (client
   gone) puts an `_Abort` in the inbox, which frees the request's blocks before the next step.

Invariants:
- Only the engine thread touches the engine (LLMEngine is not thread-safe), including its
  tokenizer; the event loop reaches it only through `_inbox` and `call`.
- When the engine has nothing to do the thread blocks on `_inbox.get()`: no busy spin.
- An admitted request leaves `_admitted` when its last output or an error is delivered, or when
  its stream is closed or garbage-collected unclosed (then it is also aborted), whichever is
  first; so a client that never reads cannot hold a queue slot.
- A request the engine finished with finish_reason "error" (its own sampling failed; the engine
  contains that to the request) gets `EngineStepError` with the engine's message; the other
  requests of the step are untouched.
- Only an exception out of `engine.step()` itself (the model forward: nothing per-request) fails
  every live request (they get `EngineStepError` and are aborted); the loop keeps serving.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, TypeVar, Union

from kvwise.errors import KvwiseError
from kvwise.outputs import CompletionOutput, RequestOutput
from kvwise.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")
# A prompt is text, token ids, or a function of the tokenizer returning either (run in the
# engine thread, so chat templates and tokenization never race with the engine).
PromptSource = Union[str, list[int], Callable[[Any], Union[str, list[int]]]]


class QueueFullError(KvwiseError):
    """Admitting the request would exceed the waiting-queue bound (HTTP 503)."""


class EngineUnavailableError(KvwiseError):
    """The engine is shutting down or its thread died (HTTP 503)."""


class EngineStepError(KvwiseError):
    """engine.step() raised while this request was live; the request was aborted."""


@dataclass
class NewRequest:
    request_id: str
    prompt: PromptSource
    params: SamplingParams


@dataclass
class _Add:
    requests: list[NewRequest]
    queues: list[asyncio.Queue]
    arrival_time: float
    done: asyncio.Future


@dataclass
class _Abort:
    request_ids: list[str]


@dataclass
class _Call:
    fn: Callable[[Any], Any]
    done: asyncio.Future


class _Stop:
    pass


@dataclass
class _Live:
    """Engine-thread view of one live request."""

    queue: asyncio.Queue
    wants_logprobs: bool
    num_decoded: dict[int, int] = dataclasses.field(default_factory=dict)  # index -> filled


class RequestStream:
    """Async iterator over one request's cumulative `RequestOutput`s.

    Outputs that queued up while the consumer was busy are merged (they are cumulative), so a slow
    client gets fewer, larger chunks. `close()` aborts the request if it has not finished.
    """

    def __init__(self, owner: AsyncEngine, request_id: str) -> None:
        self._owner = owner
        self.request_id = request_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False
        self._released = False
        # A stream dropped unclosed (e.g. a response generator that never started) still
        # aborts its request when collected.
        self._finalizer = weakref.finalize(self, owner._orphaned, request_id)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self.queue.get()
        while not isinstance(item, BaseException) and not self.queue.empty():
            nxt = self.queue.get_nowait()
            item = nxt if isinstance(nxt, BaseException) else _merge(item, nxt)
        if isinstance(item, BaseException):
            self.finished = True
            self._release()
            raise item
        if item.finished:
            self.finished = True
            self._release()
        return item

    def close(self) -> None:
        """Abort the request unless it finished; safe to call any number of times."""
        if not self.finished:
            self.finished = True
            self._owner._send(_Abort([self.request_id]))
        self._release()

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self._finalizer.detach()
            self._owner._admitted.pop(self.request_id, None)


class AsyncEngine:
    """Runs `engine` in a dedicated thread and serves many asyncio consumers."""

    def __init__(self, engine: Any, *, max_num_seqs: int,
                 max_queued_requests: Optional[int] = None) -> None:
        self.engine = engine
        self.max_num_seqs = max_num_seqs
        self.max_queued_requests = max_queued_requests
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._admitted: dict[str, int] = {}  # request id -> n, in admission (FCFS) order
        self._live: dict[str, _Live] = {}  # engine thread only
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._accepting = False
        self.dead: Optional[BaseException] = None
        self.stats: dict = {}  # latest engine.stats(), published by the engine thread
        self.step_started: Optional[float] = None  # monotonic start of the running step
        self.num_step_failures = 0

    # -- lifecycle (event loop) ------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._publish_stats()
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="kvwise-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop admitting, let in-flight requests finish for up to `timeout` s, abort the rest."""
        self._accepting = False
        deadline = time.monotonic() + timeout
        while self._admitted and time.monotonic() < deadline and self.is_alive():
            await asyncio.sleep(0.05)
        if self._thread is not None and self._thread.is_alive():
            self._send(_Stop())
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead is None

    @property
    def num_in_flight(self) -> int:
        return len(self._admitted)

    # -- requests (event loop) -------------------------------------------------------------
    async def add_requests(self, requests: list[NewRequest]) -> list[RequestStream]:
        """Admit and add `requests` atomically: all are added, or none (the error is raised).

        Raises QueueFullError, EngineUnavailableError, or the engine's validation error.
        """
        if not self._accepting or not self.is_alive():
            raise EngineUnavailableError("the engine is shutting down or not running")
        if self.max_queued_requests is not None:
            waiting = self._num_waiting_after([r.params.n for r in requests])
            if waiting > self.max_queued_requests:
                raise QueueFullError(
                    f"server overloaded: the waiting queue is full "
                    f"(max_queued_requests={self.max_queued_requests}); retry later")
        streams = [RequestStream(self, r.request_id) for r in requests]
        for r in requests:
            self._admitted[r.request_id] = r.params.n
        assert self._loop is not None
        done = self._loop.create_future()
        self._send(_Add(requests, [s.queue for s in streams], time.monotonic(), done))
        try:
            await done
        except asyncio.CancelledError:
            for s in streams:
                s.close()
            raise
        except BaseException:
            for s in streams:
                s.finished = True
                s._release()
            raise
        return streams

    def _num_waiting_after(self, new_ns: list[int]) -> int:
        """Requests that would wait for a sequence slot if `new_ns` were admitted now.

        Models the scheduler's FCFS admission over `max_num_seqs` slots (a request with n
        samples needs n). Exact when slots limit the batch; when KV blocks limit it first, more
        requests wait than counted, so the bound over-admits by at most max_num_seqs.
        """
        free = self.max_num_seqs
        waiting = 0
        for n in [*self._admitted.values(), *new_ns]:
            if waiting == 0 and n <= free:
                free -= n
            else:
                waiting += 1
        return waiting

    async def call(self, fn: Callable[[Any], T]) -> T:
        """Run fn(engine) in the engine thread between two steps and return its result."""
        if not self.is_alive():
            raise EngineUnavailableError("the engine is not running")
        assert self._loop is not None
        done = self._loop.create_future()
        self._send(_Call(fn, done))
        return await done

    def _send(self, cmd: object) -> None:
        self._inbox.put(cmd)

    def _orphaned(self, request_id: str) -> None:
        """A stream was garbage-collected unclosed (any thread): abort and un-admit it."""
        self._admitted.pop(request_id, None)
        self._send(_Abort([request_id]))

    # -- engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        backoff = 0.0
        try:
            while True:
                busy = self._has_work() and backoff == 0.0
                cmds = self._drain(block=not busy, timeout=backoff or None)
                if any(isinstance(c, _Stop) for c in cmds):
                    self._fail_all(EngineUnavailableError("server shutting down"))
                    return
                for cmd in cmds:
                    self._handle(cmd)
                if not self._has_work():
                    backoff = 0.0
                elif not self._step():  # keep serving, but do not spin on a broken engine
                    backoff = min(max(2 * backoff, 0.01), 1.0)
                else:
                    backoff = 0.0
                self._publish_stats()
        except BaseException as e:  # the loop itself broke: fail everyone, report unhealthy
            logger.exception("engine thread died")
            self.dead = e
            self._fail_all(EngineUnavailableError(f"engine thread died: {e!r}"))

    def _has_work(self) -> bool:
        return bool(self.engine.has_unfinished_requests())

    def _drain(self, block: bool, timeout: Optional[float]) -> list[object]:
        cmds: list[object] = []
        if block:
            try:
                cmds.append(self._inbox.get(timeout=timeout))
            except queue.Empty:
                return cmds
        while True:
            try:
                cmds.append(self._inbox.get_nowait())
            except queue.Empty:
                return cmds

    def _handle(self, cmd: object) -> None:
        if isinstance(cmd, _Add):
            self._handle_add(cmd)
        elif isinstance(cmd, _Abort):
            for rid in cmd.request_ids:
                if self._live.pop(rid, None) is not None:
                    self.engine.abort_request(rid)
        elif isinstance(cmd, _Call):
            try:
                self._reply(cmd.done, cmd.fn(self.engine), None)
            except Exception as e:
                self._reply(cmd.done, None, e)

    def _handle_add(self, cmd: _Add) -> None:
        added: list[str] = []
        try:
            for req, q in zip(cmd.requests, cmd.queues):
                prompt = req.prompt(self.engine.tokenizer) if callable(req.prompt) else req.prompt
                self.engine.add_request(req.request_id, prompt, req.params,
                                        arrival_time=cmd.arrival_time)
                added.append(req.request_id)
                self._live[req.request_id] = _Live(q, req.params.logprobs is not None)
        except Exception as e:
            for rid in added:
                self._live.pop(rid, None)
                self.engine.abort_request(rid)
            self._reply(cmd.done, None, e)
            return
        self._reply(cmd.done, None, None)

    def _step(self) -> bool:
        """Run one engine step and deliver its outputs; False if the step raised."""
        self.step_started = time.monotonic()
        try:
            outputs = self.engine.step()
        except Exception as e:
            self.num_step_failures += 1
            logger.exception("engine.step() failed; failing %d live request(s)", len(self._live))
            self._fail_all(EngineStepError(f"internal engine error: {e!r}"))
            return False
        finally:
            self.step_started = None
        batch: list[tuple[str, asyncio.Queue, object]] = []
        for out in outputs:
            live = self._live.get(out.request_id)
            if live is None:
                continue  # aborted while the step ran
            item: object = None
            if out.finished:  # a request failed by the engine is finished (siblings aborted)
                del self._live[out.request_id]
                failed = [c for c in out.outputs if c.finish_reason == "error"]
                if failed:
                    item = EngineStepError(f"internal engine error: {failed[0].stop_reason}")
            if item is None:
                item = self._snapshot(out, live)
            batch.append((out.request_id, live.queue, item))
        if batch:
            self._deliver(batch)
        return True

    def _snapshot(self, out: RequestOutput, live: _Live) -> RequestOutput:
        """Copy what the engine may keep mutating; fill in missing logprob token strings."""
        comps = []
        for c in out.outputs:
            logprobs = list(c.logprobs) if c.logprobs is not None else None
            if live.wants_logprobs and logprobs:
                start = live.num_decoded.get(c.index, 0)
                for entry in logprobs[start:]:
                    for tid, lp in entry.items():
                        if lp.decoded_token is None:
                            lp.decoded_token = self.engine.tokenizer.decode(
                                [tid], skip_special_tokens=False)
                live.num_decoded[c.index] = len(logprobs)
            comps.append(dataclasses.replace(c, token_ids=list(c.token_ids), logprobs=logprobs))
        return dataclasses.replace(out, outputs=comps, metrics=dataclasses.replace(out.metrics))

    def _fail_all(self, error: BaseException) -> None:
        batch = [(rid, live.queue, error) for rid, live in self._live.items()]
        for rid in list(self._live):
            try:
                self.engine.abort_request(rid)
            except Exception:
                logger.exception("abort_request(%s) failed", rid)
        self._live.clear()
        if batch:
            self._deliver(batch)

    def _publish_stats(self) -> None:
        try:
            self.stats = dict(self.engine.stats())
        except Exception:
            logger.exception("engine.stats() failed")

    def _deliver(self, batch: list[tuple[str, asyncio.Queue, object]]) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._put_all, batch)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _put_all(self, batch: list[tuple[str, asyncio.Queue, object]]) -> None:
        """(event loop) Queue outputs; a request's last item frees its admission slot."""
        for request_id, q, item in batch:
            q.put_nowait(item)
            if isinstance(item, BaseException) or item.finished:  # type: ignore[attr-defined]
                self._admitted.pop(request_id, None)

    def _reply(self, fut: asyncio.Future, result: object, error: Optional[BaseException]) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(_resolve, fut, result, error)
        except RuntimeError:
            pass


def _resolve(fut: asyncio.Future, result: object, error: Optional[BaseException]) -> None:
    if fut.done():  # the awaiting coroutine was cancelled
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


def _merge(old: RequestOutput, new: RequestOutput) -> RequestOutput:
    """Combine two cumulative outputs of one request: the newer wins per sibling index."""
    by_index: dict[int, CompletionOutput] = {c.index: c for c in old.outputs}
    by_index.update({c.index: c for c in new.outputs})
    return dataclasses.replace(new, outputs=[by_index[i] for i in sorted(by_index)])
