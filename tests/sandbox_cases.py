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
    _send(("ready", CATALOG))
    while True:
        msg = _get(_read(int.from_bytes(_read(4), "big")), 0)[0]
        if msg[0] == "exit":
            _os._exit(0)
        obj = HANDLES[msg[1]]
        try:
            if msg[0] == "call":
                _send(("ok", obj(*msg[2], **msg[3]), [msg[2][i] for i in msg[4]], [msg[3][k] for k in msg[5]]))
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
""", ("runtime error: TypeError", "compared an object of the program's own class"),
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
""", ("assertion failed",),
        tests=[{"code": "assert sort_by([3, 1, 2], key=lambda x: -x) == [3, 2, 1]"},
               {"code": "def check(x):\n    assert x == 5\nassert run_with(check)"}]),
    Hostile("callback_numbers_never_given", r"""
import sys
G = sys._getframe(1).f_globals  # the harness module that runs us: its own frame writer
def sort_by(xs, key):
    for n in (7, -1, 10 ** 6):  # call test functions the program was never given
        G["send"](4, ("callback", n, [1], {}), G["Ref"])
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


# Honest programs and their tests, (name, code, tests): each must get full credit. Shapes that a
# plain-data boundary could get wrong: objects, generators, in-place changes, exceptions, ...
HONEST_SHAPES: list[tuple[str, str, list]] = []
