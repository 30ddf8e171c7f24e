"""Admission control for structured output: a schema or grammar is bounded before it is compiled,
and compiled first where it can do no harm.

Why: llguidance's own limits (`LLParserLimits`: lexer fuel, lexer states, grammar size) bound
mask computation, but not the emptiness checks of regex intersections it runs while validating
a grammar: a ~5 KB schema of `allOf` over 50 patterns keeps a core busy for minutes and grows
without bound (measured: 30 s, 1.8 GB and climbing), and a thread cannot be stopped. So:

1. Before anything is parsed (`check_schema_text`): size in bytes, then nesting depth from a
   scan of the raw text (so `json.loads` and the meta-schema check never recurse deeply).
2. After parsing (`check_schema_tree`): at most `max_nodes` subschemas and `max_refs`
   distinct `$ref`s; and the schema must admit a finite value (`check_finite`): a `$ref` cycle
   with no base case (`{"$ref": "#"}`, a required property that is the object itself) is refused
   up front instead of producing empty, invalid output on every request.
3. The grammar is then validated, and its matcher built and asked for a first mask, in a worker
   process (`CompileSandbox`) with a hard time budget (killed at `compile_timeout_s`), a hard
   memory budget (`RLIMIT_AS` = its size after start-up + `compile_memory_mib`), and killed as
   soon as the caller cancels (the client went away); it runs at a lower CPU priority (nice 10)
   than the server. Only a grammar that passed is compiled in
   the serving process, where it then costs what it cost in the worker. Grammars that failed are
   remembered by content digest (`refused_cache_size`), so repeating a hostile schema costs a
   dictionary lookup.

Errors are `SchemaError`s whose message says which limit was hit; the caller prefixes the field
(`json_schema`, `regex`, `grammar`). Per-tenant caps on concurrent compilations are the server's
(`pijax.serving.admission.TenantGate`); the worker pool bounds them globally.

What it knows nothing about: tenants, the network, the engine.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import resource
import select
import struct
import subprocess
import sys
import threading
import time

log = logging.getLogger(__name__)


WORKER_NICENESS = 10


class SchemaLimitError(Exception):
    """A schema over a limit (`pijax.structured` turns it into its `SchemaError`)."""


class CompileCancelled(Exception):
    """The caller cancelled the compilation (its client went away); the worker was killed."""


@dataclasses.dataclass(frozen=True)
class SchemaLimits:
    max_schema_bytes: int = 65536
    max_depth: int = 32  # JSON nesting of the schema text (objects and arrays)
    max_nodes: int = 4096  # objects and arrays in the schema
    max_refs: int = 256  # distinct $ref targets
    compile_timeout_s: float = 10.0
    compile_memory_mib: int = 1024
    compile_workers: int = 2
    refused_cache_size: int = 1024

    def __post_init__(self):
        for name in ("max_schema_bytes", "max_depth", "max_nodes", "max_refs", "compile_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if not self.compile_timeout_s > 0 or self.compile_memory_mib < 64:
            raise ValueError(
                "compile_timeout_s must be > 0 and compile_memory_mib >= 64; got "
                f"{self.compile_timeout_s}, {self.compile_memory_mib}"
            )


# --- before and after parsing ---------------------------------------------------------------------


def check_text_size(text: str, limits: SchemaLimits, what: str = "of JSON") -> None:
    size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    if size > limits.max_schema_bytes:
        raise SchemaLimitError(
            f"must be at most {limits.max_schema_bytes} bytes {what}; got {size}"
        )


def check_schema_text(text: str, limits: SchemaLimits) -> None:
    """Size, then nesting depth from the raw text (strings skipped), before `json.loads`."""
    check_text_size(text, limits)
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limits.max_depth:
                raise SchemaLimitError(
                    f"must nest at most {limits.max_depth} levels of objects and arrays"
                )
        elif ch in "]}":
            depth -= 1


def check_schema_tree(schema, limits: SchemaLimits) -> None:
    """Node and `$ref` counts (iteratively), then `check_finite`."""
    nodes, refs, stack = 0, set(), [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                refs.add(ref)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        else:
            continue
        nodes += 1
        if nodes > limits.max_nodes:
            raise SchemaLimitError(f"must have at most {limits.max_nodes} objects and arrays")
    if len(refs) > limits.max_refs:
        raise SchemaLimitError(f"must use at most {limits.max_refs} distinct $ref targets")
    check_finite(schema)


_SCALARS = frozenset({"string", "number", "integer", "boolean", "null"})


def check_finite(schema) -> None:
    """Refuse a schema that admits no finite JSON value because of `$ref` recursion.

    A least fixed point over the local `$ref` targets: a target is productive once its schema
    can be met without an unproductive target. Without `type`, or with a scalar type, a schema
    is productive (constraints other than structure are llguidance's to check); an object needs
    its required properties, an array with `minItems > 0` its items; `allOf` needs all, `anyOf`
    and `oneOf` one. Depth is already bounded, so the structural recursion here is shallow."""
    root = schema
    value: dict[str, bool] = {}

    def resolve(ref: str):
        if not ref.startswith("#"):
            return True  # remote refs: llguidance refuses them with its own message
        node = root
        for part in (p for p in ref[1:].split("/") if p):
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return True  # unresolvable: llguidance's error
        return node

    def productive(s) -> bool:
        if isinstance(s, bool):
            return s
        if not isinstance(s, dict):
            return True
        ref = s.get("$ref")
        if isinstance(ref, str) and not value.get(ref, False):
            return False
        if not all(productive(x) for x in _list(s.get("allOf"))):
            return False
        for key in ("anyOf", "oneOf"):
            if key in s and not any(productive(x) for x in _list(s[key])):
                return False
        if "const" in s or s.get("enum"):
            return True
        types = s.get("type")
        types = [types] if isinstance(types, str) else types if isinstance(types, list) else None
        if types is None or any(t in _SCALARS for t in types):
            return True
        ok = False
        if "object" in types:
            props = s.get("properties") if isinstance(s.get("properties"), dict) else {}
            ok = all(productive(props[r]) for r in _list(s.get("required")) if r in props)
        if not ok and "array" in types:
            min_items = s.get("minItems", 0)
            prefix = _list(s.get("prefixItems"))
            ok = not isinstance(min_items, int) or min_items <= 0
            if not ok:
                ok = all(productive(x) for x in prefix[:min_items]) and (
                    min_items <= len(prefix) or productive(s.get("items", True))
                )
        return ok

    refs = sorted(_refs(schema))
    changed = True
    while changed:  # monotone: a target only ever turns productive
        changed = False
        for ref in refs:
            if not value.get(ref) and productive(resolve(ref)):
                value[ref] = changed = True
    if not productive(schema):
        raise SchemaLimitError(
            "admits no finite JSON value: a $ref cycle with no base case (every value would "
            "have to contain itself)"
        )


def _list(x) -> list:
    return x if isinstance(x, list) else []


def _refs(schema) -> set[str]:
    out, stack = set(), [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                out.add(node["$ref"])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return out


# --- the sandbox ----------------------------------------------------------------------------------


def tokenizer_spec(tokenizer, vocab_size: int, eos_token_ids) -> dict | None:
    """What a worker needs to rebuild the `LLTokenizer` (JSON-safe), or None if unknown."""
    from pijax.model.tokenizer import ByteTokenizer

    eos = [int(t) for t in eos_token_ids] or list(tokenizer.eos_token_ids)
    if isinstance(tokenizer, ByteTokenizer):
        return {"kind": "byte", "vocab_size": vocab_size, "eos": eos}
    to_json = getattr(tokenizer, "to_json_str", None)
    if callable(to_json):
        return {"kind": "json", "json": to_json(), "vocab_size": vocab_size, "eos": eos}
    return None


def _ll_tokenizer(spec: dict):
    import llguidance

    from pijax.model.tokenizer import ByteTokenizer
    from pijax.structured import ll_tokenizer_for

    if spec["kind"] == "byte":
        return ll_tokenizer_for(ByteTokenizer(), spec["vocab_size"], spec["eos"])
    return llguidance.LLTokenizer(spec["json"], n_vocab=spec["vocab_size"], eos_token=spec["eos"])


def _send(f, obj) -> None:
    data = json.dumps(obj).encode("utf-8")
    f.write(struct.pack("<I", len(data)) + data)
    f.flush()


def _recv_exact(f, n: int) -> bytes:
    data = f.read(n)
    if data is None or len(data) < n:
        raise EOFError
    return data


def _recv(f):
    (n,) = struct.unpack("<I", _recv_exact(f, 4))
    return json.loads(_recv_exact(f, n))


def _vm_size_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the server process dies, even mid-compile."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass


def _worker_main() -> None:
    """Read a tokenizer spec and a memory budget, then check grammars until stdin closes."""
    import llguidance
    import numpy as np

    _die_with_parent()
    try:  # a hostile grammar may burn this worker's whole budget: serving threads come first
        os.nice(WORKER_NICENESS)
    except OSError:
        pass
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    init = _recv(stdin)
    tok = _ll_tokenizer(init["spec"])
    if os.path.exists("/proc/self/status"):
        limit = _vm_size_bytes() + init["memory_mib"] * (1 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    mask = np.zeros((init["spec"]["vocab_size"] + 31) // 32, dtype=np.int32)
    _send(stdout, {"ready": True})
    while True:
        try:
            grammar = _recv(stdin)
        except EOFError:
            return
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tok)
        if is_error:
            _send(stdout, {"error": messages[0]})
            continue
        matcher = llguidance.LLMatcher(tok, grammar, log_level=0)
        if not matcher.is_error():
            matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
        _send(stdout, {"error": matcher.get_error() if matcher.is_error() else ""})


class _Worker:
    def __init__(self, spec: dict, memory_mib: int):
        env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
        self.proc = subprocess.Popen(  # noqa: S603 (our own interpreter and module)
            [sys.executable, "-m", "pijax.structured_limits"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        _send(self.proc.stdin, {"spec": spec, "memory_mib": memory_mib})
        self.generation = 0

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass

    def wait_readable(self, timeout: float) -> bool:
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return bool(r)


class CompileSandbox:
    """A few worker processes that try grammars under hard time and memory budgets.

    `check(grammar, cancel)` returns llguidance's error message ('' when the grammar is fine),
    or raises `SchemaLimitError` (over budget: the worker was killed) or `CompileCancelled`.
    Blocking; thread-safe; at most `compile_workers` grammars are tried at once."""

    POLL_S = 0.05
    START_TIMEOUT_S = 120.0

    def __init__(self, spec: dict, limits: SchemaLimits):
        self.spec = spec
        self.limits = limits
        self._idle: collections.deque[_Worker | None] = collections.deque(
            [None] * limits.compile_workers
        )
        self._cond = threading.Condition()
        self._live: set[_Worker] = set()  # started and not yet killed, idle or busy
        self._generation = 0  # close() starts a new one; older workers are abandoned
        # digest -> (over a limit?, message): refused grammars cost a lookup the next time
        self._refused: collections.OrderedDict[str, tuple[bool, str]] = collections.OrderedDict()
        self.num_killed = 0

    def check(self, grammar: str, cancel: threading.Event | None = None) -> str:
        digest = hashlib.sha256(grammar.encode("utf-8")).hexdigest()
        with self._cond:
            known = self._refused.get(digest)
        if known is not None:
            over_limit, message = known
            if over_limit:
                raise SchemaLimitError(message)
            return message
        worker = self._acquire(cancel)
        try:
            worker = worker if worker is not None and worker.alive() else self._start(cancel)
            _send(worker.proc.stdin, grammar)
            reply = self._wait(worker, self.limits.compile_timeout_s, cancel)
            if reply["error"]:
                self._remember(digest, False, reply["error"])
            return reply["error"]
        except SchemaLimitError as e:
            worker = self._discard(worker)
            self._remember(digest, True, str(e))
            raise
        except (CompileCancelled, OSError, EOFError, ValueError):
            worker = self._discard(worker)
            raise
        finally:
            with self._cond:
                if worker is not None and self._abandoned(worker):
                    worker = None
                self._idle.append(worker)
                self._cond.notify()

    def close(self) -> None:
        """Kill every worker, busy ones too (their callers get `CompileCancelled`). The sandbox
        stays usable: later checks start new workers."""
        with self._cond:
            self._generation += 1
            workers, self._live = list(self._live), set()
        for w in workers:
            w.kill()

    def _acquire(self, cancel) -> _Worker | None:
        with self._cond:
            while not self._idle:
                if cancel is not None and cancel.is_set():
                    raise CompileCancelled
                self._cond.wait(self.POLL_S)
            return self._idle.pop()  # a started worker first

    def _start(self, cancel) -> _Worker:
        with self._cond:
            worker = _Worker(self.spec, self.limits.compile_memory_mib)
            worker.generation = self._generation
            self._live.add(worker)
        try:
            reply = self._wait(worker, self.START_TIMEOUT_S, cancel, starting=True)
        except BaseException:
            self._discard(worker)
            raise
        if not reply.get("ready"):
            self._discard(worker)
            raise OSError("the grammar worker did not start")
        return worker

    def _wait(self, worker: _Worker, timeout_s: float, cancel, starting: bool = False) -> dict:
        deadline = time.monotonic() + timeout_s
        while not worker.wait_readable(self.POLL_S):
            if (cancel is not None and cancel.is_set()) or self._abandoned(worker):
                raise CompileCancelled
            if not worker.alive():
                break
            if time.monotonic() > deadline:
                if starting:
                    raise OSError("the grammar worker did not start in time")
                raise SchemaLimitError(
                    f"exceeds the compile time budget ({self.limits.compile_timeout_s:g} s)"
                )
        try:
            return _recv(worker.proc.stdout)
        except (EOFError, OSError, ValueError):
            if self._abandoned(worker):
                raise CompileCancelled from None
            if starting:
                raise OSError("the grammar worker exited while starting") from None
            raise SchemaLimitError(
                f"exceeds the compile memory budget ({self.limits.compile_memory_mib} MiB)"
            ) from None

    def _abandoned(self, worker: _Worker) -> bool:
        return worker.generation != self._generation

    def _discard(self, worker: _Worker | None) -> None:
        if worker is not None:
            worker.kill()
            self.num_killed += 1
            with self._cond:
                self._live.discard(worker)
        return None

    def _remember(self, digest: str, over_limit: bool, message: str) -> None:
        with self._cond:
            self._refused[digest] = (over_limit, message)
            while len(self._refused) > self.limits.refused_cache_size:
                self._refused.popitem(last=False)


if __name__ == "__main__":
    _worker_main()
