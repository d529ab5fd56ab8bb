"""The plain-data codec (rewards/sandbox_codec.py) and the evaluator's side of assertion tests
(rewards/sandbox_calls.py, sandbox_evaluator.py), in process: every plain type round-trips to its exact type, lying
subclasses arrive as the honest value they hold, malformed or hostile data is refused rather than
rebuilt, and the evaluator binds only vetted objects of the standard library."""
import collections
import datetime as dt
import math
from decimal import Decimal
from fractions import Fraction

import pytest

from megatron_ernie.rewards import sandbox_calls as sc
from megatron_ernie.rewards import sandbox_codec as codec
from megatron_ernie.rewards import sandbox_evaluator as ev


def _refuse(v):
    raise codec.NotPlain(type(v).__name__)


def _trip(v):
    return codec.decode(codec.encode(v, _refuse), lambda n: ("handle", n))


_TZ = dt.timezone(dt.timedelta(hours=-5, minutes=-30))
PLAIN = [None, True, False, 0, -7, 2 ** 70, -(3 ** 9000), 1.5, -0.0, math.inf, 1 + 2j, "", "héllo\u0000\ud800",
         b"\x00\xff", bytearray(b"ab"), [1, [2]], (1, (2,)), {1, 2}, frozenset({"a"}), {"k": [1], 2: (3,), (4, 5): None},
         range(1, 10, 3), slice(1, None, 2), collections.deque([1, 2], maxlen=5), Fraction(-11, 6), Decimal("3.30"),
         Decimal("-Infinity"), collections.Counter("aab"), collections.OrderedDict([("b", 1), ("a", 2)]),
         collections.defaultdict(list, {"a": [1]}), dt.date(2024, 2, 29), dt.datetime(2024, 1, 3, 4, 5, 6, 7),
         dt.datetime(2024, 1, 3, 4, 5, tzinfo=_TZ), dt.time(23, 59, 1, 5, tzinfo=dt.timezone.utc),
         dt.timedelta(days=-2, seconds=5, microseconds=7), _TZ, [], (), {}, set()]


@pytest.mark.parametrize("value", PLAIN, ids=[type(v).__name__ + str(i) for i, v in enumerate(PLAIN)])
def test_plain_values_round_trip_to_their_exact_types(value):
    back = _trip(value)
    assert type(back) is type(value)
    assert back == value or (isinstance(value, float) and math.isnan(value))
    if type(value) is collections.deque:
        assert back.maxlen == value.maxlen
    if type(value) is collections.defaultdict:
        assert back.default_factory is list and back["new"] == []
    if type(value) is float:
        assert math.copysign(1, back) == math.copysign(1, value)
    if isinstance(value, (dt.datetime, dt.time)):
        assert back.utcoffset() == value.utcoffset()


def test_dict_views_keep_their_order_and_set_like_equality():
    d = {"b": 1, "a": 2}
    keys, items = _trip(d.keys()), _trip(d.items())
    assert list(keys) == ["b", "a"] and keys == {"a", "b"} and items == {("a", 2), ("b", 1)}
    assert list(_trip(d.values())) == [1, 2]


def test_namedtuples_arrive_as_namedtuples_of_the_receiver():
    Point = collections.namedtuple("Point", "x y")
    back = _trip([Point(1, 2), Point(3, 4)])
    assert back == [(1, 2), (3, 4)] and back[0].x == 1 and back[1].y == 4 and type(back[0]) is type(back[1])
    assert type(back[0]) is not Point and type(back[0]).__name__ == "Point"
    bad = b"n" + codec.encode("P", _refuse) + codec.encode(("x", "__class__"), _refuse) + codec.encode((1, 2), _refuse)
    with pytest.raises(ValueError):  # namedtuple refuses field names that are not plain identifiers
        codec.decode(bad, lambda n: n)
    twins = b"n" + codec.encode("P", _refuse) + codec.encode(("a", "ａ"), _refuse) + codec.encode((1, 2), _refuse)
    with pytest.raises(ValueError, match="malformed namedtuple"):  # NFKC twins compile to one name
        codec.decode(twins, lambda n: n)


def test_nan_stays_nan():
    assert math.isnan(_trip(float("nan")))


def test_subclasses_with_lying_methods_arrive_as_the_value_they_hold():
    class Liar(int):
        __eq__ = lambda self, other: True  # noqa: E731
    class Words(tuple):
        def __iter__(self):
            return iter(("forged",))

    for lying, honest in ((Liar(10 ** 9), 10 ** 9), (Words(("a", "b")), ("a", "b"))):
        plain = codec.as_builtin(lying)
        assert type(plain) is type(honest) and plain == honest
    handles = []

    def to_handle(v):
        handles.append(v)
        return codec.Ref(len(handles) - 1)
    obj = object()
    assert codec.decode(codec.encode([1, obj], to_handle), lambda n: ("handle", n)) == [1, ("handle", 0)]
    assert handles == [obj]


def _blob(tag: bytes, payload: bytes) -> bytes:
    return tag + len(payload).to_bytes(4, "big") + payload


GOOD_INT = codec.encode(5, _refuse)


@pytest.mark.parametrize("bad", [
    b"", b"x", b"N" + b"N",                                   # empty, unknown tag, trailing bytes
    b"i\x00\x00\x00\x05ab", b"f\x00\x01",                     # truncated int and float
    b"s" + (10 ** 6).to_bytes(4, "big") + b"a",               # a length beyond the message
    b"l" + (10 ** 9).to_bytes(4, "big"),                      # a count beyond the message
    _blob(b"s", b"\xff\xfe"),                                 # not UTF-8
    b"d\x00\x00\x00\x01" + codec.encode([1], _refuse) + GOOD_INT,   # an unhashable key
    b"S\x00\x00\x00\x01" + codec.encode({}, _refuse),        # an unhashable set element
    b"r" + GOOD_INT + GOOD_INT + codec.encode(0, _refuse),   # range step 0
    b"r" + GOOD_INT + codec.encode("x", _refuse) + GOOD_INT,  # a range of strings
    b"L" + codec.encode("a", _refuse) + GOOD_INT + GOOD_INT,  # a slice of strings
    b"q" + codec.encode(-1, _refuse) + codec.encode([], _refuse),  # deque maxlen < 0
    b"Q" + GOOD_INT + codec.encode(0, _refuse),              # Fraction(5, 0)
    b"D" + codec.encode("not a number", _refuse), b"D" + GOOD_INT,
    b"M" + codec.encode("eval", _refuse) + codec.encode([], _refuse),   # a defaultdict factory not allowed
    b"Y" + codec.encode((2024, 2, 30), _refuse),             # no such date
    b"W" + codec.encode((2024, 1, 1, 0, 0, 0, 0, 10 ** 9, 0), _refuse),  # offset out of range
    b"R\x00\x01",                                             # truncated handle
    b"C\x00\x00\x00\x01",                                     # a test handle where none are accepted
])
def test_malformed_data_is_refused(bad):
    with pytest.raises((ValueError, TypeError, ArithmeticError, OverflowError)):  # the evaluator's "garbage"
        codec.decode(bad, lambda n: n)


def test_huge_ints_are_bounded():
    with pytest.raises(ValueError, match="too large"):
        codec.decode(b"i" + (codec._MAX_INT_BYTES + 1).to_bytes(4, "big") + bytes(codec._MAX_INT_BYTES + 1), lambda n: n)


def test_nesting_is_bounded_both_ways():
    deep = []
    for _ in range(codec.MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(codec.NotPlain, match="deeply"):
        codec.encode(deep, _refuse)
    wire = b"l\x00\x00\x00\x01" * (codec.MAX_DEPTH + 5) + b"N"
    with pytest.raises(ValueError, match="deeply"):
        codec.decode(wire, lambda n: n)
    nested = []
    for _ in range(200):  # a test's 200-deep list crosses
        nested = [nested]
    assert _trip(nested) == nested


def test_the_evaluators_own_objects_cross_as_test_handles_one_per_object():
    f, node = (lambda x: x), type("ListNode", (), {})()
    wire = codec.encode([f, f, node, len], ev._plain_only)
    got = codec.decode(wire, lambda n: n, test_handle=lambda n: ("test", n))
    assert got[0] == got[1] and got[0][0] == "test" and len({g[1] for g in got}) == 3
    assert ev._TEST_OBJECTS[got[0][1]] is f and ev._TEST_OBJECTS[got[2][1]] is node
    with pytest.raises(ValueError, match="unknown tag"):  # a receiver that accepts no test handles
        codec.decode(wire, lambda n: n)


def test_exceptions_are_rebuilt_on_their_builtin_base_with_their_args():
    e = sc.rebuild_exception("InsufficientFunds", "ValueError", "too low", ("too low",), {"need": 5, "_x": 1})
    assert isinstance(e, ValueError) and type(e).__name__ == "InsufficientFunds" and str(e) == "too low"
    assert e.need == 5 and not hasattr(e, "_x")
    k = sc.rebuild_exception("KeyError", "KeyError", "'k'", ("k",), {})
    assert type(k) is KeyError and k.args == ("k",)
    assert type(sc.rebuild_exception("SystemExit", "SystemExit", "3", (3,), {})) is SystemExit
    stop = sc.rebuild_exception("StopIteration", "StopIteration", "", (), {})
    assert type(stop) is RuntimeError and "StopIteration raised by the other side" in str(stop)
    assert isinstance(sc.rebuild_exception("X", "NoSuchBase", "", None, {}), Exception)
    assert isinstance(sc.rebuild_exception(1, 2, 3, None, {}), RuntimeError)


def test_program_objects_equal_only_themselves():
    class FakeChannel:
        failed = None

        def refuse(self, kind, detail):
            self.failed = kind
            raise ev.Refused(kind)
    ev._CALLS[:] = [type("C", (), {"channel": FakeChannel()})()]
    obj = ev._program_object(7)
    assert ev._program_object(7) is obj and obj == obj and not (obj != obj) and obj <= obj
    for op in (lambda: obj == 1, lambda: obj < 1, lambda: 1 >= obj, lambda: obj + 1, lambda: -obj,
               lambda: float(obj), lambda: [0][obj]):
        with pytest.raises(ev.Refused):  # a BaseException: a test's `except TypeError` cannot take it
            op()
    assert not issubclass(ev.Refused, Exception)
    assert obj in [obj] and {obj: 1}[obj] == 1


def test_catalog_binds_the_evaluators_own_stdlib_objects():
    assert ev._stdlib_object("math", "isclose") is math.isclose
    assert ev._stdlib_object("operator", "add") is __import__("operator").add
    assert ev._stdlib_object("_functools", "reduce") is __import__("functools").reduce  # the C accelerator's name
    assert ev._stdlib_object("collections", "OrderedDict") is collections.OrderedDict
    assert ev._stdlib_object("fractions", "Fraction") is Fraction
    # vetted names only: nothing that evaluates text, reaches into objects, imports, or makes
    # always-equal objects; no dotted path, constant or private name
    for module, qualname in (("builtins", "eval"), ("builtins", "getattr"), ("builtins", "__import__"),
                             ("typing", "get_type_hints"), ("operator", "attrgetter"), ("collections", "OrderedDict.fromkeys"),
                             ("unittest.mock", "_ANY"), ("ctypes", "string_at"), ("solution", "f"), ("math", "<lambda>"),
                             ("math", "pi"), ("os", "system"), ("pickle", "loads")):
        assert ev._stdlib_object(module, qualname) is None, (module, qualname)
    for name in ("antigravity", "unittest.mock", "venv.__main__", "lib2to3", "json._private", "numpy"):
        assert ev._stdlib_module(name) is None, name


def test_names_the_test_uses():
    code = ("import re\nassert math.isclose(f(1), 2)\nx = statistics([1])\nassert heapq.nsmallest(1, q.items) == [1]\n"
            "re.match('a', 'a')\nimport solution\nsolution.helper()")
    mentioned, as_modules = ev._names(compile(code, "<test>", "exec", 0x400))
    assert as_modules == {"math", "heapq", "q"}
    assert {"f", "statistics", "q", "items", "helper", "isclose"} <= set(mentioned)
    star, _ = ev._names(compile("from solution import *\nassert f(1)", "<test>", "exec", 0x400))
    assert star is None  # all of the program's names
