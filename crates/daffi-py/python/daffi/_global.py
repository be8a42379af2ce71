"""`Global`: this process's node (and maybe the controller), and the way to call others."""

import asyncio
import inspect
import logging
import threading

from . import _callbacks
from ._call import Caller
from ._daffi import Node
from ._wait import wait, wait_async
from .exceptions import GlobalContextError

_log = logging.getLogger("daffi")


class Global:
    """Starts a node (and, with `init_controller=True`, the controller) and calls the
    callbacks of other nodes through `g.call.<name>(...)`.

    With neither `host` nor `port` (nor `unix_sock_path`), nodes meet at the Unix socket
    `<temp dir>/daffi/.sock`; with only `host`, the controller takes a free port (see
    `g.port`). `process_name` defaults to a random name. Use it as a context manager,
    or call `stop()`.

    Sync callbacks run on worker threads (one that has the GIL runs every callback
    waiting; another starts when one blocks); async ones on an event loop this `Global`
    keeps on a thread of its own. A generator function (`def f(): yield ..`) or an
    async generator function (`async def f(): yield ..`) streams its items: each is
    made when the caller's credit allows (at most 32 ahead of its reading), generators
    on the node's sync callback threads (the GIL held only while making one item),
    async generators on that event loop; a caller that stops reading closes the
    generator.
    """

    def __init__(
        self,
        process_name=None,
        init_controller=False,
        init_node=True,
        host=None,
        port=None,
        unix_sock_path=None,
    ):
        self._callback_loop = _CallbackLoop()
        callbacks = []
        if init_node:
            callbacks = [(name, *self._runner(f)) for name, f in _callbacks.served().items()]
        self._node = Node(
            callbacks,
            process_name,
            init_controller,
            init_node,
            host,
            None if port is None else int(port),
            None if unix_sock_path is None else str(unix_sock_path),
        )
        self._stopped = False
        self.process_name = self._node.process_name
        self.call = Caller(self)
        if init_node:
            _callbacks.attach(self)

    def __repr__(self):
        return f"Global(process_name={self.process_name!r})"

    @property
    def port(self):
        """The controller's TCP port (None on a Unix socket)."""
        return self._node.port

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def wait_process(self, process_name, timeout=None):
        """Waits until the node `process_name` is connected (TimeoutError after `timeout`)."""
        wait(self._node_now().wait_process(process_name), timeout)

    async def wait_process_async(self, process_name, timeout=None):
        """`wait_process` for async code."""
        await wait_async(self._node_now().wait_process(process_name), timeout)

    def wait_function(self, function_name, timeout=None):
        """Waits until some node serves the callback `function_name`."""
        wait(self._node_now().wait_function(function_name), timeout)

    async def wait_function_async(self, function_name, timeout=None):
        """`wait_function` for async code."""
        await wait_async(self._node_now().wait_function(function_name), timeout)

    def join(self):
        """Blocks until this `Global` stops (Ctrl-C ends the wait)."""
        wait(self._node_now().join())

    async def join_async(self):
        """Waits until this `Global` stops, without blocking the event loop."""
        await wait_async(self._node_now().join())

    def registered_callbacks(self):
        """Callback name -> names of the nodes serving it."""
        return self._node_now().registered_callbacks()

    def stop(self):
        """Stops the node (and the controller, if this process runs it)."""
        if self._stopped:
            return
        self._stopped = True
        self._node.stop()
        self._callback_loop.stop()

    def _node_now(self):
        if self._stopped:
            raise GlobalContextError("this Global was stopped")
        return self._node

    def _serve(self, name, function):
        """Serves a callback decorated after this `Global` started."""
        if not self._stopped:
            self._node.register(name, *self._runner(function))

    def _runner(self, function):
        """What the node calls for `function`, and its kind (see `Node.register`)."""
        if inspect.isasyncgenfunction(function):
            return self._callback_loop.async_generator(function), "async_generator"
        if inspect.iscoroutinefunction(function):
            return self._callback_loop.submitter(function), "async"
        if inspect.isgeneratorfunction(function):
            return function, "generator"
        return function, "sync"


class _CallbackLoop:
    """The event loop async callbacks run on, on its own thread, started on first use."""

    def __init__(self):
        self._lock = threading.Lock()
        self._loop = None
        self._thread = None

    def _running(self):
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=self._loop.run_forever, name="daffi-callbacks", daemon=True
                )
                self._thread.start()
            return self._loop

    def submitter(self, function):
        """`submit(args, kwargs, done)`: runs `function` on the loop, then `done(ok, value)`."""

        def submit(args, kwargs, done):
            future = asyncio.run_coroutine_threadsafe(function(*args, **kwargs), self._running())
            future.add_done_callback(lambda f: _report(f, done))

        return submit

    def async_generator(self, function):
        """`start(args, kwargs)`: an `_AsyncGeneratorRun` of `function(*args, **kwargs)`."""

        def start(args, kwargs):
            return _AsyncGeneratorRun(function(*args, **kwargs), self._running())

        return start

    def stop(self):
        with self._lock:
            loop, thread, self._loop = self._loop, self._thread, None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=5)


class _AsyncGeneratorRun:
    """An async generator served as a stream: asked for one item at a time, on the loop."""

    def __init__(self, generator, loop):
        self._generator = generator
        self._loop = loop
        self._step = None  # the task making the item asked for

    def advance(self, done):
        """Makes the next item; `done(ok, value)` gets it, or `done.end()` the end."""
        self._loop.call_soon_threadsafe(self._start_step, done)

    def _start_step(self, done):
        self._step = self._loop.create_task(self._next(done))

    async def _next(self, done):
        try:
            item = await self._generator.__anext__()
        except StopAsyncIteration:
            done.end()
        except BaseException as error:
            done(False, error)
            if not isinstance(error, Exception):
                raise  # a cancel (the caller left), or the process ending
        else:
            done(True, item)

    def close(self):
        """Stops the generator, even while it awaits its next item (the caller left)."""
        asyncio.run_coroutine_threadsafe(self._close(), self._loop)

    async def _close(self):
        step = self._step
        if step is not None and not step.done():
            step.cancel()
            await asyncio.wait([step])
        try:
            await self._generator.aclose()
        except Exception as error:  # noqa: BLE001 - logged: nobody else is told
            _log.warning("an async generator raised while being closed: %r", error)


def _report(future, done):
    if future.cancelled():
        done(False, asyncio.CancelledError("the callback was cancelled"))
    elif future.exception() is not None:
        done(False, future.exception())
    else:
        done(True, future.result())
