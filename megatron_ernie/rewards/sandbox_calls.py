"""Assertion tests across two processes (child side of the sandbox; standard library only): the
design, what both sides share (exceptions as plain data), and the candidate's side (`serve`); the
evaluator's side is `sandbox_evaluator`.

The verdict of an assertion test must not live where the program runs: a program can lie with
its objects (`__eq__`, `__lt__`, `__contains__`, proxies), patch modules and builtins, fork
children, and read or write every descriptor and byte of its own process. So each assertion test
runs in two processes (`sandbox_runner` forks both):

    candidate  (the program's uid)  runs the program as module `solution`, then serves calls
    evaluator  (another uid)        runs the test code; every name of the program the test uses
                                    is a proxy whose calls cross to the candidate and back

Only plain data crosses (`sandbox_codec`), rebuilt on the other side as exact built-in (or
honest standard-library) types: a subclass or a lying object arrives as the honest value it
holds, or not at all. What is not plain stays where it is, as a handle:

* the program's objects (an instance of its class, a generator) are `ProgramObject`s in the
  test: attributes, items, calls, `len`, truthiness, text, iteration and `with` cross as plain
  data; comparing one to anything but itself (`==`, `<`, ...) and arithmetic on it are refused —
  its class's methods are never consulted for a verdict — and `in` iterates it;
* the test's objects (its functions, its `ListNode`s, its generators) are proxies in the program:
  the program's calls, attribute and item accesses on them run back in the evaluator, with plain
  data (never a private attribute: nothing of the evaluator's internals is reachable).

So every comparison of the test (`==`, `<`, `in`, `abs(a - b) < eps`, `math.isclose`, loops of
cases) runs in the evaluator over trusted values, with its own unpatched modules and builtins.
A program's names that shadow a builtin do not shadow it in the test (`from solution import abs`
asks for them); names used as modules (`math.isclose`) are the standard library's; a program's
`from math import isclose` is the evaluator's own `isclose` when vetted (`_EXTERNALS`). A refusal
(a comparison, an argument that cannot cross, a private attribute) fails the test even if the
test catches it, as does a failed assertion inside a test function the program was given. The
evaluator compiles no text but the test's own (`_guard_evaluator`): a test that `eval`s the
program's output would otherwise run the program's code beside the verdict. The verdict goes
from the evaluator to the supervisor on a pipe the candidate never holds, and the test code
(with its expected values) never enters the candidate's memory.
"""
import builtins
import os
import sys
import types

try:  # inside the sandbox: a top-level module beside this one (see sandbox_runner.command)
    import sandbox_codec as codec
except ImportError:  # imported as part of the package (tests, tools)
    from megatron_ernie.rewards import sandbox_codec as codec

Ref, TestRef, NotPlain, as_builtin, encode, decode = codec.Ref, codec.TestRef, codec.NotPlain, codec.as_builtin, \
    codec.encode, codec.decode
METADATA = frozenset({"__name__", "__qualname__", "__doc__", "__module__"})  # readable on the test's objects
_FUTURE_ANNOTATIONS = 0x1000000  # `from __future__ import annotations`: LeetCode-style `-> List[int]`


def classify(e) -> tuple:
    """(kind, detail) of an exception, for the verdict."""
    name = type(e).__name__
    if isinstance(e, SyntaxError):
        return "syntax error", f"line {e.lineno}: {e.msg}"
    if isinstance(e, MemoryError):
        return "memory limit", name
    if isinstance(e, RecursionError):
        return "recursion limit", name
    if isinstance(e, OSError):
        by_errno = {27: "file size limit", 28: "disk full", 24: "open files limit", 11: "process limit"}
        if e.errno in by_errno:
            return by_errno[e.errno], name
    if isinstance(e, PermissionError) and str(e).startswith("sandbox:"):
        return "blocked", str(e)[9:]
    try:
        msg = str(e)
    except BaseException:  # noqa: BLE001 - a hostile __str__
        msg = "?"
    tb, line = e.__traceback__, None
    while tb is not None:
        line, tb = tb.tb_lineno, tb.tb_next
    return f"runtime error: {name}", f"{msg[:300]} (line {line})"


def builtin_base(e) -> str:
    for k in (e if isinstance(e, type) else type(e)).__mro__:
        if getattr(builtins, getattr(k, "__name__", ""), None) is k:
            return k.__name__
    return "Exception"


_EXCEPTION_CLASSES: dict = {}  # exception classes of the other side, by name, as classes of our own


def exception_class(name: str, base: str) -> type:
    """Our class standing for the other side's exception class `name` (a subclass of the built-in
    `base`), one per name: in the evaluator, what `except InsufficientFunds` in the test catches
    when the program raises one. A trivial class of our own: nothing of theirs comes with it."""
    cls = getattr(builtins, base, None)
    if not (isinstance(cls, type) and issubclass(cls, Exception)) or issubclass(cls, (StopIteration, StopAsyncIteration)):
        cls = Exception
    if name not in _EXCEPTION_CLASSES or not issubclass(_EXCEPTION_CLASSES[name], cls):
        _EXCEPTION_CLASSES[name] = type(name, (cls,), {"__module__": "solution"})
    return _EXCEPTION_CLASSES[name]


def rebuild_exception(name, base, text, args, attrs):
    """An exception described as plain data, rebuilt as a trusted one: its built-in base class
    (so `except ValueError` works), under its own class name, with its args and plain public
    attributes. StopIteration never comes back as itself: raised by a called function it would
    silently end a `map()` or generator of the receiver (PEP 479 does the same in generators)."""
    if type(name) is not str or type(base) is not str or type(text) is not str:
        return RuntimeError("an exception that could not be described")
    name, text = name[:100], text[:1000]
    if base == "SystemExit":
        return SystemExit(*(args if type(args) is tuple and len(args) <= 1 else ()))
    cls = getattr(builtins, base, None)
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        cls = Exception
    if issubclass(cls, (StopIteration, StopAsyncIteration)):
        return RuntimeError(f"{name} raised by the other side: {text}")
    if name != cls.__name__ and name.isidentifier():
        cls = exception_class(name, base)
    try:
        e = cls(*args) if type(args) is tuple else cls(text)
    except BaseException:  # noqa: BLE001 - e.g. UnicodeDecodeError needs five arguments
        e = RuntimeError(f"{name}: {text}")
    for k, v in (attrs.items() if type(attrs) is dict else ()):
        if type(k) is str and k.isidentifier() and not k.startswith("_"):
            try:
                setattr(e, k, v)
            except BaseException:  # noqa: BLE001
                pass
    return e


def describe(e, plain) -> tuple:
    """An exception as plain data: ("err", name, base, text, args, attrs, token)."""
    try:
        text = str(e)[:1000]
    except BaseException:  # noqa: BLE001 - a hostile __str__
        text = "?"
    args = e.args if type(getattr(e, "args", None)) is tuple else None
    attrs = {k: v for k, v in getattr(e, "__dict__", {}).items() if type(k) is str and not k.startswith("_")}
    if args is not None and not plain(args):
        args = None
    attrs = {k: v for k, v in attrs.items() if plain(v)}
    return ("err", type(e).__name__[:100], builtin_base(e), text, args, attrs, getattr(e, "_sandbox_token", None))


# ---------------------------------------------------------------------------------------------
# Candidate side: run the program, then serve the evaluator's calls
# ---------------------------------------------------------------------------------------------

def serve(program: str, requests: int, replies: int, max_bytes: int, before_run=None) -> None:
    """Run `program` as module `solution`, send the names the test asked for, then answer
    requests until told to stop; `before_run()` is called just before the program starts. Never
    returns. Everything used after the program starts is bound here first, so a program that
    patches modules can at worst break its own answers."""
    _exit, _send, _recv, _classify, _as_builtin, _describe = os._exit, codec.send, codec.recv, classify, \
        as_builtin, describe
    _Base, _SystemExit, _StopIteration, _type, _str, _getattr, _id = BaseException, SystemExit, StopIteration, type, \
        str, getattr, id
    _setattr, _delattr, _iter, _next, _len, _bool, _repr = setattr, delattr, iter, next, len, bool, repr
    _flush = [sys.stdout.flush, sys.stderr.flush]
    handles: list = []
    handle_of: dict = {}

    def to_handle(v):
        if _type(v) is TestObject:
            return TestRef(v.n)
        plain = _as_builtin(v)
        if plain is not None:
            return plain
        n = handle_of.get(_id(v))
        if n is None or handles[n] is not v:  # one handle per object: identity survives the trip
            n = handle_of[_id(v)] = len(handles)
            handles.append(v)
        return Ref(n)

    def reply(msg) -> None:
        _send(replies, msg, to_handle)

    def receive():
        try:
            return _recv(requests, 1 << 30, handles.__getitem__, test_object)
        except _Base:  # noqa: BLE001 - the evaluator is gone
            finish(0)

    def finish(code: int):
        for f in _flush:
            try:
                f()
            except _Base:  # noqa: BLE001
                pass
        _exit(code)

    class TestObject:
        """An object of the test (a function, a ListNode, a generator): every use asks the
        evaluator, serving any calls it makes back into the program meanwhile."""
        __slots__ = ("n",)

        def __init__(self, n):
            object.__setattr__(self, "n", n)

        def __getattribute__(self, name):
            if name in METADATA:  # the test function's own name and doc, not this class's
                return object.__getattribute__(self, "_ask")("getattr", name)
            return object.__getattribute__(self, name)

        def _ask(self, op, *args):
            reply(("test", op, object.__getattribute__(self, "n"), *args))
            while True:
                msg = receive()
                if msg[0] == "returned":
                    return msg[1]
                if msg[0] == "stop":
                    raise _StopIteration
                if msg[0] == "raised":
                    e = rebuild_exception(*msg[1:5], {})
                    try:
                        e._sandbox_token = msg[5]  # the evaluator re-raises its own exception
                    except _Base:  # noqa: BLE001
                        pass
                    raise e
                answer(msg)

        def __call__(self, *args, **kwargs):
            return self._ask("call", list(args), dict(kwargs))

        def __getattr__(self, name):
            return self._ask("getattr", name)

        def __setattr__(self, name, value):
            self._ask("setattr", name, value)

        def __delattr__(self, name):
            self._ask("delattr", name)

        def __getitem__(self, key):
            return self._ask("getitem", key)

        def __setitem__(self, key, value):
            self._ask("setitem", key, value)

        def __delitem__(self, key):
            self._ask("delitem", key)

        def __len__(self):
            return self._ask("len")

        def __bool__(self):
            return self._ask("bool")

        def __str__(self):
            return self._ask("str")

        def __repr__(self):
            return self._ask("repr")

        def __iter__(self):
            return self._ask("iter")

        def __next__(self):
            return self._ask("next")

    test_objects: dict = {}

    def test_object(n):
        if n not in test_objects:
            test_objects[n] = TestObject(n)
        return test_objects[n]

    try:
        code = compile(program, "<solution>", "exec", _FUTURE_ANNOTATIONS, dont_inherit=True, optimize=0)
    except _Base as e:  # noqa: BLE001 - SyntaxError, ValueError (NUL bytes), MemoryError...
        reply(("load_error", *_classify(e)))
        finish(1)
    module = types.ModuleType("solution")
    module.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = sys.modules["solution"] = module
    if before_run is not None:
        before_run()
    try:
        exec(code, module.__dict__)
    except _SystemExit:
        reply(("load_error", "exited before the tests ran", ""))
        finish(1)
    except _Base as e:  # noqa: BLE001
        reply(("load_error", *_classify(e)))
        finish(1)
    asked = receive()  # the evaluator's first message: ("names", [names the test uses] or None for all)
    wanted = asked[1] if _type(asked) is tuple and len(asked) == 2 and asked[0] == "names" else []
    reply(("ready", _catalog(module.__dict__, wanted, to_handle, max_bytes)))

    def call(obj, args, kwargs, capture):
        if not capture:
            return obj(*args, **kwargs), ""
        tee = _Tee(sys.stdout)
        sys.stdout = tee
        try:
            return obj(*args, **kwargs), tee.text()
        finally:
            sys.stdout = tee.real

    def answer(msg) -> None:
        """Serve one request of the evaluator."""
        op = msg[0]
        try:
            if op == "exit":
                finish(0)
            obj = handles[msg[1]]
            if op == "call":
                args, kwargs = msg[2], msg[3]
                result, printed = call(obj, args, kwargs, msg[6])
                out = ("ok", result, [args[i] for i in msg[4]], [kwargs[k] for k in msg[5]], printed)
            elif op == "getattr":
                out = ("ok", _getattr(obj, msg[2]))
            elif op == "setattr":
                out = ("ok", _setattr(obj, msg[2], msg[3]))
            elif op == "delattr":
                out = ("ok", _delattr(obj, msg[2]))
            elif op == "getitem":
                out = ("ok", obj[msg[2]])
            elif op == "setitem":
                obj[msg[2]] = msg[3]
                out = ("ok", None)
            elif op == "delitem":
                del obj[msg[2]]
                out = ("ok", None)
            elif op == "iter":
                out = ("ok", _iter(obj))
            elif op == "next":
                out = ("ok", _next_batch(obj, msg[2]))
            elif op == "enter":
                out = ("ok", obj.__enter__())
            elif op == "exit_cm":
                obj.__exit__(None, None, None)
                out = ("ok", None)
            elif op in ("len", "bool", "str", "repr"):
                out = ("ok", {"len": _len, "bool": _bool, "str": _str, "repr": _repr}[op](obj))
            else:
                out = ("err", "TypeError", "TypeError", f"unknown request {op!r}", None, {}, None)
        except _Base as e:  # noqa: BLE001 - the program's exception (SystemExit too), as plain data
            out = _describe(e, is_plain)
        try:
            reply(out)
        except _Base:  # noqa: BLE001 - e.g. a result nested too deeply to send
            reply(("err", "TypeError", "TypeError", "the program's result cannot be sent as plain data", None, {}, None))

    def _next_batch(obj, n):
        """Up to n items; an exception after some items is sent with them, raised in turn."""
        items = []
        for _ in range(n):
            try:
                items.append(_next(obj))
            except _StopIteration:
                return items, True, None
            except _Base as e:  # noqa: BLE001
                return items, True, _describe(e, is_plain)
        return items, False, None

    while True:
        answer(receive())


def _no_handles(v):
    raise NotPlain(type(v).__name__)


def is_plain(v) -> bool:
    try:
        encode(v, _no_handles)
        return True
    except BaseException:  # noqa: BLE001
        return False


class _Tee:
    """The program's stdout during one call, when the test captures it (`redirect_stdout`):
    written through, and sent with the reply."""

    def __init__(self, real):
        self.real, self.parts = real, []

    def write(self, s):
        self.parts.append(str(s))
        return self.real.write(s)

    def flush(self):
        self.real.flush()

    def text(self) -> str:
        return "".join(self.parts)

    def __getattr__(self, name):
        return getattr(self.real, name)


def _catalog(ns: dict, wanted, to_handle, max_bytes: int) -> list:
    """(name, kind, ...) for the names the test uses (all when `wanted` is None): "module" (its
    name), "external" (a function or class of another module: module, qualname and a handle),
    "value" (plain data) or "object" (a handle)."""
    out, budget = [], max_bytes // 2
    names = [n for n in ns if wanted is None or n in wanted] if type(wanted) in (list, type(None)) else []
    for name in names:
        v = ns[name]
        if name.startswith("__") and name.endswith("__"):
            continue
        if type(v) is types.ModuleType:
            out.append((name, "module", str(getattr(v, "__name__", ""))))
            continue
        if callable(v):
            mod, qual = getattr(v, "__module__", None), getattr(v, "__qualname__", None)
            if isinstance(v, type) and issubclass(v, BaseException) and mod in ("solution", "__main__"):
                out.append((name, "exception", builtin_base(v), to_handle(v)))  # `except ProgramError`
                continue
            if type(mod) is str and type(qual) is str and mod not in ("solution", "__main__"):
                out.append((name, "external", mod, qual, to_handle(v)))
            else:
                out.append((name, "object", to_handle(v)))
            continue
        try:
            size = len(encode(v, to_handle))
        except BaseException:  # noqa: BLE001 - unencodable (too deep, hostile): a handle instead
            size = budget + 1
        if size > budget:
            out.append((name, "object", to_handle(v)))
        else:
            budget -= size
            out.append((name, "value", v))
    return out
