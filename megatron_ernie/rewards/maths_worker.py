"""The maths worker processes: the only place Hugging Face's Math-Verify runs (its timeouts are
signal-based and main-thread only, and sympy can hang or eat memory on `9^{9^{9^9}}`): a pool of
child Pythons, each request under a hard time limit (a worker that runs over is killed and
replaced at once), a memory limit, started ahead of the first request."""
from __future__ import annotations

import atexit
import json
import os
import queue
import re
import select
import subprocess
import sys
import threading
import time

# ---------------------------------------------------------------------------------------------
# The worker process (the library runs only here)
# ---------------------------------------------------------------------------------------------

class SympyWorkerError(RuntimeError):
    """The worker process could not be started or talked to (not a verdict on the answer)."""


_LIB: dict = {}


def _lib_load() -> None:
    """Import the library in the worker, quieten it, and warm its parser (the first ANTLR parse
    and the first `verify` cost ~0.3 s)."""
    import logging

    import sympy
    from latex2sympy2_extended.latex2sympy2 import ConversionConfig, NormalizationConfig, latex2sympy, normalize_latex
    from math_verify import grader, parser
    from math_verify.grader import should_treat_as_complex, verify

    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)
    grader.TIMEOUT_WARNING_SHOWN = parser.TIMEOUT_WARNING_SHOWN = True  # our hard kill is the limit
    _LIB.update(
        sympy=sympy, latex2sympy=latex2sympy, normalize_latex=normalize_latex, verify=verify,
        complex=should_treat_as_complex, get_last_eq=parser.get_last_eq,
        # units off: the library strips a trailing "c", "t", "ab" … after any number ("2ab" → 2);
        # ours are applied before. boxed off: we extracted already.
        norm=NormalizationConfig(basic_latex=True, units=False, malformed_operators=True, nits=True,
                                 boxed="none", equations=False),
        conv=ConversionConfig(), cache={})
    _lib_equal("\\frac{1}{2}+x", "x+0.5", {}, {}, {"tol": 1e-4, "abs_tol": 1e-9, "pct_equiv": True})


_IMAG = re.compile(r"(?<![a-zA-Z\\])i(?![a-zA-Z])")


def _lib_parse(text: str):
    cache = _LIB["cache"]
    if text in cache:
        return cache[text]
    sympy, latex2sympy = _LIB["sympy"], _LIB["latex2sympy"]
    norm = _LIB["normalize_latex"](text, _LIB["norm"])
    kw = dict(is_real=not _LIB["complex"](norm), convert_degrees=False, normalization_config=None,
              conversion_config=_LIB["conv"])
    try:
        expr = latex2sympy(norm, **kw)
    except Exception:  # noqa: BLE001 - as the library's parse: retry on the last part of a chain
        last = _LIB["get_last_eq"](norm)
        if last == norm:
            raise
        expr = latex2sympy(last, **kw)
    if _IMAG.search(norm) and hasattr(expr, "free_symbols"):
        imag = {s: sympy.I for s in expr.free_symbols if getattr(s, "name", "") == "i"}
        if imag:
            expr = expr.subs(imag)
    if len(cache) > 512:
        cache.clear()
    cache[text] = expr
    return expr


def _is_scalar(x) -> bool:
    sympy = _LIB["sympy"]
    return isinstance(x, sympy.Expr) and not isinstance(x, (sympy.MatrixBase,)) and x.is_number is True


def _exact_mismatch(a, b) -> bool:
    """The library calls two closed forms equal when they agree to 15 digits (`1/2004!` and
    `1/2006!`): with no decimals on either side, equal must mean equal."""
    sympy = _LIB["sympy"]
    if not (_is_scalar(a) and _is_scalar(b)) or a.has(sympy.Float) or b.has(sympy.Float):
        return False
    va, vb = sympy.N(a, 40), sympy.N(b, 40)
    scale = max(abs(va), abs(vb))
    return bool(scale != 0 and abs(va - vb) > scale * sympy.Float("1e-30"))


def _tolerant(a, b, tol: float, abs_tol: float) -> bool:
    """Our tolerance: a decimal against a closed form (π vs 3.1416 with tolerance 1e-4)."""
    sympy = _LIB["sympy"]
    if not (_is_scalar(a) and _is_scalar(b)) or not (a.has(sympy.Float) or b.has(sympy.Float)):
        return False
    va, vb = sympy.N(a, 30), sympy.N(b, 30)
    if not (va.is_finite and vb.is_finite):
        return False
    return bool(abs(va - vb) <= max(abs_tol, tol * max(abs(va), abs(vb))))


def _as_vector(x):
    sympy = _LIB["sympy"]
    if isinstance(x, sympy.MatrixBase) and 1 in x.shape:
        return list(x)
    if isinstance(x, sympy.Tuple):
        return list(x.args)
    if isinstance(x, sympy.Interval) and x.left_open and x.right_open:
        return [x.start, x.end]
    return None


def _lib_equal(p: str, g: str, pf: dict, gf: dict, o: dict) -> tuple[bool, str]:
    sympy, verify = _LIB["sympy"], _LIB["verify"]
    P, G = _lib_parse(p), _lib_parse(g)
    variants = [(P, G)]
    if pf.get("pct") != gf.get("pct") and o.get("pct_equiv", True):
        variants.append((P / 100 if pf.get("pct") else P, G / 100 if gf.get("pct") else G))
    if pf.get("deg") != gf.get("deg"):
        for a, b in list(variants):
            if pf.get("deg") and getattr(b, "has", lambda *_: False)(sympy.pi):
                variants.append((a * sympy.pi / 180, b))
            if gf.get("deg") and getattr(a, "has", lambda *_: False)(sympy.pi):
                variants.append((a, b * sympy.pi / 180))
    for a, b in variants:
        if verify(b, a, float_rounding=6, numeric_precision=15, strict=True,
                  allow_set_relation_comp=True, timeout_seconds=None):
            if not _exact_mismatch(a, b):
                return True, "library"
        elif _tolerant(a, b, o["tol"], o["abs_tol"]):
            return True, "tolerance"
        # entry-wise with our tolerance: matrices of one shape, or a vector and the tuple of its entries
        if isinstance(a, sympy.MatrixBase) and isinstance(b, sympy.MatrixBase):
            va, vb = (list(a), list(b)) if a.shape == b.shape else (None, None)
        else:
            va, vb = _as_vector(a), _as_vector(b)
            if isinstance(a, sympy.MatrixBase) == isinstance(b, sympy.MatrixBase):
                va = vb = None  # two tuples / intervals: compared in the caller, element by element
        if va is not None and vb is not None and len(va) == len(vb):
            if all(verify(y, x, timeout_seconds=None) or _tolerant(x, y, o["tol"], o["abs_tol"])
                   for x, y in zip(va, vb)):
                return True, "entry-wise"
    return False, "different"


def _worker_handle(req: dict) -> dict:
    out = []
    for p, g, pf, gf in req["pairs"]:
        try:
            out.append(list(_lib_equal(p, g, pf, gf, req)))
        except MemoryError:
            out.append([False, "error: MemoryError"])
        except Exception as e:  # noqa: BLE001 - any failure is "not shown equal"
            out.append([False, f"error: {type(e).__name__}: {e}"[:200]])
    return {"results": out}


def _worker_main() -> None:
    """Entry point of the worker process: one JSON request per stdin line, one reply per line."""
    try:
        import resource
        limit = int(os.environ.get("MEGATRON_ERNIE_SYMPY_MEM_MB", "2048")) << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):
        pass
    sys.setrecursionlimit(20000)
    out = sys.stdout
    sys.stdout = sys.stderr  # a stray print inside the library must not corrupt the protocol
    _lib_load()  # before "ready", so the first request does not pay for the import
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        try:
            reply = _worker_handle(json.loads(line))
        except Exception as e:  # noqa: BLE001
            reply = {"results": [], "error": f"{type(e).__name__}: {e}"[:300]}
        out.write(json.dumps(reply) + "\n")
        out.flush()


def _readable(fd: int, timeout_s: float) -> bool:
    # poll, not select: select() fails on descriptors >= 1024, which a long-lived trainer reaches
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP)
    return bool(poller.poll(max(0, int(timeout_s * 1000))))


class _Worker:
    """One child Python process; talks newline-delimited JSON over pipes."""

    def __init__(self, startup_timeout_s: float, memory_mb: int):
        env = dict(os.environ, MEGATRON_ERNIE_SYMPY_MEM_MB=str(memory_mb), PYTHONPATH=os.pathsep.join(
            [os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))]
            + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from megatron_ernie.rewards.maths_worker import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, bufsize=0)
        self.startup_timeout_s = startup_timeout_s
        self.ready = False
        self._buf = b""

    def _readline(self, timeout_s: float) -> bytes | None:
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not _readable(fd, left):
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise SympyWorkerError(f"maths worker exited (code {self.proc.poll()})")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def request(self, payload: dict, timeout_s: float) -> dict | None:
        """The reply, or None when it did not come within timeout_s (the caller kills us)."""
        if not self.ready:
            if self._readline(self.startup_timeout_s) is None:
                raise SympyWorkerError(f"maths worker not ready after {self.startup_timeout_s}s")
            self.ready = True
        try:
            self.proc.stdin.write((json.dumps(payload) + "\n").encode())
        except (BrokenPipeError, OSError) as e:
            raise SympyWorkerError(f"maths worker pipe closed: {e}") from None
        line = self._readline(timeout_s)
        if line is None:
            return None
        try:
            return json.loads(line)
        except ValueError:
            raise SympyWorkerError(f"maths worker sent garbage: {line[:100]!r}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            f.close()


class SympyPool:
    """Up to `max_workers` worker processes (each runs Math-Verify) shared by any number of
    threads. A request that runs past its time limit kills its worker; a replacement is spawned at
    once, and `prestart()` spawns them ahead of the first request, so their ~1 s import is off the
    critical path."""

    def __init__(self, max_workers: int = 2, startup_timeout_s: float = 60.0, memory_mb: int = 2048):
        self.max_workers = max(1, int(max_workers))
        self.startup_timeout_s = startup_timeout_s
        self.memory_mb = memory_mb
        self._idle: queue.LifoQueue[_Worker] = queue.LifoQueue()
        self._lock = threading.Lock()
        self._count = 0
        self._closed = False
        self.restarts = 0

    def prestart(self) -> None:
        """Spawn the workers now (they import the library while the caller goes on)."""
        with self._lock:
            while not self._closed and self._count < self.max_workers:
                try:
                    self._idle.put(_Worker(self.startup_timeout_s, self.memory_mb))
                except OSError:
                    return
                self._count += 1

    def _checkout(self) -> _Worker:
        while True:
            with self._lock:
                if self._closed:
                    raise SympyWorkerError("maths worker pool is closed")
                if self._idle.empty() and self._count < self.max_workers:
                    self._count += 1
                    try:
                        return _Worker(self.startup_timeout_s, self.memory_mb)
                    except OSError as e:
                        self._count -= 1
                        raise SympyWorkerError(f"cannot start maths worker: {e}") from None
            try:
                return self._idle.get(timeout=0.5)  # re-check: a failed restart frees a slot
            except queue.Empty:
                continue

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            self.restarts += 1
            if self._closed:
                self._count -= 1
                return
            try:
                self._idle.put(_Worker(self.startup_timeout_s, self.memory_mb))
            except OSError:
                self._count -= 1  # the next caller will try to start one again

    def compare_pairs(self, pairs: list, options: dict, timeout_s: float) -> dict:
        """{"results": [[equal, how], …], "timeout": bool} for (pred, gold, pred_flags, gold_flags)."""
        worker = self._checkout()
        try:
            reply = worker.request({"pairs": pairs, **options}, timeout_s)
        except BaseException:
            self._replace(worker)
            raise
        if reply is None:
            self._replace(worker)
            return {"results": [[False, "timeout"]] * len(pairs), "timeout": True}
        if self._closed:
            worker.kill()
        else:
            self._idle.put(worker)
        reply["timeout"] = False
        return reply

    def close(self) -> None:
        with self._lock:
            self._closed = True
        while not self._idle.empty():
            self._idle.get().kill()


_pool: SympyPool | None = None
_pool_pid = 0
_pool_lock = threading.Lock()


def default_pool() -> SympyPool:
    """The process-wide pool every math source shares (created on first use, and again in a
    forked child: the parent's worker pipes must not be shared)."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool, _pool_pid = SympyPool(), os.getpid()
            atexit.register(_pool.close)
        return _pool


