"""The engine loop: one thread owns the engine; everything else talks to it through queues.

    loop = EngineLoop(engine, metrics)
    loop.start()
    await asyncio.wrap_future(loop.submit(engine_request, sink))  # raises the engine's errors
    loop.abort(request_id)                                         # takes effect before next step
    value = await asyncio.wrap_future(loop.call(lambda engine: ...))

The engine is not thread-safe, so only this thread touches it after `start()`. Each iteration
drains the inbox (adds, aborts, calls), runs one `engine.step()`, and hands each delta to its
request's `Sink`. A sink must never block (the asyncio sink schedules a `put_nowait` on the
server's event loop), so a slow client costs memory for its own undelivered deltas, bounded by
its `max_tokens`, and never stalls the loop or its neighbours. An abort (client cancel, deadline,
drain) is applied at the top of the next iteration: within one step.

The loop knows nothing of gRPC or protos.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import inspect
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from pijax.request import PromptSegment, SamplingParams, TokenConstraint

log = logging.getLogger(__name__)

STATS_INTERVAL_S = 0.05


@dataclasses.dataclass(frozen=True)
class EngineRequest:
    """What the servicer hands the loop: an already validated request."""

    request_id: str
    prompt: Sequence[PromptSegment]
    params: SamplingParams
    priority: int = 0
    tenant: str = "default"
    session_id: str | None = None
    permitted_zones: frozenset[str] = frozenset()
    constraint: TokenConstraint | None = None


class EngineFailure(RuntimeError):
    """Put into a sink when the engine raised during a step or stopped under the request."""


class Sink(Protocol):
    def put(self, item: Any) -> None:
        """Deliver a `RequestOutput` or an `EngineFailure`. Must not block; any thread."""


class AsyncioSink:
    """Deltas into an `asyncio.Queue` owned by `loop`, from any thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, q: asyncio.Queue):
        self._loop = loop
        self.queue = q

    def put(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


@dataclasses.dataclass
class _Add:
    request: EngineRequest
    sink: Sink
    future: concurrent.futures.Future


@dataclasses.dataclass
class _Abort:
    request_id: str


@dataclasses.dataclass
class _Call:
    fn: Callable[[Any], Any]
    future: concurrent.futures.Future


class _Stop:
    pass


class EngineLoop:
    def __init__(self, engine, metrics=None, *, idle_poll_s: float = 0.1):
        self.engine = engine
        self._metrics = metrics
        self._idle_poll_s = idle_poll_s
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._post_lock = threading.Lock()  # orders posts against shutdown's final drain
        self._last_stats = 0.0
        params = inspect.signature(engine.add_request).parameters
        self._accepts = {
            name
            for name in ("permitted_zones", "priority", "tenant", "session_id", "constraint")
            if name in params
        }
        self.steps = 0

    # --- any thread -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("engine loop already started")
        self._publish_stats(force=True)
        self._thread = threading.Thread(target=self._run, name="pijax-engine-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Abort what is left (its sinks get `EngineFailure`) and end the thread."""
        if self._thread is None or self._stopped.is_set():
            return
        self._inbox.put(_Stop())
        self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, request: EngineRequest, sink: Sink) -> concurrent.futures.Future:
        """Queue `request`; the future resolves once the engine accepted it, or raises the
        engine's `InvalidRequestError` / `OverloadedError`."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._post(_Add(request, sink, fut), fut)
        return fut

    def abort(self, request_id: str) -> None:
        if not self._stopped.is_set():
            self._inbox.put(_Abort(request_id))

    def call(self, fn: Callable[[Any], Any]) -> concurrent.futures.Future:
        """Run `fn(engine)` on the loop thread between two steps."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._post(_Call(fn, fut), fut)
        return fut

    def _post(self, item, fut: concurrent.futures.Future) -> None:
        with self._post_lock:
            if not self._stopped.is_set() and self._thread is not None:
                self._inbox.put(item)
                return
        fut.set_exception(EngineFailure("the engine loop is not running"))

    # --- the loop thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                if not self._drain_inbox(block=not self.engine.has_unfinished_requests()):
                    break
                if self.engine.has_unfinished_requests():
                    self._step()
                self._publish_stats()
        except Exception:  # never die silently: fail everyone still waiting
            log.exception("engine loop crashed")
        finally:
            self._shutdown()

    def _drain_inbox(self, block: bool) -> bool:
        """Apply every queued command; False on stop."""
        try:
            item = self._inbox.get(timeout=self._idle_poll_s) if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if isinstance(item, _Stop):
                return False
            self._apply(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _apply(self, item) -> None:
        if isinstance(item, _Add):
            self._add(item)
        elif isinstance(item, _Abort):
            self._abort(item.request_id)
        elif isinstance(item, _Call):
            if item.future.set_running_or_notify_cancel():
                try:
                    item.future.set_result(item.fn(self.engine))
                except Exception as e:
                    item.future.set_exception(e)

    def _add(self, item: _Add) -> None:
        if not item.future.set_running_or_notify_cancel():
            return
        r = item.request
        kwargs = {
            "priority": r.priority,
            "tenant": r.tenant,
            "session_id": r.session_id,
            "permitted_zones": r.permitted_zones,
            "constraint": r.constraint,
        }
        try:
            self.engine.add_request(
                r.request_id,
                list(r.prompt),
                r.params,
                **{k: v for k, v in kwargs.items() if k in self._accepts},
            )
        except Exception as e:  # InvalidRequestError, OverloadedError, or a bug: the caller maps it
            item.future.set_exception(e)
            return
        self._sinks[r.request_id] = item.sink
        item.future.set_result(None)

    def _abort(self, request_id: str) -> None:
        sink = self._sinks.pop(request_id, None)
        out = self.engine.abort(request_id)
        if sink is not None and out is not None and self._metrics is not None:
            self._metrics.observe_finished(out)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            log.exception("engine step failed; failing %d in-flight requests", len(self._sinks))
            self._fail_all(EngineFailure(f"engine step failed: {e.__class__.__name__}"))
            return
        self.steps += 1
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is None:
                continue
            if out.finished:
                del self._sinks[out.request_id]
                if self._metrics is not None:
                    self._metrics.observe_finished(out)
            sink.put(out)

    def _fail_all(self, failure: EngineFailure) -> None:
        for request_id, sink in list(self._sinks.items()):
            try:
                self.engine.abort(request_id)
            except Exception:
                log.exception("abort of %s failed", request_id)
            sink.put(failure)
        self._sinks.clear()

    def _publish_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._metrics is None or (not force and now - self._last_stats < STATS_INTERVAL_S):
            return
        self._last_stats = now
        self._metrics.publish_engine_stats(self.engine.stats())

    def _shutdown(self) -> None:
        with self._post_lock:
            self._stopped.set()
        self._fail_all(EngineFailure("the server is shutting down"))
        while True:  # whoever posted after the stop still gets an answer
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            fut = getattr(item, "future", None)
            if fut is not None and fut.set_running_or_notify_cancel():
                fut.set_exception(EngineFailure("the engine loop is not running"))
        self._publish_stats(force=True)
