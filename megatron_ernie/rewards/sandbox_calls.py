"""Assertion tests across two processes (child side of the sandbox; standard library only).

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
_BUILTIN_NAMES = frozenset(vars(builtins))
# never imported for a program: side effects, `__main__` scripts, or objects equal to anything
_UNIMPORTABLE = frozenset({"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "webbrowser",
                           "unittest", "doctest", "ctypes", "pdb", "venv", "lib2to3", "ensurepip", "site", "runpy"})
_METADATA = frozenset({"__name__", "__qualname__", "__doc__", "__module__"})  # readable on the test's objects
_FUTURE_ANNOTATIONS = 0x1000000  # `from __future__ import annotations`: LeetCode-style `-> List[int]`
_MUTABLE = (list, dict, set, bytearray)


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


def _builtin_base(e) -> str:
    for k in (e if isinstance(e, type) else type(e)).__mro__:
        if getattr(builtins, getattr(k, "__name__", ""), None) is k:
            return k.__name__
    return "Exception"


_EXCEPTION_CLASSES: dict = {}  # the program's exception classes, as classes of the evaluator's own


def exception_class(name: str, base: str) -> type:
    """The evaluator's class standing for the program's exception class `name` (a subclass of the
    built-in `base`): what `except InsufficientFunds` in the test catches when the program raises
    one. A trivial class of our own: nothing of the program's class comes with it."""
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
    if name in _EXCEPTION_CLASSES and issubclass(_EXCEPTION_CLASSES[name], cls):
        cls = _EXCEPTION_CLASSES[name]
    elif name != cls.__name__ and name.isidentifier():
        cls = type(name, (cls,), {"__module__": "solution"})
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
    return ("err", type(e).__name__[:100], _builtin_base(e), text, args, attrs, getattr(e, "_sandbox_token", None))


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

    def is_plain(v) -> bool:
        try:
            codec.encode(v, _no_handles)
            return True
        except _Base:  # noqa: BLE001
            return False

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
            if name in _METADATA:  # the test function's own name and doc, not this class's
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
                out.append((name, "exception", _builtin_base(v), to_handle(v)))  # `except ProgramError`
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


# ---------------------------------------------------------------------------------------------
# Evaluator side: run the test against handles
# ---------------------------------------------------------------------------------------------

class ChannelBroken(BaseException):
    """The candidate broke the conversation (died, exited, sent garbage). A BaseException, so a
    test's `except Exception` cannot swallow it; the evaluator also remembers it."""


class Refused(BaseException):
    """Something the evaluator will not do with the program's objects (compare them, do
    arithmetic on them, send an argument that cannot cross). A BaseException, so a test's
    `except TypeError` cannot take it for the program's error; it fails the test in any case."""


_TEST_OBJECTS: list = []      # the test's objects the program was given, by number
_TEST_OBJECT_IDS: dict = {}
_RAISED: dict = {}            # token -> an exception of the test that went through the program
_PROGRAM_OBJECTS: dict = {}   # handle number -> its one ProgramObject (identity survives)
_ITERATION: dict = {}         # handle number -> [buffered items, exhausted, pending error, batch]


def _plain_only(v):
    """The evaluator's fallback: its handles go back as handles, its own objects as test handles."""
    if type(v) is ProgramObject:
        return Ref(object.__getattribute__(v, "_ref"))
    n = _TEST_OBJECT_IDS.get(id(v))
    if n is None or _TEST_OBJECTS[n] is not v:
        n = _TEST_OBJECT_IDS[id(v)] = len(_TEST_OBJECTS)
        _TEST_OBJECTS.append(v)
    return TestRef(n)


def _program_object(n: int) -> "ProgramObject":
    if type(n) is not int:
        raise ValueError("malformed handle")
    po = _PROGRAM_OBJECTS.get(n)
    if po is None:
        po = _PROGRAM_OBJECTS[n] = ProgramObject(n)
    return po


def _test_object(n: int):
    if not 0 <= n < len(_TEST_OBJECTS):
        raise ValueError("a test object the program was never given")
    return _TEST_OBJECTS[n]


class _Channel:
    def __init__(self, requests: int, replies: int, max_bytes: int):
        self.requests, self.replies, self.max_bytes = requests, replies, max_bytes
        self.broken = ""
        self.failed = None  # (kind, detail) that fails the test whatever the test caught

    def fail(self, why: str):
        self.broken = self.broken or why
        raise ChannelBroken(why)

    def refuse(self, kind: str, detail: str):
        self.failed = self.failed or (kind, detail[:300])
        raise Refused(f"{kind}: {detail}")

    def receive(self, gone: str = "program died during the test"):
        try:
            msg = codec.recv(self.replies, self.max_bytes, _program_object, _test_object)
        except EOFError:
            self.fail(gone)
        except (ValueError, TypeError, OverflowError, ArithmeticError, MemoryError, KeyError) as e:
            self.fail(f"program sent garbage: {str(e)[:100]}")
        if type(msg) is not tuple or not msg or type(msg[0]) is not str:
            self.fail("program sent garbage: not a message")
        return msg

    def send(self, msg: tuple, gone: str = "program died during the test") -> None:
        try:
            data = encode(msg, _plain_only)
        except NotPlain as e:  # nested too deeply: the test's argument, refused
            self.refuse("argument cannot cross", str(e))
        try:
            os.write(self.requests, len(data).to_bytes(4, "big"))
            view = memoryview(data)
            while view:
                view = view[os.write(self.requests, view):]
        except OSError:
            self.fail(gone)

    def request(self, msg: tuple) -> tuple:
        if self.broken:
            raise ChannelBroken(self.broken)
        self.send(msg)
        reply = self.receive()
        while reply[0] == "test":
            self.serve_test_object(reply)
            reply = self.receive()
        if reply[0] == "err":
            raise self.program_exception(reply)
        if reply[0] != "ok" or len(reply) < 2:
            self.fail("program sent garbage: not a reply")
        return reply

    def program_exception(self, reply: tuple) -> BaseException:
        if len(reply) != 7:
            self.fail("program sent garbage: malformed exception")
        token = reply[6]
        if type(token) is int and token in _RAISED:  # the test's own exception, back through the program
            return _RAISED[token]
        return rebuild_exception(*reply[1:6])

    def serve_test_object(self, msg: tuple) -> None:
        """The program uses one of the test's objects: do it here, on plain data, and send what
        came of it. Private attributes stay private (the evaluator's internals are one
        `__globals__` away from any function). A failed assertion fails the test even if the
        program catches the error it gets."""
        if len(msg) < 3 or type(msg[1]) is not str or type(msg[2]) is not int or not 0 <= msg[2] < len(_TEST_OBJECTS):
            self.fail("program sent garbage: malformed use of a test object")
        op, obj, args = msg[1], _TEST_OBJECTS[msg[2]], msg[3:]
        try:
            if op in ("getattr", "setattr", "delattr"):
                name = args[0] if args else None
                if type(name) is not str or (name.startswith("_") and not (op == "getattr" and name in _METADATA)):
                    raise AttributeError(f"{name!r}: not an attribute the program may use")
            if op == "call":
                if len(args) != 2 or type(args[0]) is not list or type(args[1]) is not dict \
                        or not all(type(k) is str for k in args[1]):
                    self.fail("program sent garbage: malformed call")
                result = obj(*args[0], **args[1])
            elif op == "getattr":
                result = getattr(obj, args[0])
            elif op == "setattr":
                result = setattr(obj, args[0], args[1])
            elif op == "delattr":
                result = delattr(obj, args[0])
            elif op == "getitem":
                result = obj[args[0]]
            elif op == "setitem":
                obj[args[0]] = args[1]
                result = None
            elif op == "delitem":
                del obj[args[0]]
                result = None
            elif op in ("len", "bool", "str", "repr", "iter"):
                result = {"len": len, "bool": bool, "str": str, "repr": repr, "iter": iter}[op](obj)
            elif op == "next":
                try:
                    result = next(obj)
                except StopIteration:
                    self.send(("stop",))
                    return
            else:
                self.fail("program sent garbage: unknown use of a test object")
            self.send(("returned", result))
            return
        except (ChannelBroken, Refused):
            raise
        except BaseException as e:  # noqa: BLE001 - the test function's exception goes to the program
            if isinstance(e, AssertionError) and not self.failed:
                self.failed = ("assertion failed", _safe_str(e) or "in a function of the test")
            token = len(_RAISED)
            _RAISED[token] = e
            self.send(("raised", type(e).__name__, _builtin_base(e), _safe_str(e, 1000),
                       e.args if _plain(e.args) else None, token))


def _plain(v) -> bool:
    try:
        encode(v, _no_handles)
        return True
    except BaseException:  # noqa: BLE001
        return False


def _refill(target, value) -> None:
    """A mutable argument after the call: the program's in-place changes, copied back."""
    if type(value) is not type(target):
        return
    if type(target) in (list, bytearray):
        target[:] = value
    elif hasattr(target, "extend"):  # deque
        target.clear()
        target.extend(value)
    else:
        target.clear()
        target.update(value)


def _mutable(a) -> bool:
    t = type(a)
    return t in _MUTABLE or (t.__module__, t.__qualname__) in (
        ("collections", "deque"), ("collections", "Counter"), ("collections", "OrderedDict"),
        ("collections", "defaultdict"))


class _Calls:
    """What the handles use to talk to the candidate (one per evaluator process)."""

    def __init__(self, channel: _Channel):
        self.channel = channel

    def op(self, op: str, ref: int, *args):
        reply = self.channel.request((op, ref, *args))
        if len(reply) != 2:
            self.channel.fail("program sent garbage: malformed reply")
        return reply[1]

    def call(self, ref: int, args: tuple, kwargs: dict):
        back = [i for i, a in enumerate(args) if _mutable(a)]
        kback = [k for k, a in kwargs.items() if _mutable(a)]
        capture = sys.stdout is not sys.__stdout__  # the test captures printed output
        reply = self.channel.request(("call", ref, list(args), dict(kwargs), back, kback, capture))
        if len(reply) != 5 or type(reply[2]) is not list or type(reply[3]) is not list or type(reply[4]) is not str \
                or len(reply[2]) != len(back) or len(reply[3]) != len(kback):
            self.channel.fail("program sent garbage: malformed call reply")
        for i, new in zip(back, reply[2]):
            _refill(args[i], new)
        for k, new in zip(kback, reply[3]):
            _refill(kwargs[k], new)
        if reply[4]:
            sys.stdout.write(reply[4])
        return reply[1]

    def next_item(self, ref: int):
        """The next item of a program iterator. Items are fetched in batches that grow (1, 2, 4
        ... 256 per round trip) and are buffered per object, so partial consumption (`islice`,
        then `next`) sees every item once, in order; an exception after some items is raised
        when the test reaches it."""
        state = _ITERATION.setdefault(ref, [[], False, None, 1])
        if not state[0]:
            if state[2] is not None:
                error, state[2] = state[2], None
                raise self.channel.program_exception(error)
            if state[1]:
                raise StopIteration
            got = self.op("next", ref, state[3])
            if type(got) is not tuple or len(got) != 3 or type(got[0]) is not list or type(got[1]) is not bool \
                    or not (got[2] is None or type(got[2]) is tuple):
                self.channel.fail("program sent garbage: malformed iteration reply")
            state[0], state[1], state[2], state[3] = got[0][::-1], got[1], got[2], min(state[3] * 2, 256)
            if not state[0]:
                return self.next_item(ref)
        return state[0].pop()


_CALLS: list = []  # the evaluator's one _Calls


def _calls() -> _Calls:
    return _CALLS[0]


def _typed(value, kind, what: str):
    if type(value) is not kind:
        raise TypeError(f"the program's {what} returned {type(value).__name__}, not {kind.__name__}")
    return value


_COMPARISONS = frozenset({"==", "!=", "<", "<=", ">", ">="})


def _refused_operation(name: str):
    kind = "compared an object of the program's own class" if name in _COMPARISONS \
        else "operation on an object of the program's own class"

    def refuse(self, *args):
        _calls().channel.refuse(kind, f"{name} is the program's to define; use plain values")
    refuse.__name__ = name
    return refuse


class ProgramObject:
    """A function, class, instance, generator ... that lives in the program's process. Calls,
    attributes, items, len, bool, str, repr, iteration and `with` cross as plain data; it equals
    itself (the same object of the program: identity needs no code of the program), and any
    other comparison or arithmetic is refused."""

    __slots__ = ("_ref", "__weakref__")

    def __init__(self, ref: int):
        object.__setattr__(self, "_ref", ref)

    def _op(self, op: str, *args):
        return _calls().op(op, object.__getattribute__(self, "_ref"), *args)

    def __getattribute__(self, name):
        if name in _METADATA:  # the program object's own name and doc, not this class's
            return _calls().op("getattr", object.__getattribute__(self, "_ref"), name)
        return object.__getattribute__(self, name)

    def __call__(self, *args, **kwargs):
        return _calls().call(object.__getattribute__(self, "_ref"), args, kwargs)

    def __getattr__(self, name):
        return self._op("getattr", name)

    def __setattr__(self, name, value):
        self._op("setattr", name, value)

    def __delattr__(self, name):
        self._op("delattr", name)

    def __getitem__(self, key):
        return self._op("getitem", key)

    def __setitem__(self, key, value):
        self._op("setitem", key, value)

    def __delitem__(self, key):
        self._op("delitem", key)

    def __len__(self):
        n = _typed(self._op("len"), int, "__len__")
        if n < 0:
            raise ValueError("__len__() should return >= 0")
        return n

    def __bool__(self):
        return _typed(self._op("bool"), bool, "__bool__")

    def __str__(self):
        return _typed(self._op("str"), str, "__str__")

    def __repr__(self):
        try:
            return _typed(self._op("repr"), str, "__repr__")
        except Exception:  # noqa: BLE001 - repr is used in error messages: never fail there
            return "<object of the program>"

    def __iter__(self):
        it = self._op("iter")
        return it if type(it) is not ProgramObject else _Iterator(object.__getattribute__(it, "_ref"))

    def __next__(self):
        return _calls().next_item(object.__getattribute__(self, "_ref"))

    def __contains__(self, item):
        # not the program's __contains__: the items it yields, compared here
        return any(item is x or item == x for x in self)

    def __enter__(self):
        return self._op("enter")

    def __exit__(self, *exc):
        self._op("exit_cm")
        return False  # never the program's to swallow the test's exception (an AssertionError)

    def __eq__(self, other):
        if other is self:
            return True
        return _refused_operation("==")(self)

    def __ne__(self, other):
        if other is self:
            return False
        return _refused_operation("!=")(self)

    def __le__(self, other):
        if other is self:
            return True
        return _refused_operation("<=")(self)

    def __ge__(self, other):
        if other is self:
            return True
        return _refused_operation(">=")(self)

    __lt__, __gt__ = _refused_operation("<"), _refused_operation(">")
    __hash__ = object.__hash__


for _op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "lshift", "rshift", "and", "or",
            "xor", "divmod"):
    setattr(ProgramObject, f"__{_op}__", _refused_operation(_op))
    setattr(ProgramObject, f"__r{_op}__", _refused_operation(_op))
for _op in ("neg", "pos", "abs", "invert", "int", "float", "complex", "index", "round", "trunc", "floor", "ceil"):
    setattr(ProgramObject, f"__{_op}__", _refused_operation(_op))
del _op


class _Iterator:
    """Iteration over a program iterator (see `_Calls.next_item`)."""

    __slots__ = ("ref",)

    def __init__(self, ref: int):
        self.ref = ref

    def __iter__(self):
        return self

    def __next__(self):
        return _calls().next_item(self.ref)


# What a program's `from M import name` may bind in the test as the evaluator's own object: pure
# functions and classes of honest values, vetted one module at a time (None: every public function
# and class of it). Never anything that evaluates text (`eval`, `typing.get_type_hints`), reaches
# into objects (`getattr`, `operator.attrgetter`), imports, or makes always-equal objects
# (`unittest.mock`): the program names the object, and the test then calls it on its own data.
_EXTERNALS = {
    "math": None, "cmath": None, "statistics": None, "itertools": None, "heapq": None, "bisect": None,
    "textwrap": None, "unicodedata": None, "calendar": None,
    "builtins": frozenset({"abs", "all", "any", "ascii", "bin", "bool", "bytearray", "bytes", "callable", "chr",
                           "complex", "dict", "divmod", "enumerate", "filter", "float", "frozenset", "hash",
                           "hex", "int", "isinstance", "issubclass", "iter", "len", "list", "map", "max", "min",
                           "next", "oct", "ord", "pow", "range", "repr", "reversed", "round", "set", "slice",
                           "sorted", "str", "sum", "tuple", "zip"}),
    "operator": frozenset({"abs", "add", "and_", "concat", "contains", "countOf", "eq", "floordiv", "ge", "gt",
                           "index", "indexOf", "inv", "invert", "itemgetter", "le", "lshift", "lt", "mod", "mul",
                           "ne", "neg", "not_", "or_", "pos", "pow", "rshift", "sub", "truediv", "truth", "xor"}),
    "functools": frozenset({"reduce", "partial", "lru_cache", "cache", "cmp_to_key", "total_ordering", "wraps"}),
    "collections": frozenset({"Counter", "OrderedDict", "defaultdict", "deque", "ChainMap", "namedtuple"}),
    "fractions": frozenset({"Fraction"}), "decimal": frozenset({"Decimal"}),
    "datetime": frozenset({"date", "datetime", "time", "timedelta", "timezone"}),
    "string": frozenset({"capwords"}), "copy": frozenset({"copy", "deepcopy"}),
    "random": frozenset({"random", "randint", "randrange", "choice", "choices", "shuffle", "sample", "seed",
                         "uniform", "gauss"}),
    "json": frozenset({"dumps", "loads"}), "re": frozenset({"match", "fullmatch", "search", "findall", "sub",
                                                             "split", "escape", "compile", "finditer"}),
}


def _stdlib_module(name):
    """The evaluator's own copy of a standard-library module the program imported."""
    if type(name) is not str or not all(p.isidentifier() and not p.startswith("_") for p in name.split(".")) \
            or name.partition(".")[0] not in sys.stdlib_module_names or name.partition(".")[0] in _UNIMPORTABLE:
        return None
    try:
        __import__(name)
        return sys.modules[name]
    except BaseException:  # noqa: BLE001
        return None


def _stdlib_object(module, qualname):
    """`from math import isclose` in the program: the evaluator's own `math.isclose`, if vetted
    (C accelerators name their own module: `_functools.reduce` is `functools.reduce`)."""
    if type(module) is not str or type(qualname) is not str or not qualname.isidentifier() or qualname.startswith("_"):
        return None
    module = module[1:] if module.startswith("_") and module[1:] in _EXTERNALS else module
    if module not in _EXTERNALS or (_EXTERNALS[module] is not None and qualname not in _EXTERNALS[module]):
        return None
    obj = getattr(_stdlib_module(module), qualname, None)
    return obj if type(obj) in (types.FunctionType, types.BuiltinFunctionType) or isinstance(obj, type) else None


def _bind(catalog, channel: _Channel) -> dict:
    """{name: value} for the test from the candidate's catalog (untrusted: checked entry by entry)."""
    out = {}
    if type(catalog) is not list:
        channel.fail("program sent garbage: malformed catalog")
    for entry in catalog:
        if type(entry) is not tuple or len(entry) < 3 or type(entry[0]) is not str or not entry[0].isidentifier():
            channel.fail("program sent garbage: malformed catalog entry")
        name, kind = entry[0], entry[1]
        if name.startswith("__") and name.endswith("__"):
            continue  # `__builtins__`, `__import__`...: the test's namespace machinery stays ours
        if kind == "module" and len(entry) == 3:
            module = _stdlib_module(entry[2])
            if module is not None:
                out[name] = module
        elif kind == "external" and len(entry) == 5 and type(entry[4]) is ProgramObject:
            real = _stdlib_object(entry[2], entry[3])
            out[name] = real if real is not None else entry[4]
        elif kind == "object" and len(entry) == 3 and type(entry[2]) is ProgramObject:
            out[name] = entry[2]
        elif kind == "exception" and len(entry) == 4 and type(entry[2]) is str and name.isidentifier():
            out[name] = exception_class(name, entry[2])
        elif kind == "value" and len(entry) == 3:
            out[name] = entry[2]
        else:
            channel.fail("program sent garbage: malformed catalog entry")
    return out


def _names(tree) -> tuple:
    """(every name the test mentions — or None after `from solution import *` —, the names it
    only ever uses as `name.attribute` and never binds: the modules it expects the program to
    have imported, as MBPP-style tests call `math.isclose`). `tree` is the test's AST (the
    builtin `_ast`: importing `ast` would cost every evaluator milliseconds)."""
    import _ast
    bases, names, bound, mentioned, star, stack = set(), [], set(), set(), False, [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, _ast.Attribute):
            mentioned.add(node.attr)  # `solution.helper`
            if isinstance(node.value, _ast.Name) and isinstance(node.ctx, _ast.Load):
                bases.add(id(node.value))
        elif isinstance(node, _ast.Name):
            names.append(node)
        elif isinstance(node, (_ast.Import, _ast.ImportFrom)):
            bound.update((a.asname or a.name).partition(".")[0] for a in node.names)
            mentioned.update(a.name for a in node.names)
            star = star or (isinstance(node, _ast.ImportFrom) and any(a.name == "*" for a in node.names))
        for field in node._fields:
            child = getattr(node, field, None)
            if isinstance(child, list):
                stack.extend(c for c in child if isinstance(c, _ast.AST))
            elif isinstance(child, _ast.AST):
                stack.append(child)
    as_module = {n.id for n in names if id(n) in bases} - bound - {n.id for n in names if id(n) not in bases}
    return (None if star else sorted(mentioned | {n.id for n in names})), as_module


# Standard-library code that compiles text it builds itself from checked identifiers.
_COMPILERS = ("collections" + os.sep + "__init__.py", "dataclasses.py")
_STDLIB_DIR = os.path.dirname(os.__file__) + os.sep  # the sandbox sees no site-packages (-I -S)
_PICKLABLE = frozenset({("builtins", n) for n in ("set", "frozenset", "complex", "bytearray", "range", "slice",
                                                  "int", "float", "str", "list", "dict", "tuple", "bytes", "bool")}
                       | {("collections", n) for n in ("OrderedDict", "Counter", "deque", "defaultdict")}
                       | {("fractions", "Fraction"), ("decimal", "Decimal"), ("copyreg", "_reconstructor")}
                       | {("datetime", n) for n in ("date", "datetime", "time", "timedelta", "timezone")})


def _guard_evaluator(test_code: str) -> None:
    """Once the test runs, the evaluator compiles no text but the test's own: a test that
    `eval`s what the program returned (`eval(expression_for(5))`, `typing.get_type_hints` of a
    program function) would otherwise run the program's code here, beside the verdict. Only the
    import system and the standard library's code generators (namedtuple, dataclasses) may
    compile other text; everyone else may compile only text that is part of the test.
    Unpickling anything but plain types, marshal and building code objects are refused."""
    getframe, str_, bytes_, isinstance_ = sys._getframe, str, bytes, isinstance
    test_text, test_bytes = test_code, test_code.encode("utf-8", "surrogatepass")
    compilers = tuple(_STDLIB_DIR + c for c in _COMPILERS)
    picklable, busy = _PICKLABLE, [False]

    def hook(event, args):
        if busy[0] or event not in ("compile", "pickle.find_class", "marshal.loads", "code.__new__"):
            return
        busy[0] = True
        try:
            caller = getframe(1).f_code.co_filename  # 0: this hook; 1: whoever raised the event
            if caller.startswith("<frozen importlib"):
                return
            if event == "pickle.find_class":
                if (args[0], args[1]) in picklable:
                    return
            elif event == "compile":
                src = args[0]
                if caller in compilers or (isinstance_(src, str_) and src in test_text) \
                        or (isinstance_(src, bytes_) and src in test_bytes):
                    return
                raise PermissionError("sandbox: the test may not evaluate text that is not part of it "
                                      "(text the program produced runs in the program's process, not here)")
            raise PermissionError(f"sandbox: {event} is not allowed in the evaluator")
        finally:
            busy[0] = False

    sys.addaudithook(hook)


def evaluate(test_code: str, requests: int, replies: int, max_bytes: int, report) -> None:
    """Run one assertion test against the candidate; `report(status, kind, detail)` once."""
    channel = _Channel(requests, replies, max_bytes)
    _CALLS[:] = [_Calls(channel)]
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 5000))  # callbacks nest both sides' frames
    try:
        tree = compile(test_code, "<test>", "exec", 0x400, dont_inherit=True)  # ast.PyCF_ONLY_AST
        code = compile(tree, "<test>", "exec", dont_inherit=True)
    except SyntaxError as e:
        report("fail", "bad test", f"line {e.lineno}: {e.msg}")
        return
    wanted, as_modules = _names(tree)
    try:
        try:
            channel.send(("names", wanted), gone="exited before the tests ran")  # read once the program has run
        except ChannelBroken:  # it may have failed and gone already: its report is still to be read
            channel.broken = ""
        first = channel.receive(gone="exited before the tests ran")
        if first[0] == "load_error" and len(first) == 3 and type(first[1]) is str and type(first[2]) is str:
            report("fail", first[1][:100], first[2])
            return
        if first[0] != "ready" or len(first) != 2:
            channel.fail("program sent garbage: no catalog")
        names = _bind(first[1], channel)
    except ChannelBroken:
        report("fail", channel.broken, "")
        return
    solution = types.ModuleType("solution")
    solution.__dict__.update(names)
    # `from solution import *` brings what a plain `import` would, minus the builtins it shadows
    solution.__all__ = [k for k in names if not k.startswith("_") and k not in _BUILTIN_NAMES]
    sys.modules["solution"] = solution
    ns = {k: v for k, v in names.items() if k not in _BUILTIN_NAMES}
    # A name the test uses only as a module and that names a standard-library module gets that
    # module, whatever the program bound to it (a `class math` with a lying isclose).
    for name in as_modules & set(ns):
        module = _stdlib_module(name)
        if module is not None:
            ns[name] = module
    ns.update({"__name__": "__main__", "__builtins__": builtins})
    _guard_evaluator(test_code)
    try:
        exec(code, ns)
        error = None
    except ChannelBroken:  # raised by the channel, which then says why; raised by anything else: forged
        error = None if channel.broken else ("verdict tampered", "ChannelBroken raised outside the channel")
    except Refused:
        error = None  # channel.failed says why
    except AssertionError as e:
        error = ("assertion failed", _safe_str(e))
    except BaseException as e:  # noqa: BLE001 - the test's own error, or the program's exception
        error = classify(e)
    if channel.broken:
        report("fail", channel.broken, "")
    elif error:
        report("fail", *error)
    elif channel.failed:
        report("fail", *channel.failed)
    else:
        report("pass")
    try:
        channel.send(("exit",))
    except BaseException:  # noqa: BLE001
        pass


def _safe_str(e, n: int = 200) -> str:
    try:
        return str(e)[:n]
    except BaseException:  # noqa: BLE001
        return ""
