"""The `callback` decorator and the table of what this process serves.

Functions and async functions are served under their name. A decorated class serves
its public methods (names without a leading underscore): static and class methods at
once, instance methods once its single instance exists (a second instance raises
`InitializationError`, as in the Python daffi).
"""

import functools
import inspect
import threading
import weakref

from .exceptions import InitializationError

_lock = threading.Lock()
#: name -> the function to call; every `Global` of the process serves them.
_served = {}
#: The started `Global`s, told about callbacks decorated after they started.
_globals = weakref.WeakSet()


def callback(target):
    """Serves a function, an async function, or a class's public methods to every node."""
    if inspect.isclass(target):
        return _serve_class(target)
    if not callable(target):
        raise TypeError(f"@callback takes a function or a class, not {type(target).__name__}")
    _serve(target.__name__, target)
    return target


def served():
    """A copy of the table: name -> function."""
    with _lock:
        return dict(_served)


def attach(g):
    """Tells `g` about callbacks decorated after it started."""
    with _lock:
        _globals.add(g)


def _serve(name, function):
    with _lock:
        _served[name] = function
        started = list(_globals)
    for g in started:
        g._serve(name, function)


def _public_methods(cls):
    for name, attr in vars(cls).items():
        if not name.startswith("_"):
            yield name, attr


def _serve_class(cls):
    for name, attr in _public_methods(cls):
        if isinstance(attr, (staticmethod, classmethod)):
            _serve(name, getattr(cls, name))
    original_init = cls.__init__
    made = []

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        if made:
            raise InitializationError(
                f"{cls.__name__} is a callback class: it may have one instance only"
            )
        original_init(self, *args, **kwargs)
        made.append(True)
        for name, attr in _public_methods(cls):
            if inspect.isfunction(attr):
                _serve(name, getattr(self, name))

    cls.__init__ = __init__
    return cls
