"""The fast decoder's native token step: assistant/kernels/gemma_step.cpp, built here and called
through ctypes.

The C++ step streams each bf16 weight row once, widened to fp32 in AVX2 registers, with the same
roundings as the compiled torch step (assistant.fast_math); one call per token replaces the
graph's hundreds of operations. On CPUs with AVX512-BF16 (AMD Zen 4, Intel Sapphire Rapids) the
products multiply bf16 pairs in hardware instead (`check_instructions` tells which): the same
exact products and fp32 sums, in fewer instructions. It is built on first use with the system's
C++ compiler (g++ or c++, a few seconds) into the cache directory, keyed by the source's hash,
and loaded into this process, where its OpenMP calls share torch's own libgomp. Where it cannot be built or run (no
compiler, a CPU without AVX2 and FMA, weights that are not bf16) `NativeUnavailable` says why and
the decoder keeps its compiled torch step.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from .config import cache_dir
from .fast_weights import DecoderShape, DecoderWeights, LoraLayout

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "kernels" / "gemma_step.cpp"
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared", "-std=c++17")
BUILD_TIMEOUT_S = 120


class NativeUnavailable(RuntimeError):
    """The native step cannot run here; the message says why."""


class _Shape(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in
                ("hidden", "heads", "kv_heads", "head_dim", "intermediate", "layers", "window", "rank", "norm_width")]
    _fields_ += [("eps", ctypes.c_float), ("scaling", ctypes.c_float), ("has_lora", ctypes.c_int64)]


_library: ctypes.CDLL | None = None
_library_lock = threading.Lock()


def library() -> ctypes.CDLL:
    """The built and loaded kernel library (built once per source version and machine)."""
    global _library
    with _library_lock:
        if _library is None:
            _require_cpu()
            _library = _declare(ctypes.CDLL(str(_built())))
        return _library


def _require_cpu() -> None:
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        raise NativeUnavailable(f"the native step needs an x86-64 CPU with AVX2 and FMA (torch reports {capability})")


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return name
    raise NativeUnavailable("no C++ compiler (g++ or c++) to build the native step; set CXX to one")


def _built() -> Path:
    """The shared library for this source and these flags, compiled if the cache lacks it."""
    compiler = _compiler()
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join((compiler, *FLAGS)).encode()).hexdigest()[:16]
    target = cache_dir() / "native" / f"gemma_step-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        partial = Path(work) / target.name
        try:
            result = subprocess.run([compiler, *FLAGS, "-o", str(partial), str(SOURCE)], capture_output=True,
                                    text=True, timeout=BUILD_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise NativeUnavailable(f"building the native step failed: {err}") from err
        if result.returncode != 0:
            raise NativeUnavailable(f"building the native step failed: {result.stderr.strip()[-600:]}")
        os.replace(partial, target)  # atomic: a concurrent build never loads half a file
    log.info("built the native decoding step: %s", target)
    return target


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.gemma_step.restype = ctypes.c_int
    lib.gemma_step.argtypes = [ctypes.POINTER(_Shape), p, p, p, p, i64, i64, i64, p, p, i64, p, p, i64, p, f32,
                               f32, p, p, p]
    lib.bf16_products.restype = None
    lib.bf16_products.argtypes = [p, i64, i64, p, i64, p]
    lib.screen_bounds.restype = None
    lib.screen_bounds.argtypes = [p, p, p, p, p, i64, i64, p, p, p, p, i64, p]
    lib.screen_rows_left.restype = None
    lib.screen_rows_left.argtypes = [p, p, p, p, p, i64, i64, p, p, p, p, i64, p, p]
    lib.set_threads.restype = None
    lib.set_threads.argtypes = [ctypes.c_int]
    lib.set_features.restype = None
    lib.set_features.argtypes = [ctypes.c_int]
    lib.features.restype = ctypes.c_int
    lib.features.argtypes = []
    return lib


def check_instructions() -> str:
    """The instructions the step's products and the whole-vocabulary check multiply with on this
    CPU: "AVX512-BF16" (bf16 pairs in hardware) where the CPU has them, else "AVX2" (rows widened
    to fp32)."""
    return "AVX512-BF16" if library().features() & 1 else "AVX2"


def screen_instructions() -> str:
    """The instructions the check's int8 screen (assistant.fast_screen) sums with on this CPU:
    "AMX-INT8" (tile products; for widths that are a multiple of 64 and up to 16 states, else
    the next) where the CPU has it, Linux grants the tiles and AMX and AVX-512 are allowed,
    "AVX512-VNNI" (vpdpbusd) where it has that and AVX-512 is allowed, else "AVX2"."""
    features = library().features()
    return "AMX-INT8" if features & 4 else "AVX512-VNNI" if features & 2 else "AVX2"


_allowed = {"avx512": True, "amx": True}  # the kernels' defaults: every extension the CPU has


def allow_avx512_bf16(allowed: bool) -> None:
    """Let the kernels use AVX-512 where the CPU has it (the default) or not (to compare): AVX512-BF16
    for the products, AVX512-VNNI (and AMX, which needs it) for the screen."""
    _allow(avx512=allowed)


def allow_amx(allowed: bool) -> None:
    """Let the screen use AMX where the CPU has it (the default) or not (to compare)."""
    _allow(amx=allowed)


def _allow(**changes: bool) -> None:
    _allowed.update(changes)
    library().set_features(int(_allowed["avx512"]) | int(_allowed["amx"]) << 1)


def _ptr(tensor: torch.Tensor) -> int:
    return tensor.data_ptr()


class NativeStep:
    """`FastDecoder`'s token step in C++ for one decoder shape: `step` runs a token through the
    model and stores its keys and values in the cache; `products` scores the whole vocabulary
    for the check. Tensors must be bf16 (weights), fp32 (norms, cache) and contiguous."""

    def __init__(self, shape: DecoderShape, layout: LoraLayout, cos: torch.Tensor, sin: torch.Tensor):
        if cos.dtype != torch.bfloat16:
            raise NativeUnavailable(f"the native step runs bf16 models, not {cos.dtype}")
        if shape.head_dim % 8 or shape.hidden % 8:
            raise NativeUnavailable("the native step needs head and hidden sizes that are multiples of 8")
        self.lib = library()
        self.shape, self.layout = shape, layout
        self.cos, self.sin = cos.contiguous(), sin.contiguous()
        self._shape = _Shape(hidden=shape.hidden, heads=shape.heads, kv_heads=shape.kv_heads, head_dim=shape.head_dim,
                             intermediate=shape.intermediate, layers=shape.layers, window=shape.window,
                             rank=layout.rank, norm_width=max(shape.hidden, shape.head_dim), eps=shape.eps,
                             scaling=shape.scaling, has_lora=int(any(layout.layers)))
        self._lora_layers = (ctypes.c_uint8 * shape.layers)(*map(int, layout.layers))
        self._sliding = (ctypes.c_uint8 * shape.layers)(*map(int, shape.sliding))
        # The bf16 value of the embedding scale, as the reference multiplies by a bf16 tensor.
        self._embed_scale = float(torch.tensor(shape.embed_scale, dtype=torch.bfloat16))
        self._pointers: dict[int, tuple[DecoderWeights, ctypes.Array]] = {}

    def _weight_pointers(self, weights: DecoderWeights) -> ctypes.Array:
        """The weights' data pointers in `DecoderWeights.tensors()` order (kept with the weights, so
        neither their tensors nor their id can be freed and reused while the pointers live)."""
        cached = self._pointers.get(id(weights))
        if cached is None:
            tensors = weights.tensors()
            for tensor in tensors:
                if not tensor.is_contiguous() or tensor.dtype not in (torch.bfloat16, torch.float32):
                    raise NativeUnavailable("the native step needs contiguous bf16 weights")
            cached = (weights, (ctypes.c_void_p * len(tensors))(*map(_ptr, tensors)))
            self._pointers[id(weights)] = cached
        return cached[1]

    def step(self, weights: DecoderWeights, head: torch.Tensor, token: int, position: int, keys: torch.Tensor,
             values: torch.Tensor, seen: torch.Tensor, penalty: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run `token` at `position` scoring the rows of `head` (bf16, contiguous) and store its keys
        and values in `keys`/`values` (layers, kv_heads, positions, head_dim; fp32): (fp32 logits
        with the penalty on the `seen` rows, the greedy row, the final hidden state (1, hidden) bf16)."""
        rows = head.shape[0]
        logits = torch.empty(rows, dtype=torch.float32)
        best = torch.zeros(1, dtype=torch.int64)
        hidden = torch.empty(1, self.shape.hidden, dtype=torch.bfloat16)
        if seen.dtype not in (torch.bool, torch.uint8):
            raise TypeError(f"seen must be bool, not {seen.dtype}")
        seen = seen.contiguous()  # one byte per row, 0 or 1, as the kernel reads it
        self.lib.set_threads(torch.get_num_threads())
        status = self.lib.gemma_step(
            ctypes.byref(self._shape), self._weight_pointers(weights), self._lora_layers, self._sliding,
            _ptr(head), rows, int(token), int(position), _ptr(keys), _ptr(values), keys.shape[2],
            _ptr(self.cos), _ptr(self.sin), self.cos.shape[1], _ptr(seen), float(penalty), self._embed_scale,
            _ptr(logits), _ptr(best), _ptr(hidden))
        if status:
            raise ValueError(f"position {position} is past the decoder's {keys.shape[2]} cache positions")
        return logits, best[0], hidden

    def products(self, embed: torch.Tensor, states: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out (rows, n) = embed (rows, width; bf16) x states (n, width; fp32)^T, rounded to bf16 values.
        With AVX512-BF16 (`check_instructions`) and states that are bf16 values, as hidden states
        are, the CPU multiplies the bf16 pairs itself; the sums are fp32 either way."""
        states = states.contiguous()
        self.lib.set_threads(torch.get_num_threads())
        self.lib.bf16_products(_ptr(embed), embed.shape[0], embed.shape[1], _ptr(states), states.shape[0], _ptr(out))
        return out

    def screen_bounds(self, rows, states, out: torch.Tensor) -> torch.Tensor:
        """out (n, rows): upper bounds on every row's check logit for each of n states, from the int8
        copies in `rows` and `states` (assistant.fast_screen's ScreenedRows and ScreenedStates)."""
        self.lib.set_threads(torch.get_num_threads())
        self.lib.screen_bounds(*self._screen_operands(rows, states), _ptr(out))
        return out

    def screen_rows_left(self, rows, states, floors: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out (rows,) uint8: 1 where a row's bound (screen_bounds) reaches floors[j] (fp32) for some state j."""
        floors = floors.float().contiguous()  # held here: a temporary's memory would be freed before the call
        self.lib.set_threads(torch.get_num_threads())
        self.lib.screen_rows_left(*self._screen_operands(rows, states), _ptr(floors), _ptr(out))
        return out

    @staticmethod
    def _screen_operands(rows, states) -> tuple:
        return (_ptr(rows.codes), _ptr(rows.sums), _ptr(rows.scale), _ptr(rows.error), _ptr(rows.norm),
                rows.codes.shape[0], rows.codes.shape[1], _ptr(states.codes), _ptr(states.scale),
                _ptr(states.code_term), _ptr(states.error), states.codes.shape[0])
