"""Plain data between the sandbox's processes (standard library only; see `sandbox_calls`).

A value is a tag byte and a payload (4-byte big-endian lengths and counts). Exact built-in types
only, rebuilt as those exact types on the other side: `None`, `bool`, `int`, `float`, `complex`,
`str`, `bytes`, `bytearray`, `list`, `tuple`, `dict`, `set`, `frozenset`, `range`, `slice`, dict
views, and these honest value types of the standard library: `collections.deque`, `Counter`,
`OrderedDict`, `defaultdict` (of a built-in factory), namedtuples (rebuilt as namedtuples of the
receiver's own), `fractions.Fraction`, `decimal.Decimal`, `datetime.date` / `time` / `datetime`
(naive or at a fixed offset) / `timedelta` / `timezone`. Anything else is the sender's
`other(v)` to decide: a `Ref` (a handle to an object that stays where it is), a plain value to
send instead, or an exception.

Why a codec of our own: `pickle` runs code and `marshal` builds code objects and is documented
unsafe on hostile input; `json` has no tuples, sets, bytes or non-string keys and its import
(with `re`) costs ~11 ms of CPU per sandboxed program. Decoding checks every length against the
bytes left, bounds nesting and integer size, and rebuilds nothing but the values above.
"""
import builtins
import os
import struct
import sys

MAX_DEPTH = 400                     # nesting of values, both ways
_MAX_INT_BYTES = 1 << 20            # 2.5 million decimal digits
_F64 = struct.Struct(">d")
_FACTORIES = ("int", "float", "str", "list", "dict", "set", "frozenset", "tuple", "bytes")  # defaultdict's


class NotPlain(TypeError):
    """A value that cannot cross between the processes."""


class Ref:
    """A handle number: the object stays in the candidate (tag R)."""
    __slots__ = ("n",)

    def __init__(self, n: int):
        self.n = n


class TestRef(Ref):
    """A handle number: the object stays in the evaluator (tag C) — a function of the test passed
    to the program, an instance of the test's own class, its generator ..."""
    __slots__ = ()


_SEQ_TAGS = {list: b"l", tuple: b"t", set: b"S", frozenset: b"z"}
_SEQ_TYPES = {ord("l"): list, ord("t"): tuple, ord("S"): set, ord("z"): frozenset}
_VIEWS = {type({}.keys()): b"k", type({}.values()): b"v", type({}.items()): b"I"}


def encode(v, other) -> bytes:
    out = bytearray()
    _put(out, v, other, 0)
    return bytes(out)


def _loaded(module: str, name: str):
    """The class `module.name` if that module is loaded (a program that never imported
    `fractions` has no Fraction to send, and nothing here imports it for nothing)."""
    return getattr(sys.modules.get(module), name, None)


def _blob(out: bytearray, tag: bytes, data) -> None:
    out += tag + len(data).to_bytes(4, "big")
    out += data


def _many(out: bytearray, tag: bytes, items, other, depth: int) -> None:
    items = list(items)
    out += tag + len(items).to_bytes(4, "big")
    for x in items:
        _put(out, x, other, depth + 1)


def _put(out: bytearray, v, other, depth: int) -> None:  # noqa: C901 - one branch per type
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
        _many(out, _SEQ_TAGS[t], v, other, depth)
    elif t is dict:
        out += b"d" + len(v).to_bytes(4, "big")
        for k, x in v.items():
            _put(out, k, other, depth + 1)
            _put(out, x, other, depth + 1)
    elif t is Ref or t is TestRef:
        out += (b"R" if t is Ref else b"C") + v.n.to_bytes(4, "big")
    elif t is range or t is slice:
        out += b"r" if t is range else b"L"
        for x in (v.start, v.stop, v.step):
            _put(out, x, other, depth + 1)
    elif t in _VIEWS:
        out += _VIEWS[t]
        _put(out, list(v), other, depth + 1)
    else:
        _put_library(out, v, t, other, depth)


def _put_library(out: bytearray, v, t, other, depth: int) -> None:
    name = (t.__module__, t.__qualname__)
    if isinstance(v, tuple) and type(getattr(t, "_fields", None)) is tuple and len(t._fields) == len(v):
        out += b"n"  # a namedtuple: its names travel; the receiver makes a namedtuple of its own
        for x in (t.__name__, tuple(str(f) for f in t._fields), tuple(tuple.__iter__(v))):
            _put(out, x, other, depth + 1)
    elif name[0] == "collections" and t is _loaded(*name) and name[1] in ("Counter", "OrderedDict", "defaultdict"):
        out += {"Counter": b"K", "OrderedDict": b"O", "defaultdict": b"M"}[name[1]]
        if name[1] == "defaultdict":  # a built-in factory travels by name; any other is dropped
            f = v.default_factory
            _put(out, f.__name__ if f is not None and getattr(f, "__name__", None) in _FACTORIES
                 and getattr(builtins, f.__name__) is f else None, other, depth + 1)
        _put(out, list(dict.items(v)), other, depth + 1)
    elif name == ("collections", "deque") and t is _loaded(*name):
        out += b"q"
        _put(out, v.maxlen, other, depth + 1)
        _put(out, list(v), other, depth + 1)
    elif name == ("fractions", "Fraction") and t is _loaded(*name):
        out += b"Q"
        _put(out, v.numerator, other, depth + 1)
        _put(out, v.denominator, other, depth + 1)
    elif name == ("decimal", "Decimal") and t is _loaded(*name):
        out += b"D"
        _put(out, str(v), other, depth + 1)
    elif name[0] == "datetime" and t is _loaded(*name) and _put_datetime(out, v, name[1], other, depth):
        pass
    else:
        alt = other(v)
        if type(alt) is Ref or type(alt) is TestRef:
            _put(out, alt, other, depth)
        else:
            _put(out, alt, other, depth + 1)


def _offset(tz) -> int | None:
    """A fixed-offset `datetime.timezone` as seconds; anything else (zoneinfo ...) is no value."""
    if tz is None:
        return None
    if type(tz) is not _loaded("datetime", "timezone"):
        raise NotPlain("a time zone that is not a fixed offset")
    return int(tz.utcoffset(None).total_seconds())


def _put_datetime(out: bytearray, v, kind: str, other, depth: int) -> bool:
    try:
        if kind == "date":
            fields = ("Y", v.year, v.month, v.day)
        elif kind == "datetime":
            fields = ("W", v.year, v.month, v.day, v.hour, v.minute, v.second, v.microsecond, _offset(v.tzinfo), v.fold)
        elif kind == "time":
            fields = ("H", v.hour, v.minute, v.second, v.microsecond, _offset(v.tzinfo), v.fold)
        elif kind == "timedelta":
            fields = ("J", v.days, v.seconds, v.microseconds)
        elif kind == "timezone":
            fields = ("Z", _offset(v))
        else:
            return False
    except NotPlain:
        return False
    out += fields[0].encode()
    _put(out, fields[1:], other, depth + 1)
    return True


def decode(data: bytes, handle, test_handle=None):
    """Bytes (untrusted) back into exact built-in values; `handle(n)` / `test_handle(n)` make
    the value for a candidate's / an evaluator's handle (refused where None). Raises ValueError /
    TypeError / ArithmeticError on anything malformed."""
    r = _Reader(data, handle, test_handle)
    v = r.value(0)
    if r.pos != len(data):
        raise ValueError("trailing bytes after the value")
    return v


class _Reader:
    __slots__ = ("data", "pos", "handle", "test_handle")

    def __init__(self, data: bytes, handle, test_handle):
        self.data, self.pos, self.handle, self.test_handle = data, 0, handle, test_handle

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

    def ints(self, depth: int, n: int, optional_last: int = 0) -> tuple:
        v = self.typed(depth, tuple)
        if len(v) != n or not all(type(x) is int or (i >= n - optional_last and x is None) for i, x in enumerate(v)):
            raise ValueError("malformed value")
        return v

    def value(self, depth: int):  # noqa: C901 - one branch per tag
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
        if tag == 114 or tag == 76:  # r L
            ends = (self.value(depth + 1), self.value(depth + 1), self.value(depth + 1))
            if tag == 114:
                return range(*(self._int(x) for x in ends))
            if not all(x is None or type(x) is int for x in ends):
                raise ValueError("malformed slice")
            return slice(*ends)
        if tag == 82:  # R
            return self.handle(int.from_bytes(self.take(4), "big"))
        if tag == 67 and self.test_handle is not None:  # C
            return self.test_handle(int.from_bytes(self.take(4), "big"))
        return self.library_value(tag, depth)

    @staticmethod
    def _int(x):
        if type(x) is not int:
            raise ValueError("malformed value")
        return x

    def pairs(self, depth: int) -> list:
        pairs = self.typed(depth, list)
        if not all(type(p) is tuple and len(p) == 2 for p in pairs):
            raise ValueError("malformed mapping")
        return pairs

    def library_value(self, tag: int, depth: int):  # noqa: C901
        if tag == 107:  # k: dict keys (a set-like view, in order)
            return dict.fromkeys(self.typed(depth, list)).keys()
        if tag == 118:  # v: dict values
            return dict(enumerate(self.typed(depth, list))).values()
        if tag == 73:  # I: dict items
            return dict(self.pairs(depth)).items()
        if tag == 110:  # n
            name, fields, values = self.typed(depth, str), self.typed(depth, tuple), self.typed(depth, tuple)
            if len(fields) != len(values) or not all(type(f) is str for f in fields):
                raise ValueError("malformed namedtuple")
            return _namedtuple(name, fields)._make(values)
        if tag in (75, 79, 77):  # K O M
            import collections
            factory = None
            if tag == 77:
                name = self.typed(depth, str, type(None))
                if name is not None and name not in _FACTORIES:
                    raise ValueError("malformed defaultdict")
                factory = None if name is None else getattr(builtins, name)
            pairs = self.pairs(depth)
            if tag == 75:
                return collections.Counter(dict(pairs))
            return collections.OrderedDict(pairs) if tag == 79 else collections.defaultdict(factory, pairs)
        if tag == 113:  # q
            import collections
            maxlen = self.typed(depth, int, type(None))
            return collections.deque(self.typed(depth, list), maxlen)
        if tag == 81:  # Q
            import fractions
            return fractions.Fraction(self.typed(depth, int), self.typed(depth, int))
        if tag == 68:  # D
            import decimal
            return decimal.Decimal(self.typed(depth, str))
        if tag in (89, 87, 72, 74, 90):  # Y W H J Z
            return self.datetime_value(tag, depth)
        raise ValueError(f"unknown tag {tag}")

    def datetime_value(self, tag: int, depth: int):
        import datetime as dt

        def tz(offset):
            return None if offset is None else dt.timezone(dt.timedelta(seconds=offset))
        if tag == 89:
            return dt.date(*self.ints(depth, 3))
        if tag == 87:
            f = self.ints(depth, 9, optional_last=2)
            return dt.datetime(*f[:7], tzinfo=tz(f[7]), fold=f[8] or 0)
        if tag == 72:
            f = self.ints(depth, 6, optional_last=2)
            return dt.time(*f[:4], tzinfo=tz(f[4]), fold=f[5] or 0)
        if tag == 74:
            days, seconds, micro = self.ints(depth, 3)
            return dt.timedelta(days=days, seconds=seconds, microseconds=micro)
        (offset,) = self.ints(depth, 1)
        return tz(offset)


def _namedtuple(name: str, fields: tuple):
    """The receiver's own namedtuple class for these names (namedtuple checks they are
    identifiers; names it accepts but cannot compile, NFKC twins, are malformed), one per shape."""
    key = (name, fields)
    if key not in _NAMEDTUPLES:
        import collections
        if len(_NAMEDTUPLES) > 256 or len(fields) > 256:
            raise ValueError("too many namedtuple shapes")
        try:
            _NAMEDTUPLES[key] = collections.namedtuple(name, fields)
        except SyntaxError as e:
            raise ValueError(f"malformed namedtuple: {e.msg}") from None
    return _NAMEDTUPLES[key]


_NAMEDTUPLES: dict = {}


def as_builtin(v):
    """The plain value a subclass of a built-in type holds (an IntEnum's int, a str subclass's
    str), read through the built-in type's own methods; None if it holds none. Candidate side:
    for honest programs only; a lying program can send anything anyway."""
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


def recv(fd: int, max_bytes: int, handle, test_handle=None, _read=os.read):
    """One frame, decoded; EOFError when the other side is gone, ValueError on an oversized one."""
    n = int.from_bytes(_read_exactly(fd, 4, _read), "big")
    if n > max_bytes:
        raise ValueError(f"message of {n} bytes exceeds {max_bytes}")
    return decode(_read_exactly(fd, n, _read), handle, test_handle)


def _read_exactly(fd: int, n: int, _read) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = _read(fd, min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("closed")
        buf += chunk
    return bytes(buf)
