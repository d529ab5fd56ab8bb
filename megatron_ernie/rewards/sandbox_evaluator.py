"""Assertion tests, the evaluator's side (standard library only; see `sandbox_calls` for the design):
run the test code against the program's names, each a `ProgramObject` whose uses cross to the
candidate as plain data, serve the program's uses of the test's own objects, and write the verdict."""
import builtins
import os
import sys
import types

try:  # inside the sandbox: top-level modules beside this one (see sandbox_runner.command)
    import sandbox_calls as calls
    import sandbox_codec as codec
except ImportError:  # imported as part of the package (tests, tools)
    from megatron_ernie.rewards import sandbox_calls as calls
    from megatron_ernie.rewards import sandbox_codec as codec

Ref, TestRef, NotPlain, encode = codec.Ref, codec.TestRef, codec.NotPlain, codec.encode
classify, rebuild_exception, exception_class, builtin_base = calls.classify, calls.rebuild_exception, \
    calls.exception_class, calls.builtin_base
METADATA, is_plain = calls.METADATA, calls.is_plain
_BUILTIN_NAMES = frozenset(vars(builtins))
# never imported for a program: side effects, `__main__` scripts, or objects equal to anything
_UNIMPORTABLE = frozenset({"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "webbrowser",
                           "unittest", "doctest", "ctypes", "pdb", "venv", "lib2to3", "ensurepip", "site", "runpy"})
_MUTABLE = (list, dict, set, bytearray)


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
                if type(name) is not str or (name.startswith("_") and not (op == "getattr" and name in METADATA)):
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
            self.send(("raised", type(e).__name__, builtin_base(e), _safe_str(e, 1000),
                       e.args if is_plain(e.args) else None, token))


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
        if name in METADATA:  # the program object's own name and doc, not this class's
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
