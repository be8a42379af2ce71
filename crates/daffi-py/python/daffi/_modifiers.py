"""The modifiers that end a call: `g.call.f(..) & FG`, `& FG(timeout=..)`, `& BG`, ...

Each is usable as the class itself (`& FG`) or an instance with options. After
`await g.call.f(..)`, the `& FG(..)` of that line has already been applied (see
`RemoteCall.__await__`), so a modifier on the right of a value gives the value back.
"""


class _ModifierType(type):
    def __rand__(cls, value):
        return value

    def __repr__(cls):
        return cls.__name__


class _Modifier(metaclass=_ModifierType):
    def __rand__(self, value):
        return value

    def __repr__(self):
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({options})"


class FG(_Modifier):
    """Foreground: wait for the result, at most `timeout` seconds (TimeoutError)."""

    def __init__(self, timeout=None):
        self.timeout = timeout

    def apply(self, call):
        return call.fg(timeout=self.timeout)

    async def apply_async(self, call):
        return await call.fg_async(timeout=self.timeout)


class BG(_Modifier):
    """Background: an `AsyncResult` at once; the call is sent after `eta` seconds."""

    def __init__(self, timeout=None, eta=None):
        self.timeout = timeout
        self.eta = eta

    def apply(self, call):
        return call.bg(timeout=self.timeout, eta=self.eta)

    async def apply_async(self, call):
        return self.apply(call)


class NO_RETURN(_Modifier):
    """No result: returns once the call is sent (at once, with an `eta`)."""

    def __init__(self, eta=None):
        self.eta = eta

    def apply(self, call):
        return call.no_return(eta=self.eta)

    async def apply_async(self, call):
        return await call.no_return_async(eta=self.eta)


class PERIOD(_Modifier):
    """Scheduled by the controller: at each UTC timestamp of `at_time`, or every `period`
    seconds; returns a `ScheduledTask` whose `cancel()` ends it."""

    def __init__(self, at_time=None, period=None):
        self.at_time = at_time
        self.period = period

    def apply(self, call):
        return call.period(at_time=self.at_time, period=self.period)

    async def apply_async(self, call):
        return await call.period_async(at_time=self.at_time, period=self.period)


class BROADCAST(_Modifier):
    """Every node serving the name; with `return_result`, a dict node name -> result."""

    def __init__(self, timeout=None, eta=None, return_result=True):
        self.timeout = timeout
        self.eta = eta
        self.return_result = return_result

    def apply(self, call):
        return call.broadcast(timeout=self.timeout, eta=self.eta, return_result=self.return_result)

    async def apply_async(self, call):
        return await call.broadcast_async(
            timeout=self.timeout, eta=self.eta, return_result=self.return_result
        )


class STREAM(_Modifier):
    """Streams arguments: `g.call.f(items, *args) & STREAM` sends the items of the
    iterable `items` to `f` as they are taken: a Python `f` is called as `f(item, *args,
    **kwargs)` for each in turn, and STREAM gives None once all were taken; a Rust `f`
    takes them as its `daffi::Incoming` parameter, and STREAM gives its result. An
    exception of the callback (or of the iterable) stops it and raises here; `timeout`
    bounds the whole call."""

    def __init__(self, timeout=None):
        self.timeout = timeout

    def apply(self, call):
        return call.stream(timeout=self.timeout)

    async def apply_async(self, call):
        return await call.stream_async(timeout=self.timeout)


MODIFIERS = {m.__name__: m for m in (FG, BG, NO_RETURN, PERIOD, BROADCAST, STREAM)}


def instance(modifier):
    """`FG` or `FG(..)` as an instance."""
    return modifier() if isinstance(modifier, type) else modifier


def is_modifier(value):
    """Whether `value` is a modifier class or instance."""
    return isinstance(value, _Modifier) or (isinstance(value, type) and issubclass(value, _Modifier))
