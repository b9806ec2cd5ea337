"""Records of the Triton kernel variants the wrappers can launch, for ahead-of-time checks.

A kernel module exposes ``aot_variants() -> List[KernelVariant]``; ``python -m
benchmarks.static.aot`` compiles every record for several GPU architectures without a GPU and reads
registers, spills and the instruction count of each hot loop from the compiled code.

A record is made from the very launch a wrapper would issue (:func:`launch_variant` takes the
wrapper's positional arguments and keyword meta-parameters), so the wrapper and the check
share one source of truth: tensors are replaced by :class:`AotTensor` stand-ins and the
signature, constexprs and alignment attributes are derived by Triton's own specialisation
rule, as ``fn[grid](*args, **meta)`` would derive them on a device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

# Options of a launch that are not kernel parameters (the rest of ``meta`` binds to them).
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion")


@dataclass(frozen=True)
class AotTensor:
    """Stand-in for a tensor argument: its dtype and whether its address is 16-byte aligned.

    Triton specialises a pointer on ``data_ptr() % 16 == 0``; a fresh allocation is aligned,
    a view at an odd offset may not be.
    """

    dtype: torch.dtype
    aligned: bool = True
    shape: Optional[Tuple[int, ...]] = None  # for launch code that asks (a peer's heuristics)

    def data_ptr(self) -> int:
        return 0 if self.aligned else 2

    def numel(self) -> int:
        if self.shape is None:
            raise ValueError("AotTensor: numel() of a stand-in without a shape")
        return math.prod(self.shape)

    def element_size(self) -> int:
        return (
            torch.finfo(self.dtype).bits // 8
            if self.dtype.is_floating_point
            else (torch.iinfo(self.dtype).bits // 8)
        )


@dataclass(frozen=True)
class HotLoop:
    """One loop of a kernel (in its body or in a jit function it calls) and its traffic.

    Attributes:
        name: what the loop does, e.g. ``"stats"`` or ``"gradient"``.
        bytes_per_element: HBM bytes moved per element the loop visits (2 for a read-only
            bf16 pass, 4 for a bf16 read plus write); None for a loop that does not stream
            memory (reported, never held to the bandwidth ceiling).
        elements_per_iteration: elements one program handles per trip (the block size).
        function: name of the jit function whose body holds the loop; None: the kernel.
        ordinal: which of that function's loops, counted in source order from 0.
        min_ceiling: this loop's own bandwidth gate, where physics sets a lower one than
            the check's default (e.g. a loop bound by the exp/tanh unit); None: the default.
        compiled: whether the variant's constexprs keep the loop (False: compiled out, e.g.
            the gradient walk without ``WRITE_GRAD``). A loop recorded as compiled that the
            SASS lacks, or one recorded as compiled out that the SASS has, fails the check.
        edge_blocks: masked blocks the walk runs outside its loop, each at a full block's
            cost (2: an aligned head and a tail, as ``write_grad_row`` does); 0: a masked
            loop of ``ceil(n / block)`` trips. Used by the whole-row ceilings.
        macs_per_trip: for a loop of ``tl.dot`` products (a tensor-core loop), the
            multiply-adds one trip of one program runs (``M x N x K`` per dot of an
            ``(M, K) x (K, N)`` tile): the SASS must run exactly these, and the loop is
            held to the GEMM model (:func:`benchmarks.static.machines.mma_ceiling`), not
            to HBM bandwidth (``bytes_per_element`` None). None: no dot.
        per_tile: trips per output tile (``(BLOCK_M, BLOCK_N)`` logits) at the record's
            shape, per copy of the loop (a function inlined twice has two): the K loop
            ``hidden_size / BLOCK_K``, a loop over tiles 1. Set on every loop of a
            kernel whose record has ``tiles_per_program``: the per-tile figures sum them.
    """

    name: str
    bytes_per_element: Optional[int]
    elements_per_iteration: int
    function: Optional[str] = None
    ordinal: int = 0
    min_ceiling: Optional[float] = None
    compiled: bool = True
    edge_blocks: int = 0
    macs_per_trip: Optional[int] = None
    per_tile: Optional[float] = None


@dataclass(frozen=True)
class KernelVariant:
    """One compilation of a Triton kernel, as ``triton.compile(ASTSource(...))`` takes it.

    Attributes:
        kernel: the kernel's short name (e.g. ``"row_stats"``).
        variant: a label unique within the kernel, naming dtype, switches and config.
        dtype: dtype of the streamed elements (``"fp32"``, ``"bf16"``, ``"fp16"``).
        fn: the ``triton.jit`` function.
        signature: parameter name -> Triton type (``"*bf16"``, ``"i32"``, ``"constexpr"``).
        constexprs: parameter name -> value for every ``constexpr`` entry of ``signature``.
        attrs: ``{(param index,): [["tt.divisibility", 16]]}`` for 16-divisible arguments.
        num_warps, num_stages, maxnreg, enable_fp_fusion: launch options (None: Triton's
            default; the library's launches name ``enable_fp_fusion`` explicitly).
        loops: every loop of ``fn`` and of the jit functions it calls (each described once,
            however many times it is inlined).
        archs: the compute capabilities the launch is made for (None: every one the
            check compiles), e.g. a peer's Hopper-only TMA path.
        tiles_per_program: output tiles one program produces at the record's shape (a
            tensor-core kernel; its code outside loops counts once per program); None:
            not a tensor-core kernel.
    """

    kernel: str
    variant: str
    dtype: str
    fn: Any
    signature: Mapping[str, str]
    constexprs: Mapping[str, Any]
    attrs: Mapping[Tuple[int, ...], List[List[Any]]]
    num_warps: int
    num_stages: Optional[int]
    loops: Tuple[HotLoop, ...]
    maxnreg: Optional[int] = None
    enable_fp_fusion: Optional[bool] = None
    archs: Optional[Tuple[int, ...]] = None
    tiles_per_program: Optional[float] = None

    def options(self) -> Dict[str, Any]:
        """The ``options`` dict for ``triton.compile``."""
        opts: Dict[str, Any] = {"num_warps": self.num_warps}
        if self.enable_fp_fusion is not None:
            opts["enable_fp_fusion"] = self.enable_fp_fusion
        if self.num_stages is not None:
            opts["num_stages"] = self.num_stages
        if self.maxnreg is not None:
            opts["maxnreg"] = self.maxnreg
        return opts

    def compile_key(self) -> Tuple:
        """Equal for two records that compile to the same binary."""
        return (
            self.fn.__name__,
            tuple(sorted(self.signature.items())),
            tuple(sorted((k, repr(v)) for k, v in self.constexprs.items())),
            tuple(sorted((k, repr(v)) for k, v in self.attrs.items())),
            self.num_warps,
            self.num_stages,
            self.maxnreg,
            self.enable_fp_fusion,
            self.archs,
        )


def _specialize(backend: Any, value: Any, param: Any) -> Tuple[str, Any]:
    """(type, attribute) Triton's launcher gives ``value`` for ``param``: the JIT's own rule."""
    from triton._C.libtriton import native_specialize_impl

    specialize = not param.do_not_specialize
    align = not param.do_not_specialize_on_alignment
    return native_specialize_impl(backend, value, param.is_const, specialize, align)[:2]


def launch_variant(
    kernel: str,
    variant: str,
    dtype: str,
    fn: Any,
    args: Sequence[Any],
    meta: Mapping[str, Any],
    loops: Sequence[HotLoop],
    archs: Optional[Sequence[int]] = None,
    tiles_per_program: Optional[float] = None,
) -> KernelVariant:
    """Record what ``fn[grid](*args, **meta)`` compiles to.

    ``args`` are the positional launch arguments with tensors replaced by
    :class:`AotTensor`; ``meta`` holds the keyword constexprs and launch options
    (``num_warps``, ``num_stages``, ``maxnreg``). Specialisation (``i32``/``i64``, an
    integer equal to 1 becoming a constant, 16-divisibility) follows the installed
    Triton's launcher. ``archs`` and ``tiles_per_program``: see :class:`KernelVariant`.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    bound = dict(zip(fn.arg_names, args))
    bound.update({k: v for k, v in meta.items() if k not in _LAUNCH_OPTIONS})
    missing = [name for name in fn.arg_names if name not in bound]
    if missing or len(args) > len(fn.arg_names):
        raise ValueError(
            f"args/meta: {fn.__name__} takes {list(fn.arg_names)}, "
            f"got {len(args)} positional and {sorted(meta)} (missing {missing})"
        )
    # The specialisation rule is target-independent; any CUDA backend object serves.
    backend = make_backend(GPUTarget("cuda", 90, 32))
    signature: Dict[str, str] = {}
    constexprs: Dict[str, Any] = {}
    attrs: Dict[Tuple[int, ...], List[List[Any]]] = {}
    for index, param in enumerate(fn.params):
        value = bound[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
            continue
        ty, attr = _specialize(backend, value, param)
        signature[param.name] = ty
        if ty == "constexpr":
            constexprs[param.name] = attr
        elif isinstance(attr, str):
            parsed = backend.parse_attr(attr)
            if parsed:
                attrs[(index,)] = parsed
    return KernelVariant(
        kernel=kernel,
        variant=variant,
        dtype=dtype,
        fn=fn,
        signature=signature,
        constexprs=constexprs,
        attrs=attrs,
        num_warps=int(meta.get("num_warps", 4)),
        num_stages=meta.get("num_stages"),
        loops=tuple(loops),
        maxnreg=meta.get("maxnreg"),
        enable_fp_fusion=meta.get("enable_fp_fusion"),
        archs=tuple(archs) if archs is not None else None,
        tiles_per_program=tiles_per_program,
    )


def dedupe(variants: Sequence[KernelVariant]) -> List[KernelVariant]:
    """Keep the first record of each distinct compilation."""
    seen = set()
    kept = []
    for v in variants:
        key = v.compile_key()
        if key not in seen:
            seen.add(key)
            kept.append(v)
    return kept
