"""Assertion tests across two processes (child side of the sandbox; standard library only).

The verdict of an assertion test must not live where the program runs: a program can lie with
its objects (`__eq__`, `__lt__`, `__contains__`, proxies), patch modules and builtins, fork
children, and read or write every descriptor and byte of its own process. So each assertion test
runs in two processes (`sandbox_runner` forks both):

    candidate  (the program's uid)  runs the program as module `solution`, then serves calls
    evaluator  (another uid)        runs the test code; every name the program defined is a
                                    proxy whose calls cross to the candidate and back

Only **plain data** crosses, in both directions: `None`, `bool`, `int`, `float`, `complex`, `str`,
`bytes`, `bytearray`, `list`, `tuple`, `dict`, `set`, `frozenset`, `range`, `collections.deque`,
`fractions.Fraction`, `decimal.Decimal` — a tag byte and a payload each, rebuilt on the other side
as those exact built-in types, so a subclass or a lying object arrives as the honest value it claims
to hold, or not at all. Anything else the program returns (an instance of its own class, a
generator) stays in the candidate and arrives as a `ProgramObject` handle: its attributes, items,
calls, length, truthiness, text and iteration cross as plain data; comparing it (`==`, `<`, ...)
is refused, so its class's equality is never consulted, and `in` iterates it. Every comparison
of the test (`==`, `<`, `in`, `abs(a - b) < eps`, `math.isclose`, loops of cases) therefore
runs in the evaluator over trusted values, with the evaluator's own, unpatched modules and
builtins. Names of the program that shadow a builtin (`abs`, `len`, `sorted`) do not shadow it in
the test (the test can still ask for them: `from solution import abs`); modules the program
imported are the evaluator's own copies. The verdict goes from the evaluator to the supervisor on
a pipe the candidate never holds, and the test code (with its expected values) never enters the
candidate's memory.

Why a codec of our own: `pickle` runs code and `marshal` builds code objects and is documented
unsafe on hostile input; `json` has no tuples, sets, bytes or non-string keys and its import
(with `re`) costs ~11 ms of CPU per sandboxed program. The codec is ~150 lines: bounds-checked
lengths, a nesting limit, exact types out, nothing rebuilt but these values.
"""
import builtins
import os
import struct
import sys
import types

MAX_DEPTH = 120                     # nesting of values, both ways
_MAX_INT_BYTES = 1 << 20            # 2.5 million decimal digits
_BUILTIN_NAMES = frozenset(vars(builtins))
# never imported for a program: side effects, or objects made to compare equal to anything
_UNIMPORTABLE = frozenset({"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "webbrowser",
                           "unittest", "doctest", "ctypes", "pdb"})
_F64 = struct.Struct(">d")


# ---------------------------------------------------------------------------------------------
# Plain data: a tag byte, then the payload (4-byte big-endian lengths and counts)
# ---------------------------------------------------------------------------------------------

class NotPlain(TypeError):
    """A value that cannot cross between the processes."""


class Ref:
    """What `encode`'s fallback returns for an object that stays where it is: a handle number."""
    __slots__ = ("n",)

    def __init__(self, n: int):
        self.n = n


class Callback(Ref):
    """A function of the test passed to the program (a `key=`, a callback, a decorated function):
    it stays in the evaluator, and the program's calls to it cross back as plain data."""
    __slots__ = ()


_SEQ_TAGS = {list: b"l", tuple: b"t", set: b"S", frozenset: b"z"}
_SEQ_TYPES = {ord("l"): list, ord("t"): tuple, ord("S"): set, ord("z"): frozenset}


def encode(v, other) -> bytes:
    """`v` as bytes. Exact built-in types only; `other(v)` decides about anything else: a `Ref`
    (the candidate keeps the object and sends a handle), a plain value to send instead, or an
    exception (the evaluator sends nothing but plain data)."""
    out = bytearray()
    _put(out, v, other, 0)
    return bytes(out)


def _put(out: bytearray, v, other, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise NotPlain("value nested too deeply")
    t = type(v)
    if v is None:
        out += b"N"
    elif t is bool:
        out += b"T" if v else b"F"
    elif t is int:
        _blob(out, b"i", v.to_bytes((v.bit_length() + 8) // 8, "big", signed=True))
    elif t is float:
        out += b"f" + _F64.pack(v)
    elif t is str:
        _blob(out, b"s", v.encode("utf-8", "surrogatepass"))
    elif t is bytes or t is bytearray:
        _blob(out, b"b" if t is bytes else b"B", v)
    elif t is complex:
        out += b"c" + _F64.pack(v.real) + _F64.pack(v.imag)
    elif t in _SEQ_TAGS:
        out += _SEQ_TAGS[t] + len(v).to_bytes(4, "big")
        for x in v:
            _put(out, x, other, depth + 1)
    elif t is dict:
        out += b"d" + len(v).to_bytes(4, "big")
        for k, x in v.items():
            _put(out, k, other, depth + 1)
            _put(out, x, other, depth + 1)
    elif t is Ref or t is Callback:
        out += (b"R" if t is Ref else b"C") + v.n.to_bytes(4, "big")
    elif t is range:
        out += b"r"
        for x in (v.start, v.stop, v.step):
            _put(out, x, other, depth + 1)
    elif isinstance(v, tuple) and type(getattr(t, "_fields", None)) is tuple and len(t._fields) == len(v):
        # a namedtuple: its fields' names travel, and the evaluator makes a namedtuple of its own
        out += b"n"
        _put(out, t.__name__, other, depth + 1)
        _put(out, tuple(str(f) for f in t._fields), other, depth + 1)
        _put(out, tuple(tuple.__iter__(v)), other, depth + 1)
    elif (t.__module__, t.__qualname__) in _DICT_KINDS and t is _loaded(*_DICT_KINDS[(t.__module__, t.__qualname__)]):
        out += _DICT_TAGS[t.__qualname__]
        _put(out, list(dict.items(v)), other, depth + 1)
    elif (t.__module__, t.__qualname__) == ("collections", "deque") and t is _loaded("collections", "deque"):
        out += b"q"
        _put(out, v.maxlen, other, depth + 1)
        _put(out, list(v), other, depth + 1)
    elif (t.__module__, t.__qualname__) == ("fractions", "Fraction") and t is _loaded("fractions", "Fraction"):
        out += b"Q"
        _put(out, v.numerator, other, depth + 1)
        _put(out, v.denominator, other, depth + 1)
    elif (t.__module__, t.__qualname__) == ("decimal", "Decimal") and t is _loaded("decimal", "Decimal"):
        out += b"D"
        _put(out, str(v), other, depth + 1)
    else:
        alt = other(v)
        if type(alt) is Ref or type(alt) is Callback:
            _put(out, alt, other, depth)
        else:
            _put(out, alt, other, depth + 1)


_DICT_KINDS = {("collections", "Counter"): ("collections", "Counter"),
               ("collections", "OrderedDict"): ("collections", "OrderedDict")}
_DICT_TAGS = {"Counter": b"K", "OrderedDict": b"O"}


def _loaded(module: str, name: str):
    """The class `module.name` if that module is loaded (a program that never imported
    `fractions` has no Fraction to send, and the candidate should not import it for nothing)."""
    return getattr(sys.modules.get(module), name, None)


def _blob(out: bytearray, tag: bytes, data) -> None:
    out += tag + len(data).to_bytes(4, "big")
    out += data


def decode(data: bytes, handle, callback=None):
    """Bytes (untrusted) back into exact built-in values; `handle(n)` / `callback(n)` make the
    value for a handle / a callback (refused where None). Raises ValueError / TypeError /
    ArithmeticError on anything malformed."""
    r = _Reader(data, handle, callback)
    v = r.value(0)
    if r.pos != len(data):
        raise ValueError("trailing bytes after the value")
    return v


class _Reader:
    __slots__ = ("data", "pos", "handle", "callback")

    def __init__(self, data: bytes, handle, callback):
        self.data, self.pos, self.handle, self.callback = data, 0, handle, callback

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise ValueError("truncated value")
        chunk, self.pos = self.data[self.pos:end], end
        return chunk

    def count(self) -> int:
        """A length or a count: never more than the bytes left (every item takes at least one)."""
        n = int.from_bytes(self.take(4), "big")
        if n > len(self.data) - self.pos:
            raise ValueError("length beyond the end of the message")
        return n

    def typed(self, depth: int, *types):
        v = self.value(depth + 1)
        if type(v) not in types:
            raise ValueError(f"expected {'/'.join(t.__name__ for t in types)}, got {type(v).__name__}")
        return v

    def value(self, depth: int):
        if depth > MAX_DEPTH:
            raise ValueError("value nested too deeply")
        tag = self.take(1)[0]
        if tag == 78:  # N
            return None
        if tag == 84 or tag == 70:  # T F
            return tag == 84
        if tag == 105:  # i
            n = self.count()
            if n > _MAX_INT_BYTES:
                raise ValueError("integer too large")
            return int.from_bytes(self.take(n), "big", signed=True)
        if tag == 102:  # f
            return _F64.unpack(self.take(8))[0]
        if tag == 115:  # s
            return self.take(self.count()).decode("utf-8", "surrogatepass")
        if tag == 98 or tag == 66:  # b B
            raw = self.take(self.count())
            return raw if tag == 98 else bytearray(raw)
        if tag == 99:  # c
            return complex(_F64.unpack(self.take(8))[0], _F64.unpack(self.take(8))[0])
        if tag in _SEQ_TYPES:
            n = self.count()
            return _SEQ_TYPES[tag]([self.value(depth + 1) for _ in range(n)])
        if tag == 100:  # d
            n = self.count()
            out = {}
            for _ in range(n):
                k = self.value(depth + 1)
                out[k] = self.value(depth + 1)
            return out
        if tag == 114:  # r
            return range(self.typed(depth, int), self.typed(depth, int), self.typed(depth, int))
        if tag == 113:  # q
            import collections
            maxlen = self.typed(depth, int, type(None))
            return collections.deque(self.typed(depth, list), maxlen)
        if tag == 110:  # n
            name, fields, values = self.typed(depth, str), self.typed(depth, tuple), self.typed(depth, tuple)
            if len(fields) != len(values) or not all(type(f) is str for f in fields):
                raise ValueError("malformed namedtuple")
            return _namedtuple(name, fields)._make(values)
        if tag == 75 or tag == 79:  # K O
            import collections
            pairs = self.typed(depth, list)
            if not all(type(p) is tuple and len(p) == 2 for p in pairs):
                raise ValueError("malformed mapping")
            return collections.Counter(dict(pairs)) if tag == 75 else collections.OrderedDict(pairs)
        if tag == 81:  # Q
            import fractions
            return fractions.Fraction(self.typed(depth, int), self.typed(depth, int))
        if tag == 68:  # D
            import decimal
            return decimal.Decimal(self.typed(depth, str))
        if tag == 82:  # R
            return self.handle(int.from_bytes(self.take(4), "big"))
        if tag == 67 and self.callback is not None:  # C
            return self.callback(int.from_bytes(self.take(4), "big"))
        raise ValueError(f"unknown tag {tag}")


def _namedtuple(name: str, fields: tuple):
    """The evaluator's own namedtuple class for these names (namedtuple checks they are
    identifiers), one per (name, fields)."""
    key = (name, fields)
    if key not in _NAMEDTUPLES:
        import collections
        if len(_NAMEDTUPLES) > 256 or len(fields) > 256:
            raise ValueError("too many namedtuple shapes")
        _NAMEDTUPLES[key] = collections.namedtuple(name, fields)
    return _NAMEDTUPLES[key]


_NAMEDTUPLES: dict = {}


def as_builtin(v):
    """The plain value a subclass of a built-in type holds (a namedtuple's tuple, a Counter's
    dict, an IntEnum's int), read through the built-in type's own methods; None if it holds
    none. Candidate side: for honest programs only; a lying program can send anything anyway."""
    for base, read in ((int, int.__int__), (float, float.__float__), (str, str.__str__),
                       (tuple, lambda x: tuple(tuple.__iter__(x))), (list, lambda x: list(list.__iter__(x))),
                       (dict, lambda x: dict(dict.items(x))), (frozenset, lambda x: frozenset(frozenset.__iter__(x))),
                       (set, lambda x: set(set.__iter__(x))), (bytes, bytes.__bytes__),
                       (bytearray, lambda x: bytearray(memoryview(x))), (complex, complex.__complex__)):
        if isinstance(v, base) and type(v) is not bool:
            return read(v)
    return None


# ---------------------------------------------------------------------------------------------
# Frames: 4-byte length + an encoded value
# ---------------------------------------------------------------------------------------------

def send(fd: int, obj, other, _write=os.write) -> None:
    data = encode(obj, other)
    view = memoryview(len(data).to_bytes(4, "big") + data)
    while view:
        view = view[_write(fd, view):]


def recv(fd: int, max_bytes: int, handle, callback=None, _read=os.read):
    """One frame, decoded; EOFError when the other side is gone, ValueError on an oversized one."""
    n = int.from_bytes(_read_exactly(fd, 4, _read), "big")
    if n > max_bytes:
        raise ValueError(f"message of {n} bytes exceeds {max_bytes}")
    return decode(_read_exactly(fd, n, _read), handle, callback)


def _read_exactly(fd: int, n: int, _read) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = _read(fd, min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("closed")
        buf += chunk
    return bytes(buf)


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


# ---------------------------------------------------------------------------------------------
# Candidate side: run the program, then serve the evaluator's calls
# ---------------------------------------------------------------------------------------------

def serve(program: str, requests: int, replies: int, max_bytes: int, before_run=None) -> None:
    """Run `program` as module `solution`, send its names, then answer requests until told to
    stop; `before_run()` is called just before the program starts. Never returns. Everything
    used after the program starts is bound here first, so a program that patches modules can at
    worst break its own answers."""
    _exit, _send, _recv, _classify, _as_builtin = os._exit, send, recv, classify, as_builtin
    _Base, _SystemExit, _StopIteration, _type, _str, _getattr = BaseException, SystemExit, StopIteration, type, str, getattr
    _setattr, _delattr, _iter, _next, _len, _bool, _repr, _Ref = setattr, delattr, iter, next, len, bool, repr, Ref
    _flush = [sys.stdout.flush, sys.stderr.flush]
    handles: list = []

    def to_handle(v):
        plain = _as_builtin(v)
        if plain is not None:
            return plain
        handles.append(v)
        return _Ref(len(handles) - 1)

    def reply(msg) -> None:
        _send(replies, msg, to_handle)

    def finish(code: int):
        for f in _flush:
            try:
                f()
            except _Base:  # noqa: BLE001
                pass
        _exit(code)

    try:
        code = compile(program, "<solution>", "exec", dont_inherit=True, optimize=0)
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
    reply(("ready", _catalog(module.__dict__, to_handle, max_bytes)))

    def base_exception_name(e) -> str:
        for k in _type(e).__mro__:
            if _getattr(builtins, _getattr(k, "__name__", ""), None) is k:
                return k.__name__
        return "Exception"

    def describe(e) -> tuple:
        try:
            text = _str(e)[:1000]
        except _Base:  # noqa: BLE001
            text = "?"
        return "err", _type(e).__name__[:100], base_exception_name(e), text

    def receive():
        try:
            return _recv(requests, 1 << 30, handles.__getitem__, TestFunction)
        except _Base:  # noqa: BLE001 - the evaluator is gone
            finish(0)

    def answer(msg) -> None:
        """Serve one request of the evaluator."""
        op = msg[0]
        try:
            if op == "exit":
                finish(0)
            obj = handles[msg[1]]
            if op == "call":
                args, kwargs = msg[2], msg[3]
                out = ("ok", obj(*args, **kwargs), [args[i] for i in msg[4]], [kwargs[k] for k in msg[5]])
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
                out = ("ok", _Ref(len(handles)))
                handles.append(_iter(obj))
            elif op == "next":
                items, done = [], False
                for _ in range(msg[2]):
                    try:
                        items.append(_next(obj))
                    except _StopIteration:
                        done = True
                        break
                out = ("ok", (items, done))
            elif op in ("len", "bool", "str", "repr"):
                out = ("ok", {"len": _len, "bool": _bool, "str": _str, "repr": _repr}[op](obj))
            else:
                out = ("err", "TypeError", "TypeError", f"unknown request {op!r}")
        except _SystemExit:
            out = ("exit",)
        except _Base as e:  # noqa: BLE001 - the program's exception, described as plain data
            out = describe(e)
        try:
            reply(out)
        except _Base:  # noqa: BLE001 - e.g. a result nested too deeply to send
            reply(("err", "TypeError", "TypeError", "the program's result cannot be sent as plain data"))

    class TestFunction:
        """A function of the test: calling it asks the evaluator, serving any calls it makes
        back into the program meanwhile."""
        __slots__ = ("n",)

        def __init__(self, n):
            self.n = n

        def __call__(self, *args, **kwargs):
            reply(("callback", self.n, list(args), dict(kwargs)))
            while True:
                msg = receive()
                if msg[0] == "returned":
                    return msg[1]
                if msg[0] == "raised":
                    raise _program_exception(("err", *msg[1:]))
                answer(msg)

    while True:
        answer(receive())


def _catalog(ns: dict, to_handle, max_bytes: int) -> list:
    """(name, kind, ...) for every name the program defined: "module" (the module's name),
    "external" (a function or class of another module: module, qualname and a handle), "value"
    (plain data) or "object" (a handle)."""
    out, budget = [], max_bytes // 2
    for name, v in list(ns.items()):
        if name.startswith("__") and name.endswith("__"):
            continue
        if type(v) is types.ModuleType:
            out.append((name, "module", str(getattr(v, "__name__", ""))))
            continue
        if callable(v):
            mod, qual = getattr(v, "__module__", None), getattr(v, "__qualname__", None)
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


_CALLBACKS: list = []      # the test's functions the program was given, by number
_CALLBACK_IDS: dict = {}


def _plain_only(v):
    """The evaluator's fallback: its handles go back as handles, its functions as callbacks,
    anything else is refused."""
    if type(v) is ProgramObject:
        return Ref(object.__getattribute__(v, "_ref"))
    if callable(v):
        n = _CALLBACK_IDS.get(id(v))
        if n is None or _CALLBACKS[n] is not v:
            n = _CALLBACK_IDS[id(v)] = len(_CALLBACKS)
            _CALLBACKS.append(v)
        return Callback(n)
    raise NotPlain(f"cannot pass {type(v).__name__} to the program: only plain data and functions cross")


class _Channel:
    def __init__(self, requests: int, replies: int, max_bytes: int):
        self.requests, self.replies, self.max_bytes = requests, replies, max_bytes
        self.broken = ""
        self.callback_failed = ""  # an assertion of the test failed inside a callback

    def fail(self, why: str):
        self.broken = self.broken or why
        raise ChannelBroken(why)

    def receive(self, gone: str = "program died during the test"):
        try:
            msg = recv(self.replies, self.max_bytes, ProgramObject)
        except EOFError:
            self.fail(gone)
        except (ValueError, TypeError, OverflowError, ArithmeticError, MemoryError) as e:
            self.fail(f"program sent garbage: {str(e)[:100]}")
        if type(msg) is not tuple or not msg or type(msg[0]) is not str:
            self.fail("program sent garbage: not a message")
        return msg

    def send(self, msg: tuple) -> None:
        data = encode(msg, _plain_only)  # NotPlain goes to the test: its argument, its error
        try:
            os.write(self.requests, len(data).to_bytes(4, "big"))
            view = memoryview(data)
            while view:
                view = view[os.write(self.requests, view):]
        except OSError:
            self.fail("program died during the test")

    def request(self, msg: tuple) -> tuple:
        if self.broken:
            raise ChannelBroken(self.broken)
        self.send(msg)
        reply = self.receive()
        while reply[0] == "callback":
            self.run_callback(reply)
            reply = self.receive()
        if reply[0] == "exit":
            self.fail("program exited during the test")
        if reply[0] == "err":
            raise _program_exception(reply)
        if reply[0] != "ok" or len(reply) < 2:
            self.fail("program sent garbage: not a reply")
        return reply

    def run_callback(self, msg: tuple) -> None:
        """The program calls one of the test's functions: run it here on the plain arguments, send
        what it returned (or raised). A failed assertion fails the test even if the program catches
        the error it gets."""
        if len(msg) != 4 or type(msg[1]) is not int or not 0 <= msg[1] < len(_CALLBACKS) \
                or type(msg[2]) is not list or type(msg[3]) is not dict or not all(type(k) is str for k in msg[3]):
            self.fail("program sent garbage: malformed callback")
        try:
            result = _CALLBACKS[msg[1]](*msg[2], **msg[3])
            try:
                self.send(("returned", result))
                return
            except NotPlain as e:
                out = ("TypeError", "TypeError", str(e))
        except ChannelBroken:
            raise
        except BaseException as e:  # noqa: BLE001 - the test function's exception goes to the program
            if isinstance(e, AssertionError):
                self.callback_failed = self.callback_failed or _safe_str(e) or "in a function the test passed"
            base = next((k.__name__ for k in type(e).__mro__ if getattr(builtins, k.__name__, None) is k), "Exception")
            out = (type(e).__name__, base, _safe_str(e))
        self.send(("raised", *out))


def _program_exception(reply: tuple) -> Exception:
    """The program's exception rebuilt as a trusted one: its built-in base class (so `except
    ValueError` works), under the program's class name, with its message."""
    if len(reply) != 4 or not all(type(x) is str for x in reply[1:]):
        return RuntimeError("the program raised an exception that could not be described")
    name, base, text = reply[1][:100], reply[2], reply[3][:1000]
    cls = getattr(builtins, base, None)
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        cls = Exception
    if issubclass(cls, (StopIteration, StopAsyncIteration)):
        # raised by a called function it would silently end the test's map() or generator early
        # (PEP 479 makes the same change inside generators)
        return RuntimeError(f"{name} raised by the program: {text}")
    if name != cls.__name__ and name.isidentifier():
        cls = type(name, (cls,), {"__module__": "solution"})
    try:
        return cls(text)
    except BaseException:  # noqa: BLE001 - e.g. UnicodeDecodeError needs five arguments
        return RuntimeError(f"{name}: {text}")


_MUTABLE = (list, dict, set, bytearray)


def _refill(target, value) -> None:
    """A mutable argument after the call: the program's in-place changes, copied back."""
    if type(value) is not type(target):
        return
    if type(target) in (list, bytearray):
        target[:] = value
    else:
        target.clear()
        target.update(value)


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
        back = [i for i, a in enumerate(args) if type(a) in _MUTABLE]
        kback = [k for k, a in kwargs.items() if type(a) in _MUTABLE]
        reply = self.channel.request(("call", ref, list(args), dict(kwargs), back, kback))
        if len(reply) != 4 or type(reply[2]) is not list or type(reply[3]) is not list \
                or len(reply[2]) != len(back) or len(reply[3]) != len(kback):
            self.channel.fail("program sent garbage: malformed call reply")
        for i, new in zip(back, reply[2]):
            _refill(args[i], new)
        for k, new in zip(kback, reply[3]):
            _refill(kwargs[k], new)
        return reply[1]

    def batch(self, ref: int, n: int) -> tuple:
        got = self.op("next", ref, n)
        if type(got) is not tuple or len(got) != 2 or type(got[0]) is not list or type(got[1]) is not bool:
            self.channel.fail("program sent garbage: malformed iteration reply")
        return got


_CALLS: list = []  # the evaluator's one _Calls


def _calls() -> _Calls:
    return _CALLS[0]


def _typed(value, kind, what: str):
    if type(value) is not kind:
        raise TypeError(f"the program's {what} returned {type(value).__name__}, not {kind.__name__}")
    return value


class RefusedComparison(TypeError):
    """`==`, `<`, ... with an object of the program's own class."""


class ProgramObject:
    """A function, class, instance, generator ... that lives in the program's process. Calls,
    attributes, items, len, bool, str, repr and iteration cross as plain data. Comparisons are
    refused: an object's equality is its class's to define, and that class is the program's."""

    __slots__ = ("_ref",)

    def __init__(self, ref: int):
        object.__setattr__(self, "_ref", ref)

    def _op(self, op: str, *args):
        return _calls().op(op, object.__getattribute__(self, "_ref"), *args)

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
        return _Iterator(self._op("iter"))

    def __next__(self):
        items, done = _calls().batch(object.__getattribute__(self, "_ref"), 1)
        if not items:
            raise StopIteration
        return items[0]

    def __contains__(self, item):
        # not the program's __contains__: the items it yields, compared here
        return any(item is x or item == x for x in self)

    def _refuse(self, other):
        raise RefusedComparison("tests cannot compare an object of the program's own class (its equality and "
                                "ordering are the program's to define); compare plain values, e.g. its attributes")

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _refuse
    __hash__ = object.__hash__


class _Iterator:
    """Iteration over a program object, fetched in batches (one round trip per 256 items)."""

    __slots__ = ("source", "buffer", "done")
    BATCH = 256

    def __init__(self, source):
        self.source, self.buffer, self.done = source, [], False

    def __iter__(self):
        return self

    def __next__(self):
        if not self.buffer:
            if self.done or type(self.source) is not ProgramObject:
                raise StopIteration
            items, self.done = _calls().batch(object.__getattribute__(self.source, "_ref"), self.BATCH)
            self.buffer = items[::-1]
            if not self.buffer:
                raise StopIteration
        return self.buffer.pop()


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
        elif kind == "value" and len(entry) == 3:
            out[name] = entry[2]
        else:
            channel.fail("program sent garbage: malformed catalog entry")
    return out


def _stdlib_module(name):
    """The evaluator's own copy of a standard-library module the program imported."""
    if type(name) is not str or name.partition(".")[0] not in sys.stdlib_module_names \
            or name.partition(".")[0] in _UNIMPORTABLE or not all(p.isidentifier() for p in name.split(".")):
        return None
    try:
        __import__(name)
        return sys.modules[name]
    except BaseException:  # noqa: BLE001
        return None


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


def _stdlib_object(module, qualname):
    """`from math import isclose` in the program: the evaluator's own `math.isclose`, if vetted."""
    if type(module) is not str or module not in _EXTERNALS or type(qualname) is not str \
            or not qualname.isidentifier() or qualname.startswith("_"):
        return None
    names = _EXTERNALS[module]
    if names is not None and qualname not in names:
        return None
    obj = getattr(_stdlib_module(module), qualname, None)
    return obj if type(obj) in (types.FunctionType, types.BuiltinFunctionType) or isinstance(obj, type) else None


def _module_uses(tree) -> set:
    """Names the test only ever uses as `name.attribute` and never binds itself: the modules it
    expects the program to have imported (MBPP-style tests call `math.isclose` without an
    import). `tree` is the test's AST (the builtin `_ast`: the `ast` module's import would cost
    every evaluator milliseconds)."""
    import _ast
    bases, names, bound, stack = set(), [], set(), [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, _ast.Attribute) and isinstance(node.value, _ast.Name) and isinstance(node.ctx, _ast.Load):
            bases.add(id(node.value))
        elif isinstance(node, _ast.Name):
            names.append(node)
        elif isinstance(node, (_ast.Import, _ast.ImportFrom)):
            bound.update((a.asname or a.name).partition(".")[0] for a in node.names)
        for field in node._fields:
            child = getattr(node, field, None)
            if isinstance(child, list):
                stack.extend(c for c in child if isinstance(c, _ast.AST))
            elif isinstance(child, _ast.AST):
                stack.append(child)
    as_module = {n.id for n in names if id(n) in bases}
    return as_module - bound - {n.id for n in names if id(n) not in bases}


_STDLIB_DIR = os.path.dirname(os.__file__) + os.sep  # the sandbox sees no site-packages (-I -S)


def _guard_evaluator(test_code: str) -> None:
    """Once the test runs, the evaluator compiles no text but the test's own: a test that
    `eval`s what the program returned (`eval(expression_for(5))`) would otherwise run the
    program's code here, beside the verdict. Standard-library callers (namedtuple, dataclasses
    build their methods from text they generate) may; the test's frames may compile only text
    that is part of the test. Unpickling (anything but plain types and the test's own classes),
    marshal and building code objects are refused at the test's level for the same reason."""
    import sys as _sys
    getframe, str_, bytes_, isinstance_, startswith = _sys._getframe, str, bytes, isinstance, str.startswith
    stdlib, test_text, test_bytes = _STDLIB_DIR, test_code, test_code.encode("utf-8", "surrogatepass")
    picklable = _PICKLABLE
    busy = [False]

    def from_test_level() -> bool:
        name = getframe(2).f_code.co_filename  # 0: this, 1: the hook, 2: whoever raised the event
        return not (startswith(name, "<frozen") or startswith(name, stdlib))

    def hook(event, args):
        if busy[0] or event not in ("compile", "pickle.find_class", "marshal.loads", "code.__new__"):
            return
        busy[0] = True
        try:
            if event == "pickle.find_class" and ((args[0], args[1]) in picklable or args[0] == "__main__"):
                return
            if not from_test_level():
                return
            if event == "compile":
                src = args[0]
                if (isinstance_(src, str_) and src in test_text) or (isinstance_(src, bytes_) and src in test_bytes):
                    return
                raise PermissionError("sandbox: the test may not evaluate text that is not part of it "
                                      "(text the program produced runs in the program's process, not here)")
            raise PermissionError(f"sandbox: {event} is not allowed in the evaluator")
        finally:
            busy[0] = False

    _sys.addaudithook(hook)


_PICKLABLE = frozenset({("builtins", n) for n in ("set", "frozenset", "complex", "bytearray", "range", "slice",
                                                  "int", "float", "str", "list", "dict", "tuple", "bytes", "bool")}
                       | {("collections", n) for n in ("OrderedDict", "Counter", "deque", "defaultdict")}
                       | {("fractions", "Fraction"), ("decimal", "Decimal"), ("copyreg", "_reconstructor")}
                       | {("datetime", n) for n in ("date", "datetime", "time", "timedelta", "timezone")})


def evaluate(test_code: str, requests: int, replies: int, max_bytes: int, report) -> None:
    """Run one assertion test against the candidate; `report(status, kind, detail)` once."""
    channel = _Channel(requests, replies, max_bytes)
    _CALLS[:] = [_Calls(channel)]
    try:
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
    try:
        tree = compile(test_code, "<test>", "exec", 0x400, dont_inherit=True)  # ast.PyCF_ONLY_AST
        code = compile(tree, "<test>", "exec", dont_inherit=True)
    except SyntaxError as e:
        report("fail", "bad test", f"line {e.lineno}: {e.msg}")
        return
    solution = types.ModuleType("solution")
    solution.__dict__.update(names)
    # `from solution import *` brings what a plain `import` would, minus the builtins it shadows
    solution.__all__ = [k for k in names if not k.startswith("_") and k not in _BUILTIN_NAMES]
    sys.modules["solution"] = solution
    ns = {k: v for k, v in names.items() if k not in _BUILTIN_NAMES}
    # A name the test uses only as a module and that names a standard-library module gets that
    # module, whatever the program bound to it (a `class math` with a lying isclose, `import
    # cmath as math`).
    for name in _module_uses(tree) & set(ns):
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
    except AssertionError as e:
        error = ("assertion failed", _safe_str(e))
    except RefusedComparison as e:
        error = ("compared an object of the program's own class", _safe_str(e))
    except BaseException as e:  # noqa: BLE001 - the test's own error, or the program's exception
        error = classify(e)
    if channel.broken:
        report("fail", channel.broken, "")
    elif error:
        report("fail", *error)
    elif channel.callback_failed:
        report("fail", "assertion failed", channel.callback_failed)
    else:
        report("pass")
    try:
        send(requests, ("exit",), _plain_only)
    except OSError:
        pass


def _safe_str(e) -> str:
    try:
        return str(e)[:200]
    except BaseException:  # noqa: BLE001
        return ""
