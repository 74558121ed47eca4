"""The argument bundles of the block-sparse attention kernels, and how a lowering fills them.

A layout's `triton_args(device)` and a modifier's `triton_args(layout, device)` return the bundles
they fill, by slot name: `geometry` (a `Geometry`), the predicate slots `kv_valid`, `segments`,
`causal`, `mask`, the modifier slots `bias`, `table`, `relpos`, `gmm`, and optionally `features`
(a dict of extra `Features` switches, e.g. CLAMP). Filling a slot compiles its code in (`SWITCHES`);
every slot left empty keeps the neutral bundle of `neutral(device)` (dummy pointers, zero strides).
A modifier's `triton_grad_buffers` returns its gradient buffers the same way: `dbias` (a
`PairMap`), `dtable`, `drh`, `drw`, `dalpha`, `dsigma`, and `features`.

A bundle holds either plain values or other bundles, never both, and no field is named `values` or
`type`: triton 3.6 drops a specialised constant (a stride equal to 1) from a sub-bundle of a
mixed bundle when it copies the bundle at a loop, and `tl.tuple`'s own attributes shadow such
fields (tests/kernels/test_triton_compile.py checks every launch).

Layouts and modifiers import it inside their `triton_args`, so importing zoo.kernels does not
import Triton.
"""
from typing import Any, NamedTuple

import torch

from ._common import Rows, bs

__all__ = ["TileList", "Dims", "Geometry", "PairMap", "KeyValid", "Segments", "Causal", "Predicates", "HeadRows",
           "Table", "RelGrid", "RelPos", "Gmm", "Modifiers", "ParamGrads", "ModGrads", "Tiles", "Features",
           "Rows", "SWITCHES", "pair_map", "neutral", "neutral_grads"]


class TileList(NamedTuple):
    """One LUT list: per tile the count (num, (LB, LH, n)) and indices (idx, (LB, LH, n, max)) of
    the tiles it pairs with; n_* / i_* are their batch, head (0: broadcast) and tile strides."""
    num: torch.Tensor
    n_sb: int
    n_sh: int
    idx: torch.Tensor
    i_sb: int
    i_sh: int
    i_st: int


class Dims(NamedTuple):
    Lq: int
    Lk: int
    H: int
    D: int
    Dv: int
    scale: float


class Geometry(NamedTuple):
    """Runtime geometry of 2-D window tiles: query blocks (bq wide, nbx per row, wq query-map
    width), windows (block stride, halo, win_h x win_w), the key map (mh x mw) and the key-tile
    grid (ntx tiles per row, anchored at -ay, -ax). Linear layouts leave the neutral values."""
    bq: int = 1
    nbx: int = 1
    wq: int = 1
    block: int = 1
    halo: int = 0
    win_h: int = 1
    win_w: int = 1
    mh: int = 1
    mw: int = 1
    ntx: int = 1
    ay: int = 0
    ax: int = 0


class PairMap(NamedTuple):
    """A (B|1, H|1, Lq, Lk) tensor: pointer, batch / head strides (0: broadcast), query and key strides."""
    ptr: torch.Tensor
    s_b: int
    s_h: int
    s_i: int
    s_j: int


class KeyValid(NamedTuple):
    ptr: torch.Tensor        # (B|1, Lk) int8
    s_b: int


class Segments(NamedTuple):
    q_ids: torch.Tensor      # (B|1, Lq) int32
    kv_ids: torch.Tensor     # (B|1, Lk) int32
    q_sb: int
    kv_sb: int


class Causal(NamedTuple):
    offset: int
    prefix: int


class Predicates(NamedTuple):
    """Element predicates of partial tiles (each compiled in by its `Features` switch)."""
    kv_valid: KeyValid
    segments: Segments
    causal: Causal
    mask: PairMap


class HeadRows(NamedTuple):
    """A (H|1, N) tensor: pointer and head stride (0: broadcast)."""
    ptr: torch.Tensor
    s_h: int


class Table(NamedTuple):
    table: HeadRows          # (H|1, T) bias values
    index: PairMap           # (B|1, Lq, Lk) int32 indices into the table (head stride 0)


class RelGrid(NamedTuple):
    """Offset ranges of decomposed rel-pos (Rh, Rw) and the grid widths of the query and key
    tokens (qgw, kgw; used when offsets are not window-local)."""
    Rh: int = 1
    Rw: int = 1
    qgw: int = 1
    kgw: int = 1


class RelPos(NamedTuple):
    """Decomposed rel-pos logits: rh (B|1, H|1, Lq, Rh), rw (.., Rw) on `grid`."""
    rh: Rows
    rw: Rows
    grid: RelGrid


class Gmm(NamedTuple):
    alpha: torch.Tensor      # (H|1, NK) mixture weights
    sigma: torch.Tensor      # (H|1, NK) widths
    a_sh: int
    prefix: int              # tokens before the grid (no modulation)
    grid_w: int


class Modifiers(NamedTuple):
    bias: PairMap
    table: Table
    relpos: RelPos
    gmm: Gmm


class ParamGrads(NamedTuple):
    """fp32 gradient buffers laid out like the table, rel-pos and GMM parameters."""
    dtable: torch.Tensor
    drh: torch.Tensor
    drw: torch.Tensor
    dalpha: torch.Tensor
    dsigma: torch.Tensor


class ModGrads(NamedTuple):
    """Gradient buffers of the modifiers (dQ kernel): dbias has the dense bias's shape."""
    dbias: PairMap
    params: ParamGrads


class Tiles(NamedTuple):
    """Constexpr tile configuration: query / key token maps (mode 0 linear spans QS / KS, mode 1
    2-D window tiles QX wide, key tiles KSY x KSX in KTY x KTX), padded key slots (K_PAD), tile
    sizes, padded head dims, the dtype of the P·V operand and the dot precision."""
    Q_MODE: int
    QS: int
    QX: int
    K_MODE: int
    KS: int
    KSY: int
    KSX: int
    KTY: int
    KTX: int
    K_PAD: bool
    BM: int
    BN: int
    DP: int
    DVP: int
    DOT_DTYPE: Any
    PREC: str


class Features(NamedTuple):
    """Constexpr switches: which predicates (WIN, CLAMP, HAS_KVV, HAS_SEG, CAUSAL, HAS_MASK) and
    modifiers (BIAS 0 none / 1 dense / 2 table / 3 rel-pos with RP_WIN window-local offsets; GMM
    with NK components padded to KP, GADD additive) are compiled in; DB_ATOMIC: the dense bias
    broadcasts, so its gradient is accumulated with atomics."""
    WIN: bool = False
    CLAMP: bool = False
    HAS_KVV: bool = False
    HAS_SEG: bool = False
    CAUSAL: bool = False
    HAS_MASK: bool = False
    BIAS: int = 0
    RP_WIN: bool = False
    NK: int = 1
    KP: int = 2
    GMM: bool = False
    GADD: bool = False
    DB_ATOMIC: bool = False


# the `Features` switch a filled slot turns on
SWITCHES = dict(geometry=("WIN", True), kv_valid=("HAS_KVV", True), segments=("HAS_SEG", True),
                causal=("CAUSAL", True), mask=("HAS_MASK", True), bias=("BIAS", 1), table=("BIAS", 2),
                relpos=("BIAS", 3), gmm=("GMM", True))


def pair_map(t: torch.Tensor) -> PairMap:
    """A (B|1, H|1, Lq|1, Lk|1) tensor as a `PairMap` (size-1 dims broadcast)."""
    return PairMap(t, bs(t, 0), bs(t, 1), bs(t, 2), bs(t, 3))


def neutral(device) -> dict:
    """Every slot switched off: dummy int32 / fp32 pointers and zero strides."""
    i = torch.zeros(1, device=device, dtype=torch.int32)
    f = torch.zeros(1, device=device, dtype=torch.float32)
    return dict(geometry=Geometry(), kv_valid=KeyValid(i, 0), segments=Segments(i, i, 0, 0), causal=Causal(0, 0),
                mask=PairMap(i, 0, 0, 0, 0), bias=PairMap(f, 0, 0, 0, 0),
                table=Table(HeadRows(f, 0), PairMap(i, 0, 0, 0, 0)),
                relpos=RelPos(Rows(f, 0, 0, 0), Rows(f, 0, 0, 0), RelGrid()), gmm=Gmm(f, f, 0, 0, 1))


def neutral_grads(device) -> dict:
    f = torch.zeros(1, device=device, dtype=torch.float32)
    return dict(dbias=PairMap(f, 0, 0, 0, 0), **{name: f for name in ParamGrads._fields})
