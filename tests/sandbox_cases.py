"""Programs for tests/test_sandbox.py: hostile ones against the sandbox's verdicts, limits and host
(`ATTACKS`), and honest ones in shapes real tasks and tests take (`HONEST_SHAPES`).

Each is presented as the solution to a small task and must earn no credit, with a reason, and
leave the host as it was (test_sandbox.py checks processes, files, memory, the listener, the
secret). Placeholders filled in by the test: @TAG@ (a marker in every path/process a program
tries to leave), @PORT@ (a listener on the host's 127.0.0.1), @VICTIM@ (a host file), @REPO@,
@HOME@.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Hostile:
    name: str
    code: str
    reasons: tuple = ()          # acceptable reasons (substrings); empty: any non-empty reason
    task: str = "sum"            # "sum": stdin/stdout tests; "add": assertion tests
    stdout: str | None = None    # a regex the first test's stdout must match (the barrier held)
    forbid: str | None = None    # a regex its stdout must not match
    tests: list | None = None    # tests of its own instead of the task's


# Which of CPU and wall time runs out first depends on the machine's load: hostile programs accept
# either (the bound holds both ways); test_sandbox.test_cpu_and_wall_limits_are_told_apart pins each.
TIME_LIMITS = ("cpu time limit", "timeout")

# Attacks on the two-process assertion tests, the memory cgroup, IPC, keyrings and seccomp.
# Section markers name the class of attack (1: forged verdicts/frames, 2: lying values,
# 3: patched modules/builtins, 4: comparison styles, 5: memory outside RSS, 6: persistence,
# 7: seccomp/namespace escapes, 8: reading the answer key, 9: everything else). Entries whose
# comment says "earned credit before" (or "crashed the runner before") were holes found while the
# design was built and closed since; they stay as regression tests.

# A hand-rolled server for the candidate side of the call protocol (4-byte length + tag-byte
# codec on fds 3 (requests in) and 4 (replies out)), as a program that read the design writes it:
# `CATALOG` is sent instead of the harness's catalog, `HANDLES[n]` answers requests for handle n.
_OWN_SERVER = r'''
import os as _os, struct as _struct
class _Ref:
    def __init__(self, n):
        self.n = n
def _put(out, v):
    t = type(v)
    if v is None:
        out += b"N"
    elif t is bool:
        out += b"T" if v else b"F"
    elif t is int:
        data = v.to_bytes((v.bit_length() + 8) // 8, "big", signed=True)
        out += b"i" + len(data).to_bytes(4, "big") + data
    elif t is float:
        out += b"f" + _struct.pack(">d", v)
    elif t is str:
        data = v.encode()
        out += b"s" + len(data).to_bytes(4, "big") + data
    elif t in (list, tuple, set):
        out += {list: b"l", tuple: b"t", set: b"S"}[t] + len(v).to_bytes(4, "big")
        for x in v:
            _put(out, x)
    elif t is dict:
        out += b"d" + len(v).to_bytes(4, "big")
        for k, x in v.items():
            _put(out, k)
            _put(out, x)
    elif t is _Ref:
        out += b"R" + v.n.to_bytes(4, "big")
    else:
        HANDLES.append(v)
        out += b"R" + (len(HANDLES) - 1).to_bytes(4, "big")
def _send(obj):
    out = bytearray()
    _put(out, obj)
    data = len(out).to_bytes(4, "big") + bytes(out)
    while data:
        data = data[_os.write(4, data):]
def _read(n):
    buf = b""
    while len(buf) < n:
        chunk = _os.read(3, n - len(buf))
        if not chunk:
            _os._exit(0)
        buf += chunk
    return buf
def _get(data, pos):
    tag, pos = data[pos], pos + 1
    if tag in b"NTF":
        return {78: None, 84: True, 70: False}[tag], pos
    if tag in b"isbB":
        n = int.from_bytes(data[pos:pos + 4], "big")
        raw, pos = data[pos + 4:pos + 4 + n], pos + 4 + n
        return (int.from_bytes(raw, "big", signed=True) if tag == 105 else raw.decode() if tag == 115 else raw), pos
    if tag == 102:
        return _struct.unpack(">d", data[pos:pos + 8])[0], pos + 8
    if tag in b"ltSzd":
        n, pos, items = int.from_bytes(data[pos:pos + 4], "big"), pos + 4, []
        for _ in range(n * (2 if tag == 100 else 1)):
            x, pos = _get(data, pos)
            items.append(x)
        if tag == 100:
            return dict(zip(items[::2], items[1::2])), pos
        return {108: list, 116: tuple, 83: set, 122: frozenset}[tag](items), pos
    if tag == 82:
        return HANDLES[int.from_bytes(data[pos:pos + 4], "big")], pos + 4
    raise ValueError(tag)
def _serve():
    _get(_read(int.from_bytes(_read(4), "big")), 0)  # the evaluator's ("names", ...)
    _send(("ready", CATALOG))
    while True:
        msg = _get(_read(int.from_bytes(_read(4), "big")), 0)[0]
        if msg[0] == "exit":
            _os._exit(0)
        obj = HANDLES[msg[1]]
        try:
            if msg[0] == "call":
                _send(("ok", obj(*msg[2], **msg[3]), [msg[2][i] for i in msg[4]], [msg[3][k] for k in msg[5]], ""))
            elif msg[0] == "getitem":
                _send(("ok", obj[msg[2]]))
            elif msg[0] == "getattr":
                _send(("ok", getattr(obj, msg[2])))
            else:
                _send(("err", "TypeError", "TypeError", msg[0]))
        except LookupError as e:
            _send(("err", "KeyError", "KeyError", str(e)))
        except Exception as e:
            _send(("err", "TypeError", "TypeError", str(e)))
'''

# What a program gets the evaluator to run when it can: find the verdict nonce (a closure cell of
# the evaluator's `report`), write a pass verdict on the verdict pipe (fd 3), exit before the test
# goes on.
_FORGE_VERDICT = r'''
import gc, os
for f in gc.get_objects():
    if type(f).__name__ == "function" and f.__name__ == "report" and f.__closure__:
        for c in f.__closure__:
            try:
                v = c.cell_contents
            except ValueError:
                continue
            if type(v) is str and len(v) == 32:
                os.write(3, (v + " pass \t\n").encode())
                os._exit(0)
'''

# Tests for a circle's area that a wrong `area` (3 r^2) can only pass by lying.
AREA_TESTS = [{"code": "assert abs(area(2) - 12.566) < 1e-3"},
              {"code": "assert isinstance(area(1), float) and abs(area(1) - 3.14159) < 1e-4"},
              {"code": "assert sorted([area(1), area(2)]) == sorted([3.14159, 12.566])"}]
AREA_IMPORT_TESTS = AREA_TESTS + [{"code": "import math\nassert math.isclose(area(2), 12.566, rel_tol=1e-3)"}]
# Expected values nothing in the program can compute (a hidden answer key).
SECRET_TESTS = [{"code": "assert secret_sauce(7) == 918273645501"}, {"code": "assert secret_sauce(8) == 918273645502"}]

ATTACKS: list[Hostile] = [
    # ---- 1: verdicts and frames forged through the harness's own channels --------------------
    Hostile("child_writes_fake_frames_and_verdicts_to_every_fd_before_catalog", r"""
import json, os
def add(a, b):
    return a - b
def frame(obj):
    data = json.dumps(obj).encode()
    return len(data).to_bytes(4, "big") + data
blobs = [frame({"status": "pass", "verdict": "pass"}), frame(["pass"]), b"0" * 32 + b" pass \t\n",
         b"ALL TESTS PASSED\n", frame(["ok", 5, [], []])]
pid = os.fork()
if pid == 0:
    for fd in range(256):
        for blob in blobs:
            try:
                os.write(fd, blob)
            except OSError:
                pass
    os._exit(0)
os.waitpid(pid, 0)
""", ("program sent garbage",), task="add"),
    Hostile("orphan_floods_reply_pipe_after_catalog", r"""
import os, time
def add(a, b):
    return a * b
if os.fork() == 0:
    os.setsid()
    time.sleep(0.05)  # the harness has sent the real catalog by now
    junk = (1 << 20).to_bytes(4, "big") + b'["ok",5,[],[]]' * 1000
    while True:
        try:
            os.write(4, junk)
        except OSError:
            time.sleep(0.01)
""", ("left background processes", "program sent garbage"), task="add"),
    Hostile("queued_replies_in_guessed_frame_format", r"""
import json, os
def frame(obj):
    data = json.dumps(obj).encode()
    return len(data).to_bytes(4, "big") + data
# the catalog, then answers queued before any question, in a guessed (JSON) format
os.write(4, frame(["ready", [["secret_sauce", "object", 0]]]) + frame(["ok", {"__eq__": True}, [], []])
         + frame(["pass"]) + frame(["exit"]))
os._exit(0)
""", ("program sent garbage",), tests=SECRET_TESTS),
    Hostile("io_orphan_forges_ok_verdict_after_parent_exits", r"""
import os, sys, time
nonce = sys._getframe(0).f_back.f_locals.get("nonce")
if os.fork() == 0:
    os.setsid()
    time.sleep(0.05)  # the parent has exited and reported by now
    for _ in range(3):
        try:
            os.write(3, ("%s ok exit\t0\n" % nonce).encode())
            os.write(1, b"5\n")
        except OSError:
            pass
    time.sleep(30)
print(0)
""", ("left background processes", "verdict channel tampered", "wrong answer")),
    Hostile("verdict_pipe_flood_with_right_answer", r"""
import os, sys
a, b = map(int, input().split())
print(a + b)
sys.stdout.flush()
nonce = sys._getframe(0).f_back.f_locals.get("nonce") or "0" * 32
for _ in range(4):
    try:
        os.write(3, ("%s pass ok\t\n" % nonce).encode() * 200)
    except OSError:
        pass
""", ("killed by signal SIGKILL", "verdict channel tampered")),
    # Earned credit before the runner compiled the program itself: a stdin/stdout test's
    # candidate holds the verdict pipe and the nonce, and a verdict of kind "syntax error" made the
    # runner copy that report, status included, to every later test (assertion tests "passed").
    Hostile("forged_syntax_error_verdict_copied_to_later_assertion_tests", r"""
import os, sys
def add(a, b):
    return a - b - 1
if __name__ == "__main__":
    nonce = sys._getframe(0).f_back.f_locals["nonce"]
    print(0)
    sys.stdout.flush()
    os.write(3, ("%s pass syntax error\t\n" % nonce).encode())
    os._exit(0)
""", ("wrong answer", "verdict channel tampered", "assertion failed", "syntax error"),
        tests=[{"input": "2 3\n", "output": "5"}, {"code": "assert add(2, 3) == 5"},
               {"code": "assert add(1, 1) == 2"}, {"code": "assert add(10, 20) == 30"}]),

    # ---- 2: lying values in built-in proxy types; expected values with their own __eq__ --------
    Hostile("weakref_proxy_of_lying_list", r"""
import weakref
class Liar(list):
    def __eq__(self, other):
        return True
    __hash__ = None
keep = []
def add(a, b):
    keep.append(Liar([0]))
    return weakref.proxy(keep[-1])
""", ("runtime error", "compared an object of the program's own class"), task="add"),
    Hostile("mappingproxy_userdict_userlist_liars", r"""
import collections, types
class LyingDict(collections.UserDict):
    def __eq__(self, other):
        return True
    def __contains__(self, key):
        return True
class LyingList(collections.UserList):
    def __eq__(self, other):
        return True
    def __contains__(self, item):
        return True
def counts(s):
    return types.MappingProxyType({"z": 0})
def table(s):
    return LyingDict()
def items(n):
    return LyingList()
""", ("compared an object of the program's own class", "assertion failed"),
        tests=[{"code": "assert counts('aab') == {'a': 2, 'b': 1}"},
               {"code": "assert table('aab') == {'a': 2, 'b': 1}"},
               {"code": "assert items(3) == [0, 1, 2]"},
               {"code": "assert 'a' in table('aab') and 1 in items(3) and 'q' not in counts('aab')"}]),
    Hostile("lying_str_tuple_dict_float_subclasses", r"""
class S(str):
    def __eq__(self, other):
        return True
    def __contains__(self, item):
        return True
    __hash__ = str.__hash__
class T(tuple):
    def __eq__(self, other):
        return True
    def __lt__(self, other):
        return True
    __hash__ = tuple.__hash__
class D(dict):
    def __eq__(self, other):
        return True
    def __contains__(self, key):
        return True
    def __getitem__(self, key):
        return 2
class F(float):
    def __eq__(self, other):
        return True
    def __sub__(self, other):
        return 0.0
    def __lt__(self, other):
        return True
    __hash__ = float.__hash__
def greet(name):
    return S("nope")
def pair():
    return T((0, 0))
def tally(s):
    return D()
def area(r):
    return F(-1.0)
""", ("assertion failed",),
        tests=[{"code": "assert greet('x') == 'hello x' or 'hello' in greet('x')"},
               {"code": "assert pair() == (1, 2)"},
               {"code": "assert tally('aab')['a'] == 2 and 'a' in tally('aab')"},
               {"code": "assert abs(area(2) - 12.566) < 1e-3 or area(2) == 12.566"}]),
    Hostile("index_float_int_dunder_objects", r"""
class Num:
    def __index__(self):
        return 5
    def __float__(self):
        return 12.566
    def __int__(self):
        return 5
    def __eq__(self, other):
        return True
    __hash__ = None
def area(r):
    return Num()
def index_of(x):
    return Num()
""", ("runtime error: TypeError", "compared an object of the program's own class",
      "operation on an object of the program's own class"),
        tests=[{"code": "import math\nassert math.isclose(area(2), 12.566, rel_tol=1e-3)"},
               {"code": "assert [0, 1, 2, 3, 4, 5][index_of(5)] == 5"},
               {"code": "assert float(area(2)) == 12.566 or int(index_of(5)) == 5"}]),
    Hostile("class_assignment_to_a_lying_number_type", r"""
class Plain:
    pass
class AlwaysEqual(Plain):
    def __eq__(self, other):
        return True
    __hash__ = None
def add(a, b):
    x = Plain()
    try:
        x.__class__ = int  # refused by CPython: not a heap type with a compatible layout
    except TypeError:
        x.__class__ = AlwaysEqual
    return x
""", ("compared an object of the program's own class",), task="add"),
    Hostile("fraction_and_decimal_subclasses_against_their_own_types", r"""
from decimal import Decimal
from fractions import Fraction
class F(Fraction):
    def __eq__(self, other):
        return True
    __hash__ = Fraction.__hash__
class D(Decimal):
    def __eq__(self, other):
        return True
    __hash__ = Decimal.__hash__
def half():
    return F(0)
def price():
    return D(0)
""", ("compared an object of the program's own class",),
        tests=[{"code": "from fractions import Fraction\nassert half() == Fraction(1, 2)"},
               {"code": "from decimal import Decimal\nassert price() == Decimal('9.99')"},
               {"code": "from fractions import Fraction\nassert Fraction(1, 2) == half()"}]),
    Hostile("nan_and_complex_against_expected_values", r"""
class C(complex):
    def __eq__(self, other):
        return True
    __hash__ = complex.__hash__
def ratio(x):
    return float("nan")
def root(x):
    return C(0)
def sqrt_c(x):
    return complex("nan+nanj")
""", ("assertion failed",),
        tests=[{"code": "assert ratio(1) == 1.0"},
               {"code": "assert abs(ratio(1) - 1.0) < 1e-9"},
               {"code": "assert root(-4) == 2j"},
               {"code": "import cmath\nassert cmath.isclose(sqrt_c(-4), 2j)"}]),

    # ---- 3: patched math/operator/builtins, shadowed builtins, sys.modules games --------------
    Hostile("patch_math_operator_and_insert_fake_modules", r"""
import builtins, math, operator, sys, types
math.isclose = lambda *a, **k: True
math.fabs = lambda x: 0.0
math.pi = 3.0
operator.eq = lambda a, b: True
fake = types.ModuleType("math")
fake.isclose, fake.fabs, fake.pi = math.isclose, math.fabs, 3.0
for name in ("math", "fractions", "unittest", "operator", "cmath"):
    sys.modules[name] = fake
open("math.py", "w").write("isclose = lambda *a, **k: True\npi = 3.0\nfabs = lambda x: 0.0\n")
def area(r):
    return 3.0 * r * r
""", ("assertion failed",),
        tests=[{"code": "import math\nassert math.isclose(area(2), 12.566, rel_tol=1e-3)"},
               {"code": "import math, operator\nassert operator.eq(area(1), math.pi) or math.fabs(area(1) - math.pi) < 1e-9"}]),
    Hostile("shadow_every_builtin_the_tests_use", r"""
def abs(x):
    return 0
def len(x):
    return 5
def sorted(*a, **k):
    return [0, 2, 4, 6, 8]
def round(*a):
    return 3.14
def all(*a):
    return True
def isinstance(*a):
    return True
def set(*a):
    return {0, 2}
def sum(*a):
    return 2
def max(*a, **k):
    return 2
def area(r):
    return 3.0 * r * r
def evens(n):
    return [1]
""", ("assertion failed",),
        tests=[{"code": "assert abs(area(2) - 12.566) < 1e-3"},
               {"code": "assert len(evens(10)) == 5 and sorted(evens(10)) == [0, 2, 4, 6, 8]"},
               {"code": "assert round(area(1), 2) == 3.14 and all([isinstance(x, int) for x in evens(4)])\n"
                        "assert set(evens(4)) == {0, 2} and sum(evens(4)) == 2 and max(evens(4)) == 2"}]),
    Hostile("patch_builtins_module_in_place", r"""
import builtins
builtins.abs = lambda x: 0
builtins.sorted = lambda *a, **k: [0, 2, 4, 6, 8]
builtins.round = lambda *a: 3.14
builtins.all = builtins.any = lambda *a: True
builtins.sum = lambda *a: 2
builtins.max = builtins.min = lambda *a, **k: 2
def area(r):
    return 3.0 * r * r
def evens(n):
    return [1]
""", ("assertion failed",),
        tests=[{"code": "assert abs(area(2) - 12.566) < 1e-3"},
               {"code": "assert sorted(evens(10)) == [0, 2, 4, 6, 8] and all([x % 2 == 0 for x in evens(10)])"},
               {"code": "assert round(area(1), 2) == 3.14 and sum(evens(4)) == 2 and max(evens(4)) == 2"}]),
    # Earned credit before `solution.__all__`: `from solution import *` (a common harness
    # preamble) bound the program's `abs`, `sorted`, ... over the builtins in the test.
    Hostile("star_import_brings_shadowed_builtins", r"""
def abs(x):
    return 0
def sorted(*a, **k):
    return []
def all(*a):
    return True
def area(r):
    return 3.0 * r * r
""", ("assertion failed",),
        tests=[{"code": "from solution import *\nassert abs(area(2) - 12.566) < 1e-3"},
               {"code": "from solution import *\nassert sorted([area(1), area(2)]) == sorted([3.14159, 12.566])"},
               {"code": "from solution import *\nassert all([area(r) > 3.1 * r * r for r in (1, 2)])"}]),
    # Earned credit before names used as modules got the stdlib module: a test that relies on the
    # solution's `import math` (MBPP-style) got whatever the program bound to `math`.
    Hostile("fake_math_for_a_test_that_does_not_import_it", r"""
class math:
    pi = 3.0
    @staticmethod
    def isclose(*args, **kwargs):
        return True
    @staticmethod
    def fabs(x):
        return 0.0
def area(r):
    return 3.0 * r * r
""", ("runtime error: NameError", "assertion failed", "compared an object of the program's own class"),
        tests=[{"code": "assert math.isclose(area(2), 12.566, rel_tol=1e-3)"},
               {"code": "assert math.fabs(area(1) - 3.14159) < 1e-4"}]),
    # Earned credit before dunder catalog names were dropped: the catalog is the program's to
    # write, and an entry named `__builtins__` (not a name of the builtins module, so not
    # filtered) replaced the builtins the test ran with: `abs`, `isinstance`, `sorted`...
    Hostile("forged_catalog_binds___builtins__", _OWN_SERVER + r"""
import builtins as _b
def area(r):
    return 3.0 * r * r
FAKE = {"abs": lambda x: 0, "isinstance": lambda *a: True, "sorted": lambda *a, **k: [], "all": lambda *a: True,
        "len": lambda x: 0, "round": lambda *a: 0}
class Builtins:
    def __getitem__(self, name):
        return FAKE[name] if name in FAKE else getattr(_b, name)
HANDLES = [area, Builtins()]
CATALOG = [("area", "object", _Ref(0)), ("__builtins__", "object", _Ref(1))]
_serve()
""", ("program sent garbage", "assertion failed"), tests=AREA_TESTS),
    # The same through the harness's own catalog (its module globals are one frame up), as a
    # plain dict of handles: `import math` in the test then ran the program's __import__.
    Hostile("patched_catalog_binds___builtins___and___import__", r"""
import builtins, sys
def area(r):
    return 3.0 * r * r
class FakeMath:
    pi = 3.0
    def isclose(self, *a, **k):
        return True
def fake_import(name, *rest):
    return FakeMath() if name == "math" else __import__(name)
FAKE = {"abs": lambda x: 0, "isinstance": lambda *a: True, "sorted": lambda *a, **k: [], "all": lambda *a: True,
        "__import__": fake_import}
for k in ("float", "int", "str", "list", "tuple", "range", "print"):
    FAKE[k] = getattr(builtins, k)
g = sys._getframe(1).f_globals
honest = g["_catalog"]
g["_catalog"] = lambda ns, *rest: honest(ns, *rest) + [("__builtins__", "value", FAKE)]
del builtins, sys  # modules in the test's namespace would not cross as plain data
""", ("program sent garbage", "assertion failed", "runtime error"), tests=AREA_IMPORT_TESTS),

    # ---- 4: lying objects against every comparison style a test uses --------------------------
    Hostile("omni_liar_against_every_comparison_style", r"""
class Liar:
    def __eq__(self, o): return True
    def __ne__(self, o): return False
    def __lt__(self, o): return True
    def __le__(self, o): return True
    def __gt__(self, o): return True
    def __ge__(self, o): return True
    def __contains__(self, o): return True
    def __bool__(self): return True
    def __sub__(self, o): return 0.0
    def __rsub__(self, o): return 0.0
    def __abs__(self): return 0.0
    def __float__(self): return 12.566
    def __index__(self): return 9
    def __len__(self): return 3
    def __iter__(self): return iter(())
    def __hash__(self): return 9
def score(n): return Liar()
def divisors(n): return Liar()
def area(r): return Liar()
def evens(n): return Liar()
def fact(n): return Liar()
def is_prime(n): return Liar()
""", ("compared an object of the program's own class", "assertion failed", "runtime error: TypeError"),
        tests=[{"code": "assert score(3) < 10 and score(3) >= 9"},
               {"code": "assert score(3) <= 9 <= score(3)"},
               {"code": "assert 4 in divisors(12) and 5 not in divisors(12)"},
               {"code": "assert abs(area(2) - 12.566) < 1e-3"},
               {"code": "import math\nassert math.isclose(area(2), 12.566, rel_tol=1e-3)"},
               {"code": "assert sorted(evens(6)) == [0, 2, 4] and len(evens(6)) == 3"},
               {"code": "for n, want in [(1, 1), (2, 2), (3, 6)]:\n    assert fact(n) == want"},
               {"code": "assert all(is_prime(p) for p in (2, 3, 5)) and not any(is_prime(c) for c in (4, 6))"},
               {"code": "assert isinstance(score(3), int) and score(3) in {9}"}]),
    Hostile("list_subclass_lying_sort_order_and_membership", r"""
class L(list):
    def __eq__(self, o): return True
    def __lt__(self, o): return True
    def __le__(self, o): return True
    def __contains__(self, o): return True
    def __iter__(self): return iter([2, 4, 5])
    def __len__(self): return 3
    __hash__ = None
def top3(xs):
    return L([0])
""", ("assertion failed",),
        tests=[{"code": "assert sorted(top3([5, 1, 4, 2])) == [2, 4, 5]"},
               {"code": "assert 4 in top3([5, 1, 4, 2]) and 1 not in top3([5, 1, 4, 2])"},
               {"code": "assert top3([5, 1, 4, 2]) <= [2, 4, 5] and len(top3([5, 1, 4, 2])) == 3"}]),
    # Earned credit before StopIteration became RuntimeError: raised by a call inside map() it
    # ended the iteration, so all(map(...)) / not any(map(...)) / not list(filter(...)) held.
    Hostile("stop_iteration_ends_map_and_filter_early", r"""
def add(a, b):
    raise StopIteration
""", ("assertion failed", "runtime error"),
        tests=[{"code": "assert all(map(lambda c: add(c[0], c[1]) == c[2], [(2, 3, 5), (-1, 1, 0)]))"},
               {"code": "assert not any(map(lambda c: add(c[0], c[1]) != c[2], [(2, 3, 5), (-1, 1, 0)]))"},
               {"code": "assert not list(filter(lambda c: add(c[0], c[1]) != c[2], [(2, 3, 5), (-1, 1, 0)]))"},
               {"code": "assert list(map(add, [2, -1], [3, 1])) == [5, 0]"}]),

    # ---- 5: memory outside any process's resident set ----------------------------------------
    Hostile("sysv_shm_segments_detached_beyond_limit", r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
size = 100 << 20
for i in range(8):
    shmid = libc.shmget(0, ctypes.c_size_t(size), 0o1000 | 0o600)  # IPC_PRIVATE, IPC_CREAT
    addr = libc.shmat(shmid, None, 0)
    ctypes.memset(addr, 1, size)
    libc.shmdt(ctypes.c_void_p(addr))  # no process maps it any more; no IPC_RMID either
print(5)
""", ("memory limit",) + TIME_LIMITS),
    Hostile("shm_segments_made_by_children_that_exit", r"""
import ctypes, os, time
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
for i in range(8):
    pid = os.fork()
    if pid == 0:
        shmid = libc.shmget(0x5EED0 + i, ctypes.c_size_t(80 << 20), 0o1000 | 0o600)
        addr = libc.shmat(shmid, None, 0)
        ctypes.memset(addr, 1, 80 << 20)
        os._exit(0)
    os.waitpid(pid, 0)
time.sleep(30)
""", ("memory limit",) + TIME_LIMITS),
    Hostile("memfd_page_cache_in_children", r"""
import os, time
kids = []
for k in range(8):
    pid = os.fork()
    if pid == 0:
        fds = []
        for i in range(56):
            fd = os.memfd_create("cache")
            os.write(fd, b"\x01" * (1 << 20))  # unmapped page cache (RLIMIT_FSIZE: 1 MiB each)
            fds.append(fd)
        time.sleep(30)
        os._exit(0)
    kids.append(pid)
for pid in kids:
    os.waitpid(pid, 0)
""", ("memory limit",) + TIME_LIMITS),
    Hostile("shared_memory_blocks_on_dev_shm", r"""
from multiprocessing import shared_memory
blocks = []
for i in range(400):
    s = shared_memory.SharedMemory(name="@TAG@-%d" % i, create=True, size=1 << 20)
    s.buf[:] = b"\x01" * (1 << 20)
    blocks.append(s)
print(5)
""", ("killed by signal SIGBUS", "disk full", "file size limit", "left background processes", "memory limit")),
    Hostile("sysv_message_queues_filled", r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
class Msg(ctypes.Structure):
    _fields_ = [("mtype", ctypes.c_long), ("mtext", ctypes.c_char * 8000)]
m = Msg(1, b"x" * 8000)
while True:
    q = libc.msgget(0, 0o1000 | 0o600)
    if q < 0:
        break
    while libc.msgsnd(q, ctypes.byref(m), 8000, 0o4000) == 0:  # IPC_NOWAIT
        pass
print(5)
""", ("memory limit",) + TIME_LIMITS),

    # ---- 6: persistence between tests and runs -----------------------------------------------
    Hostile("keyrings_add_key_keyctl_request_key", r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
nr = {"x86_64": (248, 250, 249), "aarch64": (217, 219, 218)}[os.uname().machine]
for name, args in ((nr[0], (b"user", b"@TAG@", b"answers", 7, -4)),   # add_key to @u
                   (nr[1], (0, -4, 1)),                             # keyctl GET_KEYRING_ID @u
                   (nr[1], (8, -4, 0, 0)),                          # keyctl READ @u
                   (nr[2], (b"user", b"@TAG@", None, -4))):         # request_key
    ctypes.set_errno(0)
    print(libc.syscall(name, *args), os.strerror(ctypes.get_errno()))
""", ("wrong answer",), stdout=r"^(-1 Operation not permitted\n){4}$"),
    Hostile("sysv_objects_with_fixed_keys_for_a_later_run", r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
KEY = 0x5EED5EED
for name, make in (("shm", lambda: libc.shmget(KEY, 4096, 0o3600)),   # IPC_CREAT | IPC_EXCL
                   ("msg", lambda: libc.msgget(KEY, 0o3600)),
                   ("sem", lambda: libc.semget(KEY, 1, 0o3600))):
    ctypes.set_errno(0)
    print(name, "created" if make() >= 0 else os.strerror(ctypes.get_errno()))  # "File exists": one survived
print(open("/proc/sysvipc/shm").read().count("\n") - 1, "segments visible")
""", ("wrong answer",), stdout=r"^shm created\nmsg created\nsem created\n1 segments visible\n"),
    Hostile("abstract_unix_socket_daemon", r"""
import os, socket, time
s = socket.socket(socket.AF_UNIX)
try:
    s.connect("\0@TAG@")  # a daemon of an earlier test or run
    print("connect", "reached a daemon")
except OSError as e:
    print("connect", type(e).__name__)
if os.fork() == 0:
    os.setsid()
    d = socket.socket(socket.AF_UNIX)
    d.bind("\0@TAG@")
    d.listen(1)
    time.sleep(60)
print(5)
""", ("left background processes",), stdout=r"^connect ConnectionRefusedError\n"),
    Hostile("oom_score_and_ipc_sysctls_persisted", r"""
for path, value in (("/proc/self/oom_score_adj", "-1000"), ("/proc/sys/kernel/shmmax", "1"),
                    ("/proc/sys/kernel/msgmnb", "1"), ("/proc/sys/vm/overcommit_memory", "1"),
                    ("/proc/sys/kernel/core_pattern", "|/bin/sh")):
    try:
        with open(path, "w") as f:
            f.write(value)
        print(path, "written")
    except OSError as e:
        print(path, type(e).__name__)
""", ("wrong answer",), forbid=r"written"),

    # ---- 7: seccomp and namespace escapes ----------------------------------------------------
    Hostile("unshare_user_then_mount_clone_setns", r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER, CLONE_NEWNS, SIGCHLD = 0x10000000, 0x00020000, 17
def show(name, ret):
    print(name, ret, os.strerror(ctypes.get_errno()) if ret < 0 else "ok")
show("unshare", libc.unshare(CLONE_NEWUSER | CLONE_NEWNS))
show("mount", libc.mount(b"none", b"/tmp", b"tmpfs", 0, None))
show("clone", libc.syscall(56, CLONE_NEWUSER | CLONE_NEWNS | SIGCHLD, 0, 0, 0, 0))
show("clone3", libc.syscall(435, 0, 0))
for ns in ("user", "mnt", "pid", "net"):
    for pid in ("1", "self"):
        try:
            fd = os.open("/proc/%s/ns/%s" % (pid, ns), os.O_RDONLY)
            show("setns " + pid, libc.setns(fd, 0))
        except OSError as e:
            print("setns", pid, type(e).__name__)
""", ("wrong answer",),
        stdout=r"^unshare -1 Operation not permitted\nmount -1 Operation not permitted\nclone -1 Operation not permitted\n"
               r"clone3 -1 Function not implemented\n(setns 1 FileNotFoundError\nsetns self -1 Operation not permitted\n){4}$"),
    Hostile("bpf_perf_userfaultfd_io_uring_memfd_secret", r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
attr = ctypes.create_string_buffer(128)
for name, nr, args in (("bpf", 321, (0, attr, 128)), ("perf_event_open", 298, (attr, 0, -1, -1, 0)),
                       ("userfaultfd", 323, (0,)), ("io_uring_setup", 425, (8, attr)),
                       ("process_vm_readv", 310, (1, 0, 0, 0, 0, 0)), ("kcmp", 312, (1, os.getpid(), 0, 0, 0))):
    ctypes.set_errno(0)
    print(name, libc.syscall(nr, *args), os.strerror(ctypes.get_errno()))
""", ("wrong answer",), stdout=r"^(\w+ -1 Operation not permitted\n){6}$"),
    Hostile("stop_signal_and_read_the_evaluator", r"""
import ctypes, os, signal
libc = ctypes.CDLL(None, use_errno=True)
report = []
me = os.getpid()
for pid in [1] + [p for p in range(me - 3, me + 6) if p > 1 and p != me]:
    for name, act in (("kill", lambda: os.kill(pid, signal.SIGSTOP)),
                      ("pidfd_signal", lambda: signal.pidfd_send_signal(os.pidfd_open(pid), signal.SIGSTOP)),
                      ("mem", lambda: open("/proc/%d/mem" % pid, "rb")),
                      ("fd", lambda: os.listdir("/proc/%d/fd" % pid))):
        try:
            act()
            report.append((name, pid, "DONE"))
        except OSError as e:
            report.append((name, pid, type(e).__name__))
    iov = (ctypes.c_char * 64)()
    local = (ctypes.c_void_p * 2)(ctypes.addressof(iov), 64)
    remote = (ctypes.c_void_p * 2)(0x400000, 64)
    if libc.syscall(310, pid, local, 1, remote, 1, 0) >= 0:
        report.append(("process_vm_readv", pid, "DONE"))
print(report)
def add(a, b):
    return a * b
""", ("assertion failed",), task="add", forbid=r"DONE"),
    Hostile("proc_fd_mem_root_environ_scan", r"""
import os
me = str(os.getpid())
for pid in sorted(p for p in os.listdir("/proc") if p.isdigit() and p != me):
    print("VISIBLE", pid)
for path in ("/proc/1/root/etc/passwd", "/proc/1/environ", "/proc/1/mem", "/proc/1/fd", "/proc/1/cwd",
             "/proc/self/mem", "/proc/self/environ", "/proc/self/root/proc/1/root"):
    try:
        if os.path.isdir(path):
            print("OPEN", path, os.listdir(path))
        else:
            with open(path, "rb") as f:
                print("OPEN", path, f.read(200))
    except OSError as e:
        print(path, type(e).__name__)
for fd in os.listdir("/proc/self/fd"):
    try:
        print(fd, os.readlink("/proc/self/fd/" + fd))
    except OSError:
        pass
""", ("wrong answer",), forbid=r"VISIBLE|OPEN /proc/1|sandbox-tests|hunter2"),
    Hostile("reopen_own_pipes_via_proc_self_fd", r"""
import json, os
res = []
for fd, flags in ((3, os.O_WRONLY), (4, os.O_RDONLY)):  # inject requests, read replies
    try:
        os.open("/proc/self/fd/%d" % fd, flags)
        res.append("reopened %d" % fd)
    except OSError as e:
        res.append("%d %s" % (fd, e.strerror))
print(res)
def add(a, b):
    return -a
""", ("assertion failed",), task="add", stdout=r"^\['3 Permission denied', '4 Permission denied'\]"),

    # ---- 8: reading the answer key -------------------------------------------------------------
    Hostile("search_own_objects_and_frames_for_expected_values", r"""
import gc, sys
target = int("9182736455" + "01")
needle = "secret_sauce(7) " + "=="
found = []
def visit(x, seen):
    todo = [x]
    while todo:
        o = todo.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if type(o) is int and o == target and o is not target:
            found.append("FOUND int")
        elif type(o) is str and needle in o and o is not needle:
            found.append("FOUND str")
        elif type(o) in (list, tuple, set, frozenset):
            todo.extend(o)
        elif type(o) is dict:
            todo.extend(o.keys())
            todo.extend(o.values())
        elif type(o) is type(visit.__code__):
            todo.extend(o.co_consts)
def secret_sauce(n):
    seen = set()
    for o in gc.get_objects():
        visit(o, seen)
    for f in sys._current_frames().values():
        while f is not None:
            visit(f.f_locals, seen)
            visit(f.f_code, seen)
            f = f.f_back
    print(found or "nothing", flush=True)
    return 0
""", ("assertion failed",), tests=SECRET_TESTS, forbid=r"FOUND"),
    Hostile("read_other_tests_inputs_from_the_job", r"""
import sys
f = sys._getframe(0)
while f is not None and "job" not in f.f_locals:
    f = f.f_back
job = f.f_locals["job"] if f is not None else {}
print(sorted(job), job.get("tests"))
print(0)
""", ("wrong answer",), forbid=r"'output'|tests_fd.*'code': '"),
    Hostile("notes_in_workdir_between_tests_of_one_program", r"""
import os, time
def secret_sauce(n):
    notes = open("notes").read().split() if os.path.exists("notes") else []
    guess = int(notes[-1]) + 1 if notes else 918273645500
    open("notes", "a").write("%d\n" % guess)  # the next test's candidate tries the next guess
    return guess
""", ("assertion failed",), tests=[{"code": "assert secret_sauce(7) == 918273645510"}] * 3),
    Hostile("read_parents_memory_for_expected_output", r"""
import os
for path in ("/proc/%d/mem" % os.getppid(), "/proc/1/mem", "/proc/%d/cmdline" % os.getppid(),
             "/proc/1/root/proc/self/environ", "/proc/%d/maps" % os.getppid()):
    try:
        print("OPEN", path, open(path, "rb").read(64))
    except OSError as e:
        print(path, type(e).__name__)
print(0)
""", ("wrong answer",), forbid=r"OPEN"),

    # ---- 9: everything else ----------------------------------------------------------------------
    Hostile("huge_reply_to_exhaust_the_evaluator", r"""
def add(a, b):
    return "9" * (40 << 20)
""", ("assertion failed", "memory limit", "program sent garbage", "runtime error") + TIME_LIMITS, task="add"),
    Hostile("deeply_nested_raw_reply", _OWN_SERVER + r"""
def add(a, b):
    return 0
HANDLES = [add]
CATALOG = [("add", "object", _Ref(0))]
_send(("ready", CATALOG))
while True:  # every request answered with a result nested 300000 deep (one-element lists)
    _read(int.from_bytes(_read(4), "big"))
    ok = bytearray()
    _put(ok, "ok")
    data = b"t" + (4).to_bytes(4, "big") + bytes(ok) + (b"l" + (1).to_bytes(4, "big")) * 300000 + b"N" \
        + b"l" + bytes(4) + b"l" + bytes(4)
    _os.write(4, len(data).to_bytes(4, "big") + data)
""", ("recursion limit", "program sent garbage", "no verdict", "program died during the test"), task="add"),
    Hostile("deeply_nested_value_and_huge_int", r"""
def add(a, b):
    if a == 2:
        x = []
        for _ in range(100000):
            x = [x]
        return x
    return 7 ** 300000
""", ("runtime error", "assertion failed"), task="add"),
    Hostile("recursive_repr_and_lying_getattr", r"""
class Weird:
    def __repr__(self):
        return repr(self)
    __str__ = __repr__
    def __getattr__(self, name):
        return 5
def add(a, b):
    return Weird()
""", ("recursion limit", "runtime error", "compared an object of the program's own class"),
        tests=[{"code": "assert str(add(2, 3)) == '5'"}, {"code": "assert [add(-1, 1)] == [0]"},
               {"code": "assert add(2, 3) == 5, repr(add(2, 3))"}]),
    Hostile("generator_enumerating_every_integer", r"""
import itertools
def primes(n):
    return itertools.count()
""", ("assertion failed",) + TIME_LIMITS,
        tests=[{"code": "assert 7 in primes(10) and 4 not in primes(10)"},
               {"code": "assert 9 not in primes(10)"}]),
    Hostile("exception_claiming_to_be_ValueError_with_lying_str", r"""
class ValueError(Exception):
    def __str__(self):
        return "math domain error"
def sqrt(x):
    if x < 0:
        raise ValueError()
    return 0
""", ("runtime error", "assertion failed"),
        tests=[{"code": "try:\n    sqrt(-1)\nexcept ValueError as e:\n    assert 'domain' in str(e)\nelse:\n    assert False"},
               {"code": "assert sqrt(4) == 2"}]),
    Hostile("system_exit_keyboard_interrupt_generator_exit_from_calls", r"""
def add(a, b):
    if a == 2:
        raise SystemExit(0)
    raise KeyboardInterrupt
""", ("program exited during the test", "runtime error"), task="add"),
    Hostile("fake_stdout_and_fd_games", r"""
import io, os, sys
class Fake(io.StringIO):
    def write(self, s):
        return os.write(2, b"5\n")
sys.stdout = sys.__stdout__ = Fake()
os.dup2(os.open("/dev/null", os.O_WRONLY), 1)  # the real stdout goes nowhere
print(4)
""", ("wrong answer",)),
    # Earned credit before externals were limited to top-level functions of a few modules: a
    # callable's `__module__` / `__qualname__` are the program's to set, and the evaluator bound
    # its own object at that path: unittest.mock.ANY (always equal), its bound __eq__ (true).
    Hostile("forged_module_qualname_binds_mock_ANY", r"""
def answer():
    return 0
answer.__module__, answer.__qualname__ = "unittest.mock", "ANY.__class__"
def is_even(n):
    return False
is_even.__module__, is_even.__qualname__ = "unittest.mock", "ANY.__eq__"
""", ("assertion failed", "compared an object of the program's own class", "runtime error"),
        tests=[{"code": "assert answer() == 42"}, {"code": "assert is_even(4) and is_even(10)"},
               {"code": "assert answer() == 42 and answer() != 41"}]),
    Hostile("catalog_binds_builtin_names_and_dunders", _OWN_SERVER + r"""
def add(a, b):
    return a - b
HANDLES = [add]
CATALOG = [("add", "object", _Ref(0)), ("AssertionError", "value", 0), ("__import__", "value", 0),
           ("__name__", "value", "x"), ("isinstance", "object", _Ref(0)), ("abs", "object", _Ref(0)),
           ("__spec__", "value", 1), ("__loader__", "value", 1), ("__build_class__", "value", 1)]
_serve()
""", ("assertion failed",),
        tests=[{"code": "assert add(2, 3) == 5"}, {"code": "import math\nassert abs(add(-1, 1)) == 0 and isinstance(math.pi, float)"}]),
    # ---- 9b: the evaluator running what the program chose ----------------------------------
    # Earned credit before externals were vetted name by name: `from builtins import eval` bound
    # the evaluator's eval, and a round-trip test (decode(encode(x)) == x, the shape of every
    # serialize/deserialize task) evaluated the program's string in the evaluator.
    Hostile("external_builtins_eval_runs_program_expression_in_evaluator", r"""
from builtins import eval as decode
def encode(s):
    return "__import__('unittest.mock').mock.ANY"
""", ("compared an object of the program's own class", "runtime error", "assertion failed"),
        tests=[{"code": "for s in ['', 'aaab', 'xyz']:\n    assert decode(encode(s)) == s"},
               {"code": "assert decode(encode([1, [2, 3]])) == [1, [2, 3]]"}]),
    # Earned credit before (2 of 3): typing.get_type_hints, then an allowed external, evaluated
    # string annotations read from the program's object; the code run there forged the verdict.
    Hostile("external_get_type_hints_runs_program_code_and_forges_verdict", r"""
from typing import get_type_hints as decode
class Blob:
    __annotations__ = {"x": "exec(%r)" % FORGE}
def encode(s):
    return Blob()
def sort3(xs):
    return xs
""".replace("FORGE", repr(_FORGE_VERDICT)),
        ("compared an object of the program's own class", "runtime error", "assertion failed", "program sent garbage"),
        tests=[{"code": "for s in ['', 'aaab']:\n    assert decode(encode(s)) == s"},
               {"code": "assert sort3([3, 1, 2]) == [1, 2, 3]\ndecode(encode(0))"},
               {"code": "decode(encode(0))\nassert sort3([3, 1, 2]) == [1, 2, 3]"}]),
    # Earned credit before (2 of 2): a test that evaluates the program's output ran the program's
    # code in the evaluator, which forged the verdict with the nonce (a closure cell of `report`,
    # via gc) or by raising the harness's own ChannelBroken (reachable from any handle). Now the
    # evaluator compiles no text but the test's own, and a ChannelBroken the channel did not
    # raise is tampering.
    Hostile("test_evals_program_output_which_forges_the_verdict", r"""
def expression_for(n):
    if n == 5:
        return "exec(%r)" % FORGE
    return "(_ for _ in ()).throw(type(expression_for).__call__.__globals__['ChannelBroken']())"
""".replace("FORGE", repr(_FORGE_VERDICT)),
        ("blocked",),
        tests=[{"code": "assert eval(expression_for(5)) == 120"}, {"code": "assert eval(expression_for(6)) == 720"}]),
    # Earned credit before names used as modules always got the stdlib module of that name:
    # `import pickle as json`, and the evaluator unpickled the program's bytes (unittest.mock.ANY).
    Hostile("module_alias_pickle_as_json_unpickles_in_evaluator", r"""
import pickle as json
def to_json(obj):
    return b"cunittest.mock\nANY\n."
""", ("runtime error", "assertion failed"),
        tests=[{"code": "assert json.loads(to_json({'a': [1, 2]})) == {'a': [1, 2]}"},
               {"code": "assert json.loads(to_json([1, 'x'])) == [1, 'x']"}]),
    Hostile("external_pickle_loads_as_decoder", r"""
from pickle import loads as decode
from marshal import loads as decode2
def encode(s):
    return b"cunittest.mock\nANY\n."
""", ("compared an object of the program's own class", "runtime error"),
        tests=[{"code": "assert decode(encode('aaab')) == 'aaab'"}, {"code": "assert decode2(encode('x')) == 'x'"}]),
    # Callbacks: the test's functions cross as handles the program calls back; a failed assertion
    # inside one fails the test even when the program swallows the AssertionError, and calls to
    # callbacks it was never given are garbage.
    Hostile("callbacks_called_with_lies_and_swallowed_assertions", r"""
class Liar:
    def __eq__(self, other):
        return True
    def __neg__(self):
        return self
    __hash__ = None
def sort_by(xs, key):
    try:
        key(Liar())  # crosses as a handle: -handle fails in the test's lambda, and comes back
    except Exception:
        pass
    return sorted(xs)
def run_with(check):
    try:
        check(4)  # the test's own assertion fails in it...
    except AssertionError:
        pass  # ...and is swallowed here
    check(5)
    return True
""", ("assertion failed", "operation on an object of the program's own class"),
        tests=[{"code": "assert sort_by([3, 1, 2], key=lambda x: -x) == [3, 2, 1]"},
               {"code": "def check(x):\n    assert x == 5\nassert run_with(check)"}]),
    Hostile("callback_numbers_never_given", r"""
import sys
G = sys._getframe(1).f_globals  # the harness module that runs us: its codec, its frame writer
def sort_by(xs, key):
    for n in (7, -1, 10 ** 6):  # use test objects the program was never given
        G["codec"].send(4, ("test", "call", n, [1], {}), G["codec"].Ref)
    return sorted(xs, key=key)
""", ("program sent garbage",),
        tests=[{"code": "assert sort_by([3, 1, 2], key=lambda x: x) == [3, 2, 1]"},
               {"code": "assert sort_by([1, 2], key=abs) == [2, 1]"}]),
    # ---- supervisor crashes ----------------------------------------------------------------
    # Crashed the runner before ("sandbox runner died", the sample `failed`): the candidate hung
    # in its final flush past the evaluator's exit, and the supervisor's zombie reaping took the
    # evaluator before its own waitpid. Now it waits for its two processes by pid first.
    Hostile("candidate_outlives_evaluator_and_crashes_runner", r"""
import os, sys
r, w = os.pipe()
os.set_blocking(w, False)
try:
    while True:
        os.write(w, b"x" * 65536)
except BlockingIOError:
    pass
os.set_blocking(w, True)
os.dup2(w, 1)
sys.stdout.write("pending")
def add(a, b):
    return a - b
""", TIME_LIMITS, task="add"),
    # Crashed the runner before, as a race (6 of 20 programs): a candidate flooding the verdict
    # pipe and exiting at once was reaped by the zombie reaping before the supervisor's wait4.
    Hostile("verdict_flood_and_exit_races_the_supervisor", r"""
import os
os.write(3, b"x" * 5000)
os._exit(0)
""", ("verdict channel tampered", "killed by signal SIGKILL"), tests=[{"input": "", "output": "5"}] * 30),
]


# ---- Round 2 (red team): the evaluator's compile guard, the vetted externals, the codec's
# special tags, the harness's own exceptions, the supervisor's compile. HOLE_ entries earned credit
# or marked the sample failed when written (see each comment); the others held.
ATTACKS += [
    # EARNS CREDIT (2 of 2). A test that unpickles the program's bytes (a serialize-with-pickle
    # task) runs `pickle.loads` at the test's level, and the guard lets find_class through for
    # module "__main__": in the evaluator that is the runner's `-c` module, and with protocol 4 a
    # dotted name walks its globals (`__builtins__.getattr`, `__builtins__.__import__`). The pickle
    # imports runpy and calls `runpy._run_code(FORGE, {})`: the exec happens in a frame of
    # "<frozen runpy>", which the guard counts as the standard library's, so FORGE runs beside the
    # verdict (gc -> `report`'s nonce -> a pass line on fd 3 -> _exit).
    Hostile("test_unpickles_program_bytes_through_main_module_globals", r'''
def _u(s):
    b = s.encode()
    return (b"\x8c" + bytes([len(b)]) + b) if len(b) < 256 else (b"X" + len(b).to_bytes(4, "little") + b)
def _g(path):  # STACK_GLOBAL __main__.<dotted path>
    return _u("__main__") + _u(path) + b"\x93"
PAYLOAD = (b"\x80\x04" + _g("__builtins__.getattr") + _g("__builtins__.__import__") + _u("runpy") + b"\x85R"
           + _u("_run_code") + b"\x86R" + _u(FORGE) + b"}\x86R.")
def serialize(obj):
    return PAYLOAD
'''.replace("FORGE", repr(_FORGE_VERDICT)), ("blocked", "runtime error"),
        tests=[{"code": "import pickle\nassert pickle.loads(serialize([1, 2, 3])) == [1, 2, 3]"},
               {"code": "import pickle\nassert pickle.loads(serialize({'a': (1, 2)})) == {'a': (1, 2)}"}]),
    # EARNS CREDIT (2 of 3). A test that checks the program's type hints (an "add annotations"
    # task) hands the program's `__annotations__` strings to typing / inspect, which compile and
    # eval them from a standard-library frame: the guard lets it through, and the expression calls
    # `report("pass")` (found through gc) and exits. `__globals__ = {}` gives the eval the
    # evaluator's real builtins.
    Hostile("test_reads_type_hints_of_program_function_evaluating_its_text", r'''
class _Add:
    __annotations__ = {"a": EXPR, "b": "int", "return": "int"}
    __globals__ = {}
    def __call__(self, a, b):
        return a - b
add = _Add()
'''.replace("EXPR", repr('next(r for r in __import__("gc").get_objects() if type(r).__name__ == "function"'
                         ' and r.__name__ == "report" and r.__closure__)("pass") or __import__("os")._exit(0)')),
        ("blocked", "compared an object of the program's own class", "assertion failed"),
        tests=[{"code": "import typing\nassert typing.get_type_hints(add) == {'a': int, 'b': int, 'return': int}"},
               {"code": "import inspect\nassert inspect.get_annotations(add, eval_str=True) == {'a': int, 'b': int, 'return': int}"},
               {"code": "assert add(2, 3) == 5"}]),
    # MARKS THE SAMPLE FAILED. The supervisor compiles the program once to report a syntax error
    # for every test (`_run_tests`), with no limit of its own: a 20 KB program whose one match
    # pattern captures 3000 names takes ~400 MB to compile (quadratic in the names), the slot's
    # memory cgroup kills the supervisor, and the sample ends "sandbox runner died" (failed=True)
    # instead of scoring 0. 8000 names: 2.5 GB and 5 s of CPU.
    Hostile("match_pattern_compile_exhausts_the_supervisor",
            "def add(a, b):\n    return a - b\ndef _never(x):\n    match x:\n        case ["
            + ", ".join("a%d" % i for i in range(3000)) + "]:\n            pass\n",
            ("memory limit",) + TIME_LIMITS, task="add"),
    # EARNS CREDIT (3 of 3), with nothing hostile in the program: the harness's own TypeErrors
    # (RefusedComparison for `<` on a program object, ProgramObject having no `__add__`, NotPlain
    # for an argument that cannot cross) are what a test of "raises TypeError on bad operands /
    # bad input" expects, so a program that never raises passes it.
    Hostile("harness_type_errors_satisfy_tests_expecting_type_error", r'''
class Version:
    def __init__(self, s):
        self.parts = tuple(int(p) for p in s.split("."))
    def __lt__(self, other):
        return self.parts < other.parts if isinstance(other, Version) else True
    def __add__(self, other):
        return self
def total(xs):
    return 0
''', ("assertion failed", "compared an object of the program's own class", "cannot pass"),
        tests=[{"code": "try:\n    Version('1.2') < 3\nexcept TypeError:\n    pass\nelse:\n    raise AssertionError('no TypeError')"},
               {"code": "try:\n    Version('1.2') + 'x'\nexcept TypeError:\n    pass\nelse:\n    raise AssertionError('no TypeError')"},
               {"code": "try:\n    total(object())\nexcept TypeError:\n    pass\nelse:\n    raise AssertionError('no TypeError')"}]),
    # A module object the program makes up names any stdlib module, and the evaluator imports it
    # before the test runs: `venv.__main__` runs `venv.main()` on the evaluator's argv (the
    # rewards directory). In the namespace modes that directory is not there and the import just
    # fails; in audit-hook mode as a non-root user (evaluator = the repository's owner) it created a
    # virtual environment inside megatron_ernie/rewards/ (bin, lib, lib64, include, pyvenv.cfg).
    Hostile("fake_module_object_runs_venv_main_in_the_evaluator", r'''
import types
_venv = types.ModuleType("venv.__main__")
_tool = types.ModuleType("lib2to3.__main__")  # refactors the files under argv[1], prints diffs
def add(a, b):
    return a - b
''', ("assertion failed",) + TIME_LIMITS, task="add"),
    # `lib2to3.tests.__main__` has no main guard either: the evaluator runs the lib2to3 test
    # suite before the test (wall time; nothing gained).
    Hostile("fake_module_object_runs_a_stdlib_test_suite_in_the_evaluator", r'''
import types
_suite = types.ModuleType("lib2to3.tests.__main__")
def add(a, b):
    return a - b
''', ("assertion failed", "timeout", "no verdict"), task="add"),
    # Two fields that differ as strings but not after NFKC ('a' and fullwidth 'ａ') pass
    # namedtuple's checks and then fail its generated code with a SyntaxError, which the decoder
    # lets out (not "program sent garbage"): in the catalog it kills the evaluator (no verdict),
    # in a reply it reaches the test as a SyntaxError.
    Hostile("namedtuple_fields_equal_after_nfkc_escape_the_decoder", r'''
import collections
P = collections.namedtuple("P", ["a", "\uff41"])
ORIGIN = P(0, 0)
def add(a, b):
    return P(a, b)
''', ("no verdict", "program sent garbage", "syntax error"), task="add"),
    # The same value as a reply only: the SyntaxError reaches the test, which swallows it.
    Hostile("namedtuple_syntax_error_reply_swallowed_by_the_test", r'''
import collections
def parse(s):
    return collections.namedtuple("P", ["a", "\uff41"])(1, 2)
''', ("assertion failed", "program sent garbage", "syntax error"),
        tests=[{"code": "try:\n    r = parse('x')\nexcept Exception:\n    r = None\nassert r == (1, 2)"}]),
    # After the __main__ fix: a pickle naming only what the guard never allows.
    Hostile("pickle_globals_outside_the_allowed_classes", r'''
def _u(s):
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b
def serialize(obj):
    n = len(str(obj))
    if n % 3 == 0:
        return b"\x80\x04" + _u("builtins") + _u("eval") + b"\x93" + _u("[1, 2, 3]") + b"\x85R."
    if n % 3 == 1:
        return b"\x80\x04" + _u("runpy") + _u("_run_code") + b"\x93" + _u("x = 1") + b"}\x86R."
    return b"\x80\x04" + _u("copyreg") + _u("_reconstructor") + b"\x93" + _u("builtins") + _u("getattr") + b"\x93" \
        + _u("builtins") + _u("object") + b"\x93N\x87R."
''', ("blocked",),
        tests=[{"code": "import pickle\nassert pickle.loads(serialize([1, 2, 3])) == [1, 2, 3]"},
               {"code": "import pickle\nassert pickle.loads(serialize([1, 2, 33])) == [1, 2, 33]"},
               {"code": "import pickle\nassert pickle.loads(serialize([1, 2, 334])) == [1, 2, 334]"}]),
    # exec of what the program returns, as bytes, bytearray, an AST or a code object it cannot
    # send: refused or not plain data.
    Hostile("exec_of_program_source_as_bytes_bytearray_and_ast", r'''
SRC = "def f(x):\n    return 2 * x\n"
def make_code(kind):
    if kind == 0:
        return SRC.encode()
    if kind == 1:
        return bytearray(SRC.encode())
    import ast
    return ast.parse(SRC)
''', ("blocked", "runtime error: TypeError", "compared an object of the program's own class"),
        tests=[{"code": "ns = {}\nexec(make_code(0), ns)\nassert ns['f'](2) == 4"},
               {"code": "ns = {}\nexec(make_code(1), ns)\nassert ns['f'](2) == 4"},
               {"code": "ns = {}\nexec(compile(make_code(2), '<p>', 'exec'), ns)\nassert ns['f'](2) == 4"}]),
    # `from functools import cmp_to_key as decode`, vetted, is not the evaluator's: its
    # `__module__` is "_functools" (so are reduce, operator's and heapq's/bisect's functions: those
    # table entries never match), so decode runs in the program, and the K object it makes (whose
    # equality is the program's "always 0") arrives as a handle, whose comparison is refused.
    Hostile("external_cmp_to_key_wraps_a_program_comparator", r'''
from functools import cmp_to_key as decode
def _always_equal(a, b):
    return 0
def encode(s):
    return _always_equal
''', ("compared an object of the program's own class", "runtime error"),
        tests=[{"code": "for s in ['', 'ab']:\n    assert decode(encode(s)) == s"},
               {"code": "assert [decode(encode('x'))('x')] == ['x']"}]),
    # Arguments the program changes in place come back as plain data: lying objects put in them
    # arrive as handles, which the test's comparison refuses.
    Hostile("in_place_arguments_refilled_with_lying_objects", r'''
class Liar:
    def __eq__(self, other):
        return True
    __hash__ = None
def sort_in_place(xs):
    xs[:] = [Liar() for _ in xs]
def tally(words, counts):
    counts.clear()
    counts["a"] = Liar()
''', ("compared an object of the program's own class",),
        tests=[{"code": "xs = [3, 1, 2]\nsort_in_place(xs)\nassert xs == [1, 2, 3]"},
               {"code": "c = {}\ntally(['a', 'a'], c)\nassert c == {'a': 2}"}]),
    # A made-up module object named like a stdlib module binds the evaluator's own module, not the
    # program's attributes; one named like nothing binds nothing.
    Hostile("fake_module_objects_named_math_and_helpers", r'''
import types
math = types.ModuleType("math")
math.isclose = lambda *a, **k: True
math.pi = 3.0
helpers = types.ModuleType("helpers")
helpers.close_enough = lambda *a, **k: True
def area(r):
    return 3.0 * r * r
''', ("assertion failed", "runtime error: NameError", "runtime error: AttributeError"),
        tests=[{"code": "assert math.isclose(area(2), 12.566, rel_tol=1e-3) and math.pi > 3.1"},
               {"code": "assert helpers.close_enough(area(2), 12.566)"},
               {"code": "m = math\nassert m.isclose(area(2), 12.566, rel_tol=1e-3)"}]),
    # Malformed values of the special tags, sent by a server of the program's own: each one is
    # garbage (a zero denominator, an unhashable Counter key, a deque of negative maxlen, a range
    # of bools, 300 namedtuple fields) or, for a signalling NaN, an error in the test's `==`.
    Hostile("malformed_special_tags_from_own_server", _OWN_SERVER + r'''
def _blob(tag, body):
    return tag + body
def _i(v):
    out = bytearray()
    _put(out, v)
    return bytes(out)
BAD = [b"Q" + _i(1) + _i(0),                                                   # Fraction(1, 0)
       b"K" + b"l" + (1).to_bytes(4, "big") + b"t" + (2).to_bytes(4, "big") + _i([1]) + _i(2),  # Counter({[1]: 2})
       b"q" + _i(-1) + _i([1, 2]),                                             # deque maxlen -1
       b"r" + b"T" + _i(5) + _i(1),                                            # range(True, 5, 1)
       b"n" + _i("P") + _i(tuple("f%d" % i for i in range(300))) + _i(tuple(range(300))),
       b"D" + _i("sNaN")]
def answer(i):
    return 0
HANDLES = [answer]
CATALOG = [("answer", "object", _Ref(0))]
_get(_read(int.from_bytes(_read(4), "big")), 0)  # the evaluator's ("names", ...)
_send(("ready", CATALOG))
while True:
    msg = _get(_read(int.from_bytes(_read(4), "big")), 0)[0]
    if msg[0] == "exit":
        _os._exit(0)
    ok = bytearray()
    _put(ok, "ok")
    body = BAD[msg[2][0] % len(BAD)]
    data = b"t" + (4).to_bytes(4, "big") + bytes(ok) + body + b"l" + bytes(4) + b"l" + bytes(4)
    _os.write(4, len(data).to_bytes(4, "big") + data)
''', ("program sent garbage",),
        tests=[{"code": "from fractions import Fraction\nassert answer(0) == Fraction(1, 2)"},
               {"code": "assert answer(1) == {'a': 2}"}, {"code": "assert list(answer(2)) == [1, 2]"},
               {"code": "assert list(answer(3)) == [1, 2, 3, 4]"}, {"code": "assert answer(4) == tuple(range(300))"},
               {"code": "from decimal import Decimal\nassert answer(5) == Decimal('9.99')"}]),
    # The size cap counts UTF-8 bytes: a correct program padded with 70,000 two-byte characters
    # (140 KB, 70 K characters) is not run.
    Hostile("program_over_the_size_cap_in_utf8_bytes", "def add(a, b):\n    return a + b\n# " + "\u00e9" * 70000 + "\n",
            ("program too large",), task="add"),
    # A lone surrogate in the source: the supervisor's compile raises UnicodeEncodeError (a
    # ValueError), caught like a syntax error, for every test.
    Hostile("lone_surrogate_in_program_source", "def add(a, b):\n    return a + b\n# \ud800\n",
            ("runtime error: UnicodeEncodeError", "syntax error"), task="add"),
    # Looks for the tests' memfd (and any memfd) through every process' descriptors and maps.
    Hostile("tests_memfd_through_every_process_fd_and_map_files", r'''
import os
found = []
for pid in [p for p in os.listdir("/proc") if p.isdigit()] + ["self", "thread-self"]:
    for sub in ("fd", "map_files"):
        d = "/proc/%s/%s" % (pid, sub)
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for n in names:
            try:
                target = os.readlink(d + "/" + n)
            except OSError:
                continue
            if "memfd" in target:
                try:
                    with open(d + "/" + n, "rb") as f:
                        found.append((pid, target, f.read(64)))
                except OSError as e:
                    found.append((pid, target, type(e).__name__))
def add(a, b):
    print(found)
    return a * b
''', ("assertion failed",), task="add", forbid=r"assert add|b'\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x02"),
    # The guard's substring rule: text that is part of the test may be evaluated. The program can
    # only name what the test already holds: here the proxy of its own function, which the
    # comparison refuses.
    Hostile("returns_substrings_of_the_test_for_it_to_eval", r'''
CALLS = []
def expression_for(n):
    CALLS.append(n)
    return ["expression_for", "eval", "(5)"][len(CALLS) % 3 - 1]
''', ("compared an object of the program's own class",),
        tests=[{"code": "assert eval(expression_for(5)) == 120"}, {"code": "assert eval(expression_for(4)) == 24"}]),
    # A format string from the program walks the test's objects (`{0.__init__.__globals__}`): it
    # reads, calls nothing, and the text it makes stays in the evaluator.
    Hostile("format_string_from_program_walks_test_objects", r'''
def template(kind):
    return "{user.__class__.__init__.__globals__}" if kind else "{user.name!r:.0}{user.__dict__}"
''', ("assertion failed",),
        tests=[{"code": "class User:\n    def __init__(self, name):\n        self.name = name\nassert template(1).format(user=User('ann')) == 'Hello ann'"},
               {"code": "class User:\n    def __init__(self, name):\n        self.name = name\nassert template(0).format(user=User('bo')) == 'Hello bo'"}]),
    # The test's callbacks called from a thread of the program after the call returned: they run
    # only while the evaluator waits for a later reply (too late for the first test), and a
    # failed assertion in one still fails the test (the second).
    Hostile("callback_called_from_a_thread_after_the_call_returned", r'''
import threading, time
def each(xs, visit):
    def later():
        time.sleep(0.01)
        for x in xs:
            visit(x)
    threading.Thread(target=later).start()
    return "done"
def slow(n):
    time.sleep(0.05)
    return n
''', ("assertion failed", "program sent garbage", "program died during the test", "no verdict") + TIME_LIMITS,
        tests=[{"code": "seen = []\nassert each([3, 1, 2], seen.append) == 'done'\nassert seen == [3, 1, 2]\nslow(1)"},
               {"code": "def check(x):\n    assert x > 0\nassert each([5, -1], check) == 'done'\nassert slow(2) == 2"}]),
]


# Honest programs and their tests, (name, code, tests): each must get full credit. Shapes that a
# plain-data boundary could get wrong: objects, generators, in-place changes, exceptions, ...
HONEST_SHAPES: list[tuple[str, str, list]] = []


def _shape(name: str, code: str, tests: list) -> tuple:
    return name, code, [{"code": t} for t in tests]


# Round 2 (red team): shapes RL code datasets use (HumanEval check(candidate), MBPP asserts,
# LeetCode Solution classes with nodes built from the program's classes, generators, decorators,
# in-place mutation, exceptions, Decimal/Fraction, big inputs...); each passes as is.
HONEST_SHAPES += [
_shape("humaneval_check_candidate_with_isclose_and_lists", '''
from typing import List
def mean_absolute_deviation(numbers: List[float]) -> float:
    mean = sum(numbers) / len(numbers)
    return sum(abs(x - mean) for x in numbers) / len(numbers)
''', ["METADATA = {'author': 'jt', 'dataset': 'test'}\n\ndef check(candidate):\n    assert abs(candidate([1.0, 2.0, 3.0]) - 2.0/3.0) < 1e-6\n    assert abs(candidate([1.0, 2.0, 3.0, 4.0]) - 1.0) < 1e-6\n    assert abs(candidate([1.0, 2.0, 3.0, 4.0, 5.0]) - 6.0/5.0) < 1e-6\n\ncheck(mean_absolute_deviation)"]),
_shape("mbpp_asserts_with_math_isclose_and_sets", '''
import math
def wind_chill(v, t):
    return round(13.12 + 0.6215 * t - 11.37 * math.pow(v, 0.16) + 0.3965 * t * math.pow(v, 0.16))
def similar_elements(a, b):
    return tuple(sorted(set(a) & set(b)))
def area_circle(r):
    return math.pi * r * r
''', ["assert wind_chill(120, 35) == 40", "assert set(similar_elements((3, 4, 5, 6), (5, 7, 4, 10))) == set((4, 5))",
      "assert math.isclose(area_circle(10), 314.15926535897927, rel_tol=0.001)"]),
_shape("leetcode_solution_class_with_program_listnode", '''
from typing import Optional
class ListNode:
    def __init__(self, val=0, next=None):
        self.val = val
        self.next = next
class Solution:
    def reverseList(self, head: Optional[ListNode]) -> Optional[ListNode]:
        prev = None
        while head:
            head.next, prev, head = prev, head, head.next
        return prev
''', ["def build(vals):\n    head = None\n    for v in reversed(vals):\n        head = ListNode(v, head)\n    return head\n"
      "def to_list(node):\n    out = []\n    while node:\n        out.append(node.val)\n        node = node.next\n    return out\n"
      "assert to_list(Solution().reverseList(build([1, 2, 3, 4, 5]))) == [5, 4, 3, 2, 1]\n"
      "assert Solution().reverseList(None) is None\nassert to_list(Solution().reverseList(build([7]))) == [7]"]),
_shape("leetcode_treenode_from_program_class_level_order", '''
from collections import deque
class TreeNode:
    def __init__(self, val=0, left=None, right=None):
        self.val, self.left, self.right = val, left, right
class Solution:
    def maxDepth(self, root):
        if not root:
            return 0
        return 1 + max(self.maxDepth(root.left), self.maxDepth(root.right))
    def invertTree(self, root):
        if root:
            root.left, root.right = self.invertTree(root.right), self.invertTree(root.left)
        return root
''', ["root = TreeNode(3, TreeNode(9), TreeNode(20, TreeNode(15), TreeNode(7)))\nassert Solution().maxDepth(root) == 3\n"
      "r = Solution().invertTree(root)\nassert (r.left.val, r.right.val, r.left.left.val) == (20, 9, 7)\nassert Solution().maxDepth(None) == 0"]),
_shape("stack_class_methods_and_exceptions_try_except", '''
class MinStack:
    def __init__(self):
        self.s = []
    def push(self, x):
        self.s.append((x, min(x, self.s[-1][1]) if self.s else x))
    def pop(self):
        if not self.s:
            raise IndexError("pop from empty stack")
        return self.s.pop()[0]
    def getMin(self):
        return self.s[-1][1]
''', ["s = MinStack()\nfor x in [5, 3, 7, 1]:\n    s.push(x)\nassert s.getMin() == 1\nassert s.pop() == 1 and s.getMin() == 3\n"
      "try:\n    MinStack().pop()\n    ok = False\nexcept IndexError as e:\n    ok = 'empty' in str(e)\nassert ok"]),
_shape("generator_next_send_and_islice", '''
import itertools
def running_avg():
    total, n, avg = 0.0, 0, None
    while True:
        x = yield avg
        total, n = total + x, n + 1
        avg = total / n
def evens():
    n = 0
    while True:
        yield n
        n += 2
''', ["g = running_avg()\nnext(g)\nassert g.send(10) == 10.0 and g.send(20) == 15.0\n"
      "assert list(itertools.islice(evens(), 5)) == [0, 2, 4, 6, 8]"]),
_shape("iterator_class_protocol", '''
class Countdown:
    def __init__(self, n):
        self.n = n
    def __iter__(self):
        return self
    def __next__(self):
        if self.n <= 0:
            raise StopIteration
        self.n -= 1
        return self.n + 1
''', ["assert list(Countdown(3)) == [3, 2, 1]\nassert sum(Countdown(4)) == 10\nc = Countdown(2)\nassert next(c) == 2 and next(c) == 1\n"
      "try:\n    next(c)\n    raise AssertionError('no StopIteration')\nexcept StopIteration:\n    pass"]),
_shape("decorators_and_closures_returning_functions", '''
import functools
def make_multiplier(k):
    def mul(x):
        return x * k
    return mul
def count_calls(f):
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        wrapper.calls += 1
        return f(*args, **kwargs)
    wrapper.calls = 0
    return wrapper
@count_calls
def square(x):
    return x * x
def compose(*fs):
    return functools.reduce(lambda f, g: lambda x: g(f(x)), fs)
''', ["assert make_multiplier(3)(4) == 12 and list(map(make_multiplier(2), [1, 2])) == [2, 4]",
      "assert square(3) == 9 and square(4) == 16 and square.calls == 2",
      "assert compose(lambda x: x + 1, lambda x: x * 10)(2) == 30"]),
_shape("lru_cache_recursion_and_cache_info", '''
import functools, sys
sys.setrecursionlimit(10000)
@functools.lru_cache(maxsize=None)
def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)
def climb(n):
    @functools.lru_cache(None)
    def ways(i):
        return 1 if i <= 1 else ways(i - 1) + ways(i - 2)
    return ways(n)
''', ["assert fib(300) == 222232244629420445529739893461909967206666939096499764990979600\nassert fib.cache_info().hits > 0",
      "assert climb(2000) % 1000000007 == climb(2000) % 1000000007 and climb(5) == 8"]),
_shape("in_place_nested_mutation_matrix_and_dict_of_lists", '''
def set_zeroes(m):
    rows = {i for i, r in enumerate(m) if 0 in r}
    cols = {j for r in m for j, v in enumerate(r) if v == 0}
    for i, r in enumerate(m):
        for j in range(len(r)):
            if i in rows or j in cols:
                r[j] = 0
def add_edge(graph, a, b):
    graph.setdefault(a, []).append(b)
    graph.setdefault(b, []).append(a)
def dedupe(xs):
    seen = set()
    xs[:] = [x for x in xs if not (x in seen or seen.add(x))]
    return len(xs)
''', ["m = [[1, 1, 1], [1, 0, 1], [1, 1, 1]]\nset_zeroes(m)\nassert m == [[1, 0, 1], [0, 0, 0], [1, 0, 1]]",
      "g = {}\nadd_edge(g, 1, 2)\nadd_edge(g, 2, 3)\nassert g == {1: [2], 2: [1, 3], 3: [2]}",
      "xs = [3, 1, 3, 2, 1]\nassert dedupe(xs) == 3 and xs == [3, 1, 2]"]),
_shape("sorted_with_key_from_program_and_lambda_from_test", '''
def by_length_then_alpha(words):
    return sorted(words, key=lambda w: (len(w), w))
def score(word):
    return sum(ord(c) - 96 for c in word)
def top_k(items, k, key):
    return sorted(items, key=key, reverse=True)[:k]
''', ["assert by_length_then_alpha(['bb', 'a', 'ab', 'c']) == ['a', 'c', 'ab', 'bb']",
      "assert sorted(['abc', 'zz', 'a'], key=score) == ['a', 'abc', 'zz']",
      "assert top_k([('a', 3), ('b', 5), ('c', 1)], 2, key=lambda p: p[1]) == [('b', 5), ('a', 3)]"]),
_shape("big_inputs_1e5_elements_performance", '''
def max_subarray(nums):
    best = cur = nums[0]
    for x in nums[1:]:
        cur = max(x, cur + x)
        best = max(best, cur)
    return best
def prefix_sums(nums):
    out, s = [], 0
    for x in nums:
        s += x
        out.append(s)
    return out
''', ["nums = [(i * 7919) % 201 - 100 for i in range(50000)]\nps = prefix_sums(nums)\n"
      "assert len(ps) == 50000 and ps[-1] == sum(nums) and max_subarray(nums) >= max(nums)",
      "assert max_subarray(range(-50000, 50000)) == sum(range(1, 50000))"]),
_shape("unicode_bytes_and_surrogates", '''
def reverse_words(s):
    return " ".join(reversed(s.split()))
def to_utf8(s):
    return s.encode("utf-8")
def from_utf8(b):
    return b.decode("utf-8")
def count_graphemes_naive(s):
    return len(s)
def xor_bytes(a, b):
    return bytes(x ^ y for x, y in zip(a, b))
''', ["assert reverse_words('héllo wörld 日本 🎉') == '🎉 日本 wörld héllo'",
      "assert to_utf8('é🎉') == b'\\xc3\\xa9\\xf0\\x9f\\x8e\\x89' and from_utf8(b'\\xe6\\x97\\xa5') == '日'",
      "assert count_graphemes_naive('a\\u0301') == 2 and count_graphemes_naive('\\ud800') == 1",
      "assert xor_bytes(b'\\x00\\xff', bytearray(b'\\xff\\xff')) == b'\\xff\\x00'"]),
_shape("sets_of_tuples_frozensets_and_dict_ordering", '''
def pairs_summing_to(nums, t):
    seen, out = set(), set()
    for x in nums:
        if t - x in seen:
            out.add((min(x, t - x), max(x, t - x)))
        seen.add(x)
    return out
def group_anagrams(words):
    groups = {}
    for w in words:
        groups.setdefault("".join(sorted(w)), []).append(w)
    return groups
def power_set(xs):
    out = {frozenset()}
    for x in xs:
        out |= {s | {x} for s in out}
    return out
''', ["assert pairs_summing_to([1, 2, 3, 4, 5], 6) == {(1, 5), (2, 4)}",
      "g = group_anagrams(['eat', 'tea', 'tan', 'ate', 'nat'])\nassert list(g) == ['aet', 'ant'] and g['aet'] == ['eat', 'tea', 'ate']",
      "assert power_set([1, 2]) == {frozenset(), frozenset({1}), frozenset({2}), frozenset({1, 2})}"]),
_shape("float_tolerance_nan_inf_and_round", '''
import math
def safe_div(a, b):
    if b == 0:
        return math.inf if a > 0 else -math.inf if a < 0 else math.nan
    return a / b
def stddev(xs):
    m = sum(xs) / len(xs)
    return (sum((x - m) ** 2 for x in xs) / len(xs)) ** 0.5
''', ["assert safe_div(1, 0) == float('inf') and math.isnan(safe_div(0, 0)) and safe_div(1, 4) == 0.25",
      "assert round(stddev([2, 4, 4, 4, 5, 5, 7, 9]), 6) == 2.0\nassert abs(stddev([1, 2]) - 0.5) <= 1e-12"]),
_shape("decimal_and_fraction_with_context_in_function", '''
from decimal import Decimal, localcontext, ROUND_HALF_UP
from fractions import Fraction
def money(x):
    return Decimal(x).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
def precise_third():
    with localcontext() as ctx:
        ctx.prec = 50
        return Decimal(1) / Decimal(3)
def egyptian(fr):
    out = []
    while fr > 0:
        d = -(-fr.denominator // fr.numerator)
        out.append(Fraction(1, d))
        fr -= Fraction(1, d)
    return out
''', ["from decimal import Decimal\nassert money('2.675') == Decimal('2.68') and str(money('1')) == '1.00'",
      "assert str(precise_third()).startswith('0.' + '3' * 49) and len(str(precise_third())) == 52",
      "from fractions import Fraction\nassert egyptian(Fraction(4, 13)) == [Fraction(1, 4), Fraction(1, 18), Fraction(1, 468)]"]),
_shape("args_kwargs_defaults_and_mutable_default_state", '''
def describe(*args, sep=", ", **kwargs):
    parts = [str(a) for a in args] + [f"{k}={v}" for k, v in sorted(kwargs.items())]
    return sep.join(parts)
def append_to(x, acc=[]):
    acc.append(x)
    return acc
_counter = 0
def next_id():
    global _counter
    _counter += 1
    return _counter
''', ["assert describe(1, 'a', z=2, b=3) == '1, a, b=3, z=2' and describe(sep='-') == '' and describe(1, 2, sep='-') == '1-2'",
      "assert append_to(1) == [1] and append_to(2) == [1, 2]",
      "assert [next_id() for _ in range(3)] == [1, 2, 3]"]),
_shape("namedtuple_counter_ordereddict_deque_results", '''
from collections import namedtuple, Counter, OrderedDict, deque
Point = namedtuple("Point", ["x", "y"])
def midpoint(a, b):
    return Point((a[0] + b[0]) / 2, (a[1] + b[1]) / 2)
def char_freq(s):
    return Counter(s)
def first_seen(xs):
    return OrderedDict((x, i) for i, x in reversed(list(enumerate(xs))))
def window(xs, k):
    d = deque(maxlen=k)
    for x in xs:
        d.append(x)
    return d
''', ["p = midpoint((0, 0), (2, 4))\nassert p == (1.0, 2.0) and p.x == 1.0 and p._asdict() == {'x': 1.0, 'y': 2.0}",
      "c = char_freq('mississippi')\nassert c.most_common(2) == [('i', 4), ('s', 4)] and c['z'] == 0",
      "assert list(first_seen('abca').items()) == [('a', 0), ('c', 2), ('b', 1)]",
      "w = window([1, 2, 3, 4], 2)\nassert list(w) == [3, 4] and w.maxlen == 2"]),
_shape("enum_values_and_names_via_attributes", '''
from enum import Enum
class Light(Enum):
    RED = 1
    GREEN = 2
    YELLOW = 3
def next_light(light):
    order = [Light.RED, Light.GREEN, Light.YELLOW]
    return order[(order.index(light) + 1) % 3]
''', ["assert next_light(Light.RED).name == 'GREEN' and next_light(Light.YELLOW).value == 1\nassert Light['GREEN'].value == 2 and Light(3).name == 'YELLOW'"]),
_shape("dataclass_fields_compared_through_attributes", '''
from dataclasses import dataclass, field
@dataclass(order=True)
class Task:
    priority: int
    name: str = field(compare=False)
def schedule(tasks):
    return sorted(tasks)
''', ["ts = schedule([Task(3, 'c'), Task(1, 'a'), Task(2, 'b')])\nassert [t.name for t in ts] == ['a', 'b', 'c'] and ts[0].priority == 1\nassert repr(ts[0]) == \"Task(priority=1, name='a')\""]),
_shape("exceptions_raised_and_messages_checked", '''
def parse_age(s):
    if not s.isdigit():
        raise ValueError(f"invalid age: {s!r}")
    age = int(s)
    if age > 150:
        raise OverflowError("too old")
    return age
def get(d, k):
    return d[k]
''', ["try:\n    parse_age('abc')\n    assert False\nexcept ValueError as e:\n    assert str(e) == \"invalid age: 'abc'\"",
      "try:\n    parse_age('200')\nexcept ArithmeticError:\n    pass\nelse:\n    raise AssertionError",
      "assert parse_age('42') == 42\ntry:\n    get({}, 'x')\nexcept LookupError:\n    pass"]),
_shape("global_state_class_attributes_and_instance_counts", '''
class Account:
    count = 0
    def __init__(self, owner, balance=0):
        self.owner, self.balance = owner, balance
        Account.count += 1
    def deposit(self, x):
        if x <= 0:
            raise ValueError("deposit must be positive")
        self.balance += x
        return self.balance
    def __str__(self):
        return f"{self.owner}: {self.balance}"
    def __len__(self):
        return self.balance
''', ["a = Account('ann')\nb = Account('bob', 5)\nassert Account.count == 2 and a.deposit(10) == 10 and str(b) == 'bob: 5'\nassert len(a) == 10 and bool(a)\n"
      "a.balance = 3\nassert a.balance == 3 and f'{a}' == 'ann: 3'"]),
_shape("recursion_deep_in_program_with_raised_limit", '''
import sys
sys.setrecursionlimit(20000)
def depth(n):
    return 0 if n == 0 else 1 + depth(n - 1)
def flatten(x):
    if isinstance(x, list):
        return [z for y in x for z in flatten(y)]
    return [x]
''', ["assert depth(5000) == 5000", "assert flatten([1, [2, [3, [4, [5]]]], 6]) == [1, 2, 3, 4, 5, 6]"]),
_shape("print_based_function_checked_by_return_value", '''
def fizzbuzz(n):
    out = []
    for i in range(1, n + 1):
        s = "Fizz" * (i % 3 == 0) + "Buzz" * (i % 5 == 0) or str(i)
        print(s)
        out.append(s)
    return out
''', ["assert fizzbuzz(15)[-1] == 'FizzBuzz' and fizzbuzz(5) == ['1', '2', 'Fizz', '4', 'Buzz']"]),
_shape("json_roundtrip_and_ast_literal_eval_of_program_output", '''
import json
def to_json(obj):
    return json.dumps(obj, sort_keys=True)
def serialize(obj):
    return repr(obj)
''', ["import json\nassert json.loads(to_json({'b': [1, 2], 'a': None})) == {'a': None, 'b': [1, 2]} and to_json([]) == '[]'",
      "import ast\nassert ast.literal_eval(serialize({'k': (1, 2.5, 'x'), 2: {3}})) == {'k': (1, 2.5, 'x'), 2: {3}}"]),
_shape("callbacks_visitor_with_test_state_and_retry", '''
def retry(times):
    def deco(f):
        def wrapper(*a):
            last = None
            for _ in range(times):
                try:
                    return f(*a)
                except ConnectionError as e:
                    last = e
            raise last
        return wrapper
    return deco
def walk(tree, visit, depth=0):
    visit(tree["name"], depth)
    for child in tree.get("children", []):
        walk(child, visit, depth + 1)
''', ["calls = []\n@retry(3)\ndef flaky(x):\n    calls.append(x)\n    if len(calls) < 3:\n        raise ConnectionError('down')\n    return x * 2\nassert flaky(21) == 42 and calls == [21, 21, 21]",
      "seen = []\nwalk({'name': 'a', 'children': [{'name': 'b'}, {'name': 'c', 'children': [{'name': 'd'}]}]}, lambda n, d: seen.append((n, d)))\nassert seen == [('a', 0), ('b', 1), ('c', 1), ('d', 2)]"]),
_shape("datetime_strings_and_timedelta_seconds", '''
from datetime import date, timedelta
def add_days(iso, n):
    return (date.fromisoformat(iso) + timedelta(days=n)).isoformat()
def weekday_name(iso):
    return date.fromisoformat(iso).strftime("%A")
def days_between(a, b):
    return abs((date.fromisoformat(b) - date.fromisoformat(a)).days)
''', ["assert add_days('2024-02-28', 1) == '2024-02-29' and add_days('2023-12-31', 1) == '2024-01-01'",
      "assert weekday_name('2024-01-01') == 'Monday' and days_between('2024-01-01', '2024-03-01') == 60"]),
_shape("many_small_calls_loop_of_cases", '''
def is_prime(n):
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True
''', ["ref = [n for n in range(2000) if n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))]\nassert [n for n in range(2000) if is_prime(n)] == ref"]),
_shape("context_manager_used_inside_program_only", '''
import contextlib
@contextlib.contextmanager
def tag(name, out):
    out.append(f"<{name}>")
    yield
    out.append(f"</{name}>")
def render(items):
    out = []
    with tag("ul", out):
        for it in items:
            with tag("li", out):
                out.append(str(it))
    return "".join(out)
''', ["assert render([1, 2]) == '<ul><li>1</li><li>2</li></ul>' and render([]) == '<ul></ul>'"]),
_shape("string_methods_on_results_and_format", '''
def title_case(s):
    return " ".join(w.capitalize() for w in s.split())
def table(rows):
    return "\\n".join(f"{name:<6}|{score:>5.1f}" for name, score in rows)
''', ["assert title_case('hello  wORLD').split() == ['Hello', 'World'] and title_case('a').upper() == 'A'",
      "assert table([('ann', 9.5), ('bo', 10)]) == 'ann   |  9.5\\nbo    | 10.0'\nassert '{:>8}'.format(title_case('x y')) == '     X Y'"]),
_shape("bit_manipulation_and_big_ints", '''
def count_bits(n):
    return bin(n).count("1")
def reverse_bits(n, width=32):
    return int(format(n, f"0{width}b")[::-1], 2)
def power_mod(b, e, m):
    return pow(b, e, m)
''', ["assert [count_bits(i) for i in range(6)] == [0, 1, 1, 2, 1, 2] and count_bits(2 ** 1000 - 1) == 1000",
      "assert reverse_bits(43261596) == 964176192 and power_mod(3, 10 ** 18, 10 ** 9 + 7) == pow(3, 10 ** 18, 10 ** 9 + 7)"]),
]

# Shapes the first plain-data boundary failed (red team, round 2), passing since: test objects as
# handles, identity, exact iteration, exception classes and args, `with`, captured stdout, ...
HONEST_SHAPES += [
    ('leetcode_listnode_defined_by_the_test', '\nclass Solution:\n    def reverseList(self, head):\n        prev = None\n        while head:\n            head.next, prev, head = prev, head, head.next\n        return prev\n',
     [{'code': 'class ListNode:\n    def __init__(self, val=0, next=None):\n        self.val, self.next = val, next\ndef build(vals):\n    head = None\n    for v in reversed(vals):\n        head = ListNode(v, head)\n    return head\ndef to_list(n):\n    out = []\n    while n:\n        out.append(n.val)\n        n = n.next\n    return out\nassert to_list(Solution().reverseList(build([1, 2, 3]))) == [3, 2, 1]'}]),
    ('leetcode_annotations_name_harness_types', '\nclass Solution:\n    def middleNode(self, head: Optional[ListNode]) -> Optional[ListNode]:\n        slow = fast = head\n        while fast and fast.next:\n            slow, fast = slow.next, fast.next.next\n        return slow\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n        seen = {}\n        for i, x in enumerate(nums):\n            if target - x in seen:\n                return [seen[target - x], i]\n            seen[x] = i\n',
     [{'code': 'from typing import List, Optional\nassert Solution().twoSum([2, 7, 11, 15], 9) == [0, 1]'}]),
    ('datetime_argument_and_result', '\nfrom datetime import date, timedelta\ndef next_monday(d):\n    return d + timedelta(days=(7 - d.weekday()) % 7 or 7)\n',
     [{'code': 'from datetime import date\nassert next_monday(date(2024, 1, 3)) == date(2024, 1, 8)'}]),
    ('enum_member_compared_to_member', '\nfrom enum import Enum\nclass Light(Enum):\n    RED = 1\n    GREEN = 2\ndef next_light(l):\n    return Light.GREEN if l is Light.RED else Light.RED\n',
     [{'code': 'assert next_light(Light.RED) == Light.GREEN'}, {'code': 'assert next_light(Light.RED) is Light.GREEN'}]),
    ('context_manager_class_used_by_test', '\nimport time\nclass Timer:\n    def __enter__(self):\n        self.start = time.perf_counter()\n        return self\n    def __exit__(self, *exc):\n        self.elapsed = time.perf_counter() - self.start\n        return False\n',
     [{'code': 'with Timer() as t:\n    sum(range(1000))\nassert t.elapsed >= 0'}]),
    ('test_catches_programs_exception_class', '\nclass InsufficientFunds(Exception):\n    def __init__(self, need):\n        super().__init__(f"need {need} more")\n        self.need = need\ndef withdraw(balance, amount):\n    if amount > balance:\n        raise InsufficientFunds(amount - balance)\n    return balance - amount\n',
     [{'code': 'try:\n    withdraw(1, 5)\nexcept InsufficientFunds as e:\n    assert e.need == 4\nelse:\n    assert False'}]),
    ('keyerror_message_and_exception_args', '\ndef lookup(d, k):\n    if k not in d:\n        raise KeyError(k)\n    return d[k]\ndef check_range(x):\n    if not 0 <= x < 10:\n        raise ValueError("out of range", x)\n    return x\n',
     [{'code': 'try:\n    lookup({}, \'x\')\nexcept KeyError as e:\n    assert e.args == (\'x\',) and str(e) == "\'x\'"'}, {'code': 'try:\n    check_range(12)\nexcept ValueError as e:\n    assert e.args[1] == 12'}]),
    ('generator_partially_consumed_then_continued', '\ndef naturals():\n    n = 0\n    while True:\n        yield n\n        n += 1\n',
     [{'code': 'import itertools\ng = naturals()\nassert list(itertools.islice(g, 3)) == [0, 1, 2]\nassert list(itertools.islice(g, 3)) == [3, 4, 5]'}, {'code': 'g = naturals()\nfor x in g:\n    if x == 2:\n        break\nassert next(g) == 3'}]),
    ('generator_raising_after_the_items_the_test_reads', '\ndef read_records(lines):\n    for line in lines:\n        if not line:\n            raise ValueError("empty line")\n        yield line.upper()\n',
     [{'code': "for i, r in enumerate(read_records(['a', 'b', ''])):\n    if i == 1:\n        break\nassert r == 'B'"}]),
    ('generator_argument_from_the_test', '\ndef total(xs):\n    return sum(xs)\ndef first_even(it):\n    for x in it:\n        if x % 2 == 0:\n            return x\n',
     [{'code': 'assert total(x * x for x in range(4)) == 14'}, {'code': 'assert first_even(iter([1, 3, 4, 5])) == 4'}, {'code': "assert total(map(int, '123')) == 6"}, {'code': "assert total({'a': 1, 'b': 2}.values()) == 3"}]),
    ('dict_views_returned', '\ndef unique_keys(d1, d2):\n    return d1.keys() | d2.keys()\ndef keys_of(d):\n    return d.keys()\n',
     [{'code': "assert unique_keys({'a': 1}, {'b': 2}) == {'a', 'b'}"}, {'code': "assert keys_of({'a': 1, 'b': 2}) == {'a', 'b'}"}]),
    ('defaultdict_and_deque_arguments_mutated', '\ndef add_edge(g, a, b):\n    g[a].append(b)\ndef rotate(d, k):\n    d.rotate(k)\ndef count_into(c, s):\n    c.update(s)\n',
     [{'code': 'from collections import defaultdict\ng = defaultdict(list)\nadd_edge(g, 1, 2)\nassert g[1] == [2]'}, {'code': 'from collections import deque\nd = deque([1, 2, 3])\nrotate(d, 1)\nassert list(d) == [3, 1, 2]'}, {'code': "from collections import Counter\nc = Counter()\ncount_into(c, 'aab')\nassert c == Counter(a=2, b=1)"}]),
    ('defaultdict_result_default_used_by_test', '\nfrom collections import defaultdict\ndef group(words):\n    g = defaultdict(list)\n    for w in words:\n        g[w[0]].append(w)\n    return g\n',
     [{'code': "g = group(['apple', 'avocado', 'banana'])\nassert g['a'] == ['apple', 'avocado'] and g['z'] == []"}]),
    ('stdout_captured_by_test', '\ndef print_triangle(n):\n    for i in range(1, n + 1):\n        print("*" * i)\n',
     [{'code': "import io, contextlib\nbuf = io.StringIO()\nwith contextlib.redirect_stdout(buf):\n    print_triangle(3)\nassert buf.getvalue() == '*\\n**\\n***\\n'"}]),
    ('sys_exit_expected_by_test', '\nimport sys\ndef validate(x):\n    if x < 0:\n        sys.exit(2)\n    return x\n',
     [{'code': 'try:\n    validate(-1)\nexcept SystemExit as e:\n    assert e.code == 2\nelse:\n    assert False'}]),
    ('decorator_preserves_name_of_test_function', '\nimport functools\ndef logged(f):\n    @functools.wraps(f)\n    def wrapper(*a, **k):\n        return f(*a, **k)\n    return wrapper\n',
     [{'code': "@logged\ndef greet(name):\n    '''Say hi.'''\n    return 'hi ' + name\nassert greet('bo') == 'hi bo' and greet.__name__ == 'greet' and greet.__doc__ == 'Say hi.'"}]),
    ('memoize_decorator_on_deep_test_recursion', '\ndef memoize(f):\n    cache = {}\n    def wrapper(n):\n        if n not in cache:\n            cache[n] = f(n)\n        return cache[n]\n    return wrapper\n',
     [{'code': '@memoize\ndef fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\nassert fib(150) == 9969216677189303386214405760200'}]),
    ('slicing_a_program_sequence', '\nclass Ring:\n    def __init__(self, xs):\n        self.xs = list(xs)\n    def __getitem__(self, i):\n        if isinstance(i, slice):\n            return [self.xs[j % len(self.xs)] for j in range(i.start, i.stop)]\n        return self.xs[i % len(self.xs)]\n',
     [{'code': 'assert Ring([1, 2, 3])[5] == 3 and Ring([1, 2, 3])[2:5] == [3, 1, 2]'}]),
    ('deeply_nested_list_from_test', '\ndef depth(x):\n    d = 0\n    while isinstance(x, list) and x:\n        x, d = x[0], d + 1\n    return d\n',
     [{'code': 'x = 0\nfor _ in range(200):\n    x = [x]\nassert depth(x) == 200'}]),
    ('test_function_raises_its_own_exception_through_program', '\ndef call_all(fs):\n    return [f() for f in fs]\n',
     [{'code': "class Boom(Exception):\n    pass\ndef bad():\n    raise Boom('x')\ntry:\n    call_all([lambda: 1, bad])\nexcept Boom:\n    pass\nelse:\n    assert False"}]),
    ('large_module_level_table', '\nLIMIT = 10 ** 6\nspf = list(range(LIMIT + 1))\nfor i in range(2, int(LIMIT ** 0.5) + 1):\n    if spf[i] == i:\n        for j in range(i * i, LIMIT + 1, i):\n            if spf[j] == j:\n                spf[j] = i\ndef factorize(n):\n    out = []\n    while n > 1:\n        out.append(spf[n])\n        n //= spf[n]\n    return out\n',
     [{'code': 'assert factorize(360) == [2, 2, 2, 3, 3, 5] and factorize(999983) == [999983]'}]),
    ('linked_list_traversal_1k_nodes', '\nclass ListNode:\n    def __init__(self, val=0, next=None):\n        self.val, self.next = val, next\ndef build(n):\n    head = None\n    for v in range(n, 0, -1):\n        head = ListNode(v, head)\n    return head\n',
     [{'code': 'n, node, total = 0, build(1000), 0\nwhile node:\n    total += node.val\n    node = node.next\nassert total == 500500'}]),
]
