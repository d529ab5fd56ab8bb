"""The plain-data codec of assertion tests (rewards/sandbox_calls.py), in process: every plain
type round-trips to its exact built-in type, lying subclasses arrive as the honest value they
hold, and malformed or hostile data is refused rather than rebuilt."""
import collections
import math
from decimal import Decimal
from fractions import Fraction

import pytest

from megatron_ernie.rewards import sandbox_calls as sc


def _refuse(v):
    raise sc.NotPlain(type(v).__name__)


def _trip(v):
    return sc.decode(sc.encode(v, _refuse), lambda n: ("handle", n))


PLAIN = [None, True, False, 0, -7, 2 ** 70, -(3 ** 9000), 1.5, -0.0, math.inf, 1 + 2j, "", "héllo\u0000\ud800",
         b"\x00\xff", bytearray(b"ab"), [1, [2]], (1, (2,)), {1, 2}, frozenset({"a"}), {"k": [1], 2: (3,), (4, 5): None},
         range(1, 10, 3), collections.deque([1, 2], maxlen=5), Fraction(-11, 6), Decimal("3.30"), Decimal("-Infinity"),
         collections.Counter("aab"), collections.OrderedDict([("b", 1), ("a", 2)]),
         [], (), {}, set()]


@pytest.mark.parametrize("value", PLAIN, ids=[type(v).__name__ + str(i) for i, v in enumerate(PLAIN)])
def test_plain_values_round_trip_to_their_exact_types(value):
    back = _trip(value)
    assert type(back) is type(value)
    assert back == value or (isinstance(value, float) and math.isnan(value))
    if type(value) is collections.deque:
        assert back.maxlen == value.maxlen
    if type(value) is float:
        assert math.copysign(1, back) == math.copysign(1, value)


def test_namedtuples_arrive_as_namedtuples_of_the_evaluator():
    Point = collections.namedtuple("Point", "x y")
    back = _trip([Point(1, 2), Point(3, 4)])
    assert back == [(1, 2), (3, 4)] and back[0].x == 1 and back[1].y == 4 and type(back[0]) is type(back[1])
    assert type(back[0]) is not Point and type(back[0]).__name__ == "Point"
    bad = b"n" + sc.encode("P", _refuse) + sc.encode(("x", "__class__"), _refuse) + sc.encode((1, 2), _refuse)
    with pytest.raises(ValueError):  # namedtuple refuses field names that are not plain identifiers
        sc.decode(bad, lambda n: n)


def test_nan_stays_nan():
    assert math.isnan(_trip(float("nan")))


def test_subclasses_with_lying_methods_arrive_as_the_value_they_hold():
    class Liar(int):
        __eq__ = lambda self, other: True  # noqa: E731
    class Words(tuple):
        def __iter__(self):
            return iter(("forged",))
    Point = collections.namedtuple("Point", "x y")

    for lying, honest in ((Liar(10 ** 9), 10 ** 9), (Words(("a", "b")), ("a", "b")), (Point(1, 2), (1, 2)),
                          (collections.Counter("aab"), {"a": 2, "b": 1}), (collections.OrderedDict(x=1), {"x": 1})):
        plain = sc.as_builtin(lying)
        assert type(plain) is type(honest) and plain == honest
    # a value that holds no built-in value becomes a handle on the candidate side
    handles = []

    def to_handle(v):
        handles.append(v)
        return sc.Ref(len(handles) - 1)
    obj = object()
    assert sc.decode(sc.encode([1, obj], to_handle), lambda n: ("handle", n)) == [1, ("handle", 0)]
    assert handles == [obj]


def _blob(tag: bytes, payload: bytes) -> bytes:
    return tag + len(payload).to_bytes(4, "big") + payload


GOOD_INT = sc.encode(5, _refuse)


@pytest.mark.parametrize("bad", [
    b"", b"x", b"N" + b"N",                                   # empty, unknown tag, trailing bytes
    b"i\x00\x00\x00\x05ab", b"f\x00\x01",                   # truncated int and float
    b"s" + (10 ** 6).to_bytes(4, "big") + b"a",               # a length beyond the message
    b"l" + (10 ** 9).to_bytes(4, "big"),                      # a count beyond the message
    _blob(b"s", b"\xff\xfe"),                                 # not UTF-8
    b"d\x00\x00\x00\x01" + sc.encode([1], _refuse) + GOOD_INT,   # an unhashable key
    b"S\x00\x00\x00\x01" + sc.encode({}, _refuse),            # an unhashable set element
    b"r" + GOOD_INT + GOOD_INT + sc.encode(0, _refuse),        # range step 0
    b"r" + GOOD_INT + sc.encode("x", _refuse) + GOOD_INT,       # a range of strings
    b"q" + sc.encode(-1, _refuse) + sc.encode([], _refuse),     # deque maxlen < 0
    b"Q" + GOOD_INT + sc.encode(0, _refuse),                   # Fraction(5, 0)
    b"D" + sc.encode("not a number", _refuse),
    b"D" + GOOD_INT,
    b"R\x00\x01",                                             # truncated handle
])
def test_malformed_data_is_refused(bad):
    with pytest.raises((ValueError, TypeError, ArithmeticError)):  # what the evaluator turns into "garbage"
        sc.decode(bad, lambda n: n)


def test_huge_ints_are_bounded():
    with pytest.raises(ValueError, match="too large"):
        sc.decode(b"i" + (sc._MAX_INT_BYTES + 1).to_bytes(4, "big") + bytes(sc._MAX_INT_BYTES + 1), lambda n: n)


def test_nesting_is_bounded_both_ways():
    deep = []
    for _ in range(sc.MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(sc.NotPlain, match="deeply"):
        sc.encode(deep, _refuse)
    wire = b"l\x00\x00\x00\x01" * (sc.MAX_DEPTH + 5) + b"N"
    with pytest.raises(ValueError, match="deeply"):
        sc.decode(wire, lambda n: n)


def test_evaluator_side_sends_functions_as_callbacks_and_refuses_other_objects():
    f = lambda x: x  # noqa: E731
    wire = sc.encode([f, f, len], sc._plain_only)
    got = sc.decode(wire, lambda n: n, callback=lambda n: ("callback", n))
    assert got[0] == got[1] and got[0][0] == "callback" and got[2][0] == "callback" and got[2] != got[0]
    assert sc._CALLBACKS[got[0][1]] is f
    with pytest.raises(ValueError, match="unknown tag"):  # the evaluator never accepts a callback back
        sc.decode(wire, lambda n: n)
    with pytest.raises(sc.NotPlain):
        sc.encode(type("C", (), {})(), sc._plain_only)


def test_program_exceptions_are_rebuilt_on_their_builtin_base():
    e = sc._program_exception(["err", "InsufficientFunds", "ValueError", "too low"])
    assert isinstance(e, ValueError) and type(e).__name__ == "InsufficientFunds" and str(e) == "too low"
    assert type(sc._program_exception(["err", "KeyError", "KeyError", "'k'"])) is KeyError
    # a base that is not a built-in Exception (SystemExit, a made-up name) gives a plain Exception
    assert type(sc._program_exception(["err", "SystemExit", "SystemExit", ""])).__mro__[1] is Exception
    assert isinstance(sc._program_exception(["err", "X", "NoSuchBase", ""]), Exception)
    assert isinstance(sc._program_exception(["err", 1, 2]), RuntimeError)


def test_program_objects_refuse_comparisons():
    obj = sc.ProgramObject(0)
    for compare in (lambda: obj == 1, lambda: obj != 1, lambda: obj < 1, lambda: 1 >= obj, lambda: obj == obj):
        with pytest.raises(sc.RefusedComparison):
            compare()
    assert obj in [obj] and {obj: 1}[obj] == 1  # identity still works (containers check it first)


def test_catalog_binds_the_evaluators_own_stdlib_objects():
    assert sc._stdlib_object("math", "isclose") is math.isclose
    assert sc._stdlib_object("operator", "add") is __import__("operator").add
    assert sc._stdlib_object("collections", "OrderedDict") is collections.OrderedDict
    assert sc._stdlib_object("fractions", "Fraction") is Fraction
    # only top-level functions and classes of modules whose classes make honest values: never
    # unittest.mock._ANY (always equal), ctypes (raw memory), a dotted path or a constant
    for module, qualname in (("collections", "OrderedDict.fromkeys"), ("unittest.mock", "_ANY"),
                             ("unittest.mock", "create_autospec"), ("ctypes", "string_at"), ("solution", "f"),
                             ("math", "<lambda>"), ("math", "pi"), ("os", "system")):
        assert sc._stdlib_object(module, qualname) is None, (module, qualname)
    assert sc._stdlib_module("antigravity") is None              # no side-effect imports
    assert sc._stdlib_module("unittest.mock") is None
    assert sc._stdlib_module("numpy") is None                    # not the standard library


def test_names_a_test_uses_only_as_modules():
    code = "import re\nassert math.isclose(f(1), 2)\nx = statistics([1])\nassert heapq.nsmallest(1, q.items) == [1]\nre.match('a', 'a')"
    assert sc._module_uses(compile(code, "<test>", "exec", 0x400)) == {"math", "heapq", "q"}


def test_stop_iteration_from_the_program_is_not_rebuilt_as_itself():
    e = sc._program_exception(("err", "StopIteration", "StopIteration", ""))
    assert type(e) is RuntimeError and "StopIteration raised by the program" in str(e)
