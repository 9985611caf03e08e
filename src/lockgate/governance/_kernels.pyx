# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The fused governance kernel: validation + mergeable per-feature state in one pass.

One :class:`Accumulator` per tensor per model version holds preallocated state, so a call
does no allocation: it checks the array header, takes a light lock, and runs one ``nogil``
loop over the C-contiguous (rows x features) values. For every value it

* validates it against the feature's rules (NaN, Inf, min, max, allowed integer set) and
  records the first ``max_violations`` problems (row, feature, rule, value) in preallocated
  arrays, counting all of them;
* updates count, NaN/Inf counts, below-min/above-max counts, min and max, and sums of
  the values shifted by the running mean, from which the batch's mean and M2 follow; the
  batch is then folded into the running (count, mean, sum, M2) with Chan's parallel
  formula (Welford's update when the batch holds one value), so no value costs a division;
* counts it in the bin cut by the reference quantile edges (``bisect_right`` semantics: a
  value equal to an edge goes to the upper bin; bin 0 and the last bin are the overflow
  bins, so a feature with E <= 254 edges has E + 1 bins). The bin is found in O(1): a
  256-cell uniform grid over [first edge, last edge] maps the value to a cell; a cell with
  no edge inside (most of them) stores its bin, and only a cell holding an edge scans
  (almost always) zero or one edge from its start. A binary search over random data
  mispredicts a branch per level and measured ~3x slower;
* copies it (as float32, non-finite as NaN) into a bounded row buffer that the off-path
  sketch feeder drains; rows that do not fit are counted in ``buffer_dropped``.

Per-feature rules, grid and pointers are packed in one record per feature; bounds, batch
sums and grid parameters also live as arrays (structure of arrays). A batch of a few rows is
walked row by row: the common row (every value finite, inside [min, max], no allowed set) is
one vectorised range test, one vectorised update of sums and extremes, one vectorised grid
cell computation, then the table lookups -- on x86-64 Linux these loops are also built for
AVX2 and picked at load time. A row with any other value goes value by value through the
rule checks. A batch of 8 rows or more is walked feature by feature first (see ``_run``).
The input array is read through the numpy C-API's data pointer after its header has been
checked, because acquiring a fresh memoryview costs ~0.5 us per call -- more than the whole
batch-1 loop. The loop is one ``nogil`` function specialised for float32, float64, int32
and int64 (a fused type); batches of 32k values or more release the GIL while it runs.

Moments, min/max and bins cover finite values only; NaN and +-Inf are counted apart.
``below_min``/``above_max`` count every non-NaN value outside [min, max] (Inf included).
Each value breaks at most one rule, checked in the order nan, inf, min, max, allowed.
"""

cimport cython
cimport numpy as cnp
from cpython.pythread cimport (
    PyThread_type_lock, PyThread_allocate_lock, PyThread_free_lock,
    PyThread_acquire_lock, PyThread_release_lock, NOWAIT_LOCK, WAIT_LOCK,
)
from libc.math cimport INFINITY, NAN, floor
from libc.float cimport DBL_MAX
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from libc.string cimport memset

import numpy as np

cnp.import_array()

# Rule codes, shared with the Python side (see lockgate.governance.violations).
RULE_NAN = 1
RULE_INF = 2
RULE_MIN = 3
RULE_MAX = 4
RULE_ALLOWED = 5
N_RULES = 6

cdef enum:
    C_NAN = 1
    C_INF = 2
    C_MIN = 3
    C_MAX = 4
    C_ALLOWED = 5
    C_NRULES = 6

cdef enum:
    F_ALLOW_NAN = 1
    F_ALLOW_INF = 2
    F_HAS_ALLOWED = 4

cdef enum:
    # Cells of the bin-lookup grid per feature. With quantile edges the data is densest where
    # the edges are, so the share of values landing in a cell that holds an edge (and need a
    # scan, an unpredictable branch) falls with the cell count: ~18% of values at 256 cells,
    # a few % at 1,024, which made batch-1 calls ~10-15% faster for 2 KB of table per feature.
    GRID = 1024
    MAX_EDGES = 254
    CELL_CHECK = 0x8000  # table flag: an edge lies in (or within rounding of) this cell

BIN_GRID_CELLS = GRID  # for tests that probe every cell boundary

# Release the GIL only for batches this large: below it the lock round trip costs more
# than the loop.
cdef Py_ssize_t NOGIL_VALUES = 1 << 15
# Batch sums are folded into the running moments once this many rows have gathered (or when
# the state is read): a batch-1 call then costs only its row loop, not a per-feature fold.
cdef Py_ssize_t FOLD_ROWS = 256
# From this many rows a batch is walked feature by feature first (see Accumulator._run).
cdef Py_ssize_t COLUMN_ROWS = 8

ctypedef fused value_t:
    float
    double
    int
    long long


ctypedef struct feat_t:
    # What the bin lookup and the rule checks touch, packed per feature. The fast-path bounds
    # and the batch sums live in separate arrays (structure of arrays, see Accumulator._soa)
    # so the common-case loops over a row are plain array arithmetic the compiler vectorises.
    double g_lo, g_scale     # bin grid origin and cells per unit
    double g_xlo, g_xhi      # clamp for the grid index: half a cell outside the grid
    const double* e          # edges with sentinels: e[-1] = -inf, e[n] = +inf
    const unsigned short* tab # GRID cells: the bin (flat index), or CELL_CHECK | local bin at the start
    Py_ssize_t bin0          # flat index of this feature's bin 0 in the window's bins
    long long nonfin         # NaN and +-Inf seen in this batch
    double lo, hi
    const long long* aset
    Py_ssize_t an
    unsigned char flags


cdef inline Py_ssize_t _bin_of(const feat_t* f, double x) noexcept nogil:
    return _bin_at(x, f.g_xlo, f.g_xhi, f.g_lo, f.g_scale, f.tab, f.e, f.bin0)


cdef inline Py_ssize_t _bin_in_cell(double x, unsigned short t, const double* e, Py_ssize_t bin0) noexcept nogil:
    """The flat bin index of finite x from its cell's table entry: the entry itself, unless an
    edge lies in the cell; then a scan from the cell's start (``bisect_right`` over the edges)."""
    if t < CELL_CHECK:
        return t
    cdef Py_ssize_t k = t - CELL_CHECK
    while e[k - 1] > x:
        k -= 1
    k += e[k] <= x
    while e[k] <= x:
        k += 1
    return bin0 + k


cdef inline Py_ssize_t _bin_at(double x, double xlo, double xhi, double glo, double gscale,
                               const unsigned short* tab, const double* e, Py_ssize_t bin0) noexcept nogil:
    """Flat index (into the window's bins) of finite x's bin: the grid cell, then (only in a
    cell holding an edge) a scan.

    x is clamped (min/max instructions, no branch) to half a cell beyond the grid, so the
    cell index lands in [0, GRID - 1] without a data-dependent branch. Most cells hold no
    edge: their entry is the bin itself, as a flat index. In the others the entry is the
    local bin at the cell's start; the sentinels bound both scans (the first only fixes float
    rounding at a cell start, the last a dense cell). The grid parameters come as arguments
    so a column loop keeps them in registers.
    """
    cdef double xc = x if x > xlo else xlo
    xc = xc if xc < xhi else xhi
    return _bin_in_cell(x, tab[<int>((xc - glo) * gscale + 1.0)], e, bin0)


cdef extern from *:
    """
    /* The common case of one row, over arrays of one double per feature: restrict and plain
       indexing let the compiler vectorise both loops. x86-64's baseline (SSE2) cannot
       vectorise the range test's mask reduction, so on x86-64 Linux with GCC each function is
       also built for AVX2 and the loader picks the build the CPU runs (target_clones, an
       ifunc resolved once at load); elsewhere the portable build is the only one. */
    #if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
    #define LOCKGATE_CLONES __attribute__((target_clones("avx2", "default")))
    #else
    #define LOCKGATE_CLONES
    #endif
    LOCKGATE_CLONES
    static int lockgate_row_in_range(const double* restrict x, const double* restrict lo,
                                     const double* restrict hi, Py_ssize_t n) {
        int ok = 1;
        for (Py_ssize_t j = 0; j < n; j++) ok &= (x[j] >= lo[j]) & (x[j] <= hi[j]);
        return ok;
    }
    LOCKGATE_CLONES
    static void lockgate_row_cells(const double* restrict x, const double* restrict xlo,
                                   const double* restrict xhi, const double* restrict glo,
                                   const double* restrict gscale, int* restrict cell, Py_ssize_t n) {
        for (Py_ssize_t j = 0; j < n; j++) {
            double v = x[j];
            v = v > xlo[j] ? v : xlo[j];
            v = v < xhi[j] ? v : xhi[j];
            cell[j] = (int)((v - glo[j]) * gscale[j] + 1.0);
        }
    }
    LOCKGATE_CLONES
    static void lockgate_row_moments(const double* restrict x, const double* restrict shift,
                                     double* restrict s1, double* restrict s2,
                                     double* restrict mn, double* restrict mx, Py_ssize_t n) {
        for (Py_ssize_t j = 0; j < n; j++) {
            double v = x[j], d = v - shift[j];
            s1[j] += d;
            s2[j] += d * d;
            mn[j] = v < mn[j] ? v : mn[j];
            mx[j] = v > mx[j] ? v : mx[j];
        }
    }
    """
    bint lockgate_row_in_range(const double* x, const double* lo, const double* hi, Py_ssize_t n) noexcept nogil
    void lockgate_row_moments(const double* x, const double* shift, double* s1, double* s2,
                              double* mn, double* mx, Py_ssize_t n) noexcept nogil
    void lockgate_row_cells(const double* x, const double* xlo, const double* xhi, const double* glo,
                            const double* gscale, int* cell, Py_ssize_t n) noexcept nogil


cdef inline bint _in_set(const long long* s, Py_ssize_t n, long long v) noexcept nogil:
    cdef Py_ssize_t lo = 0, hi = n, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if s[mid] < v:
            lo = mid + 1
        else:
            hi = mid
    return lo < n and s[lo] == v


@cython.final
cdef class Accumulator:
    """Per-tensor validation rules, window state and row buffer. Thread-safe."""

    cdef readonly Py_ssize_t n_features
    cdef readonly Py_ssize_t max_violations
    cdef readonly Py_ssize_t buffer_capacity
    # rules
    cdef double[::1] _lo, _hi
    cdef unsigned char[::1] _flags
    cdef long long[::1] _allowed, _allowed_off
    cdef readonly object edges, edge_offsets
    cdef double[::1] _edges
    cdef long long[::1] _edge_off
    cdef object _a_pedges, _a_table
    cdef feat_t* _ft
    # Structure of arrays, F doubles each, in one allocation: fast-path bounds (finite, in
    # [lo, hi], no allowed set), the batch scratch -- sums of (x - shift) and its square,
    # extremes -- and one row converted to double.
    cdef double* _soa
    cdef double* _flo
    cdef double* _fhi
    cdef double* _shift
    cdef double* _s1
    cdef double* _s2
    cdef double* _mn
    cdef double* _mx
    cdef double* _xrow
    cdef double* _gxlo
    cdef double* _gxhi
    cdef double* _glo
    cdef double* _gscale
    cdef int* _cell
    cdef bint _fresh  # some feature may have no running mean: pick batch shifts first
    cdef Py_ssize_t _pending  # rows in the batch scratch (s1, s2, mn, mx, nonfin) not yet folded
    # window state (numpy arrays exposed read-only through state())
    cdef readonly long long rows
    cdef object _a_count, _a_nan, _a_inf, _a_below, _a_above, _a_sum, _a_m2, _a_min, _a_max, _a_bins
    cdef long long[::1] _count, _nan, _inf, _below, _above, _bins
    cdef double[::1] _sum, _m2, _min, _max, _mean
    cdef object _a_mean
    # violations of the last call and cumulative counters
    cdef readonly object violation_rows, violation_features, violation_rules, violation_values
    cdef long long[::1] _v_row
    cdef int[::1] _v_feat
    cdef signed char[::1] _v_rule
    cdef double[::1] _v_value
    cdef readonly object violation_totals
    cdef long long[::1] _v_tot
    # row buffer for the sketch feeder
    cdef object _a_buf
    cdef float[::1] _buf
    cdef float[::1] _spill
    cdef readonly Py_ssize_t buffered_rows
    cdef readonly long long buffer_dropped
    cdef PyThread_type_lock _lock
    # Set (under the GIL) while some thread holds _lock. A small update runs entirely under the
    # GIL, so when no one holds the lock it cannot interleave with anything: it skips the lock.
    # A holder may drop the GIL (a large update's nogil loop, a numpy copy in take), but only
    # after setting this flag, so an unlocked update never overlaps a locked section.
    cdef bint _held

    def __cinit__(self):
        self._lock = PyThread_allocate_lock()
        if self._lock == NULL:
            raise MemoryError("cannot allocate the accumulator lock")

    def __dealloc__(self):
        if self._lock != NULL:
            PyThread_free_lock(self._lock)
        PyMem_Free(self._ft)
        PyMem_Free(self._soa)

    def __init__(self, Py_ssize_t n_features, *, lo=None, hi=None, allow_nan=None, allow_inf=None,
                 allowed=None, edges=None, Py_ssize_t max_violations=50,
                 Py_ssize_t buffer_rows=16384):
        """Build an accumulator for ``n_features`` columns.

        ``lo``/``hi``: per-feature bounds (NaN or None = unbounded); ``allow_nan``/``allow_inf``:
        per-feature booleans (default True: features without rules are never flagged);
        ``allowed``: per feature ``None`` or a sequence of allowed integers; ``edges``: per
        feature a sorted sequence of bin edges (may be empty).
        """
        cdef Py_ssize_t F = n_features, j
        if F < 1:
            raise ValueError("an accumulator needs at least one feature")
        if max_violations < 1:
            raise ValueError("max_violations must be >= 1")
        self.n_features = F
        self.max_violations = max_violations
        self.buffer_capacity = buffer_rows if buffer_rows > 0 else 0

        lo_a = np.full(F, -np.inf) if lo is None else np.asarray(lo, dtype=np.float64).copy()
        hi_a = np.full(F, np.inf) if hi is None else np.asarray(hi, dtype=np.float64).copy()
        if lo_a.shape != (F,) or hi_a.shape != (F,):
            raise ValueError("lo/hi need one bound per feature")
        lo_a[np.isnan(lo_a)] = -np.inf
        hi_a[np.isnan(hi_a)] = np.inf
        an = np.ones(F, dtype=bool) if allow_nan is None else np.asarray(allow_nan, dtype=bool)
        ai = np.ones(F, dtype=bool) if allow_inf is None else np.asarray(allow_inf, dtype=bool)
        if an.shape != (F,) or ai.shape != (F,):
            raise ValueError("allow_nan/allow_inf need one flag per feature")
        flags = an.astype(np.uint8) * F_ALLOW_NAN + ai.astype(np.uint8) * F_ALLOW_INF
        allowed_list = [None] * F if allowed is None else list(allowed)
        if len(allowed_list) != F:
            raise ValueError("allowed needs one entry (None or a set) per feature")
        sets = []
        for j in range(F):
            if allowed_list[j] is None:
                sets.append(np.empty(0, dtype=np.int64))
            else:
                sets.append(np.unique(np.asarray(list(allowed_list[j]), dtype=np.int64)))
                flags[j] |= F_HAS_ALLOWED
        self._lo = lo_a
        self._hi = hi_a
        self._flags = flags.astype(np.uint8)
        self._allowed = np.concatenate(sets) if sets else np.empty(0, dtype=np.int64)
        self._allowed_off = np.concatenate([[0], np.cumsum([len(s) for s in sets])]).astype(np.int64)

        edge_list = [[] for _ in range(F)] if edges is None else list(edges)
        if len(edge_list) != F:
            raise ValueError("edges needs one (possibly empty) sequence per feature")
        arrays = [np.asarray(e, dtype=np.float64).ravel() for e in edge_list]
        for j in range(F):
            if arrays[j].size and (not np.all(np.isfinite(arrays[j])) or np.any(np.diff(arrays[j]) < 0)):
                raise ValueError(f"edges of feature {j} must be finite and sorted")
        self.edges = np.concatenate(arrays) if arrays else np.empty(0)
        self.edge_offsets = np.concatenate([[0], np.cumsum([a.size for a in arrays])]).astype(np.int64)
        self._edges = self.edges
        self._edge_off = self.edge_offsets
        # Bin lookup: a uniform grid over [first edge, last edge] per feature, plus a cell 0
        # for values below the first edge and a last cell from the last edge up, maps a value
        # to the bin at its cell's start in O(1); a short scan corrects it.
        g_lo = np.zeros(F)
        g_scale = np.zeros(F)
        table = np.zeros((F, GRID), dtype=np.uint16)
        padded = []
        for j in range(F):
            e = arrays[j]
            if e.size > MAX_EDGES:
                raise ValueError(f"feature {j} has {e.size} bin edges; at most {MAX_EDGES} are supported")
            span = float(e[e.size - 1] - e[0]) if e.size >= 2 else 0.0
            scale = (GRID - 2) / span if span > 0.0 else 0.0
            if np.isfinite(span) and np.isfinite(scale) and scale > 0.0 and np.isfinite(0.5 / scale):
                g_lo[j] = e[0]
                g_scale[j] = scale
                starts = e[0] + np.arange(GRID - 1) / scale
                local = np.zeros(GRID, dtype=np.int64)
                local[1:] = np.searchsorted(e, starts, side="right")
                # A cell is exact when no edge maps into it (with a margin for rounding): the
                # map x -> (x - first edge) * scale + 1 the kernel computes is monotone, so
                # every x of such a cell has the same edges below it; its entry is then the
                # bin's flat index in the window state. Others get the flag and the local bin
                # at the cell's start, from which the kernel scans.
                check = np.zeros(GRID, dtype=bool)
                where = (e - e[0]) * scale + 1.0
                lo_cell = np.clip(np.floor(where - 1e-6).astype(np.int64), 0, GRID - 1)
                hi_cell = np.clip(np.floor(where + 1e-6).astype(np.int64), 0, GRID - 1)
                for a, b in zip(lo_cell, hi_cell):
                    check[a:b + 1] = True
                bin0 = int(self.edge_offsets[j]) + j
                if bin0 + e.size >= CELL_CHECK:  # flat indices would not fit: scan every cell
                    check[:] = True
                table[j, :] = np.where(check, CELL_CHECK + local, bin0 + local)
            else:
                table[j, :] = CELL_CHECK  # no grid: every value scans (0 or 1 edge)
            padded.append(np.concatenate([[-np.inf], e, [np.inf]]))
        self._a_pedges = np.concatenate(padded)
        self._a_table = table.reshape(-1)
        self._a_count = np.zeros(F, dtype=np.int64)
        self._a_nan = np.zeros(F, dtype=np.int64)
        self._a_inf = np.zeros(F, dtype=np.int64)
        self._a_below = np.zeros(F, dtype=np.int64)
        self._a_above = np.zeros(F, dtype=np.int64)
        self._a_sum = np.zeros(F, dtype=np.float64)
        self._a_m2 = np.zeros(F, dtype=np.float64)
        self._a_min = np.full(F, np.inf)
        self._a_max = np.full(F, -np.inf)
        self._a_bins = np.zeros(self.edges.size + F, dtype=np.int64)
        self._count = self._a_count
        self._nan = self._a_nan
        self._inf = self._a_inf
        self._below = self._a_below
        self._above = self._a_above
        self._sum = self._a_sum
        self._m2 = self._a_m2
        self._min = self._a_min
        self._max = self._a_max
        self._bins = self._a_bins
        self._a_mean = np.zeros(F)
        self._mean = self._a_mean
        self.rows = 0
        self._build_features(lo_a, hi_a, g_lo, g_scale)

        self.violation_rows = np.zeros(max_violations, dtype=np.int64)
        self.violation_features = np.zeros(max_violations, dtype=np.int32)
        self.violation_rules = np.zeros(max_violations, dtype=np.int8)
        self.violation_values = np.zeros(max_violations, dtype=np.float64)
        self._v_row = self.violation_rows
        self._v_feat = self.violation_features
        self._v_rule = self.violation_rules
        self._v_value = self.violation_values
        self.violation_totals = np.zeros((F, C_NRULES), dtype=np.int64)
        self._v_tot = self.violation_totals.reshape(-1)

        self._a_buf = np.empty(max(self.buffer_capacity, 1) * F, dtype=np.float32)
        self._buf = self._a_buf
        self._spill = np.empty(F, dtype=np.float32)
        self.buffered_rows = 0
        self.buffer_dropped = 0

    cdef _build_features(self, lo_a, hi_a, double[::1] g_lo, double[::1] g_scale):
        """Pack per-feature rules and pointers into the array the row loop walks."""
        cdef Py_ssize_t F = self.n_features, j, eo, ao
        cdef double[::1] pe = self._a_pedges
        cdef unsigned short[::1] tab = self._a_table
        cdef feat_t* ft = <feat_t*>PyMem_Malloc(F * sizeof(feat_t))
        cdef double* soa = <double*>PyMem_Malloc(13 * F * sizeof(double))
        if ft == NULL or soa == NULL:
            PyMem_Free(ft)
            PyMem_Free(soa)
            raise MemoryError("cannot allocate the accumulator's feature table")
        PyMem_Free(self._ft)
        PyMem_Free(self._soa)
        self._ft = ft
        self._soa = soa
        self._flo = soa
        self._fhi = soa + F
        self._shift = soa + 2 * F
        self._s1 = soa + 3 * F
        self._s2 = soa + 4 * F
        self._mn = soa + 5 * F
        self._mx = soa + 6 * F
        self._xrow = soa + 7 * F
        self._gxlo = soa + 8 * F
        self._gxhi = soa + 9 * F
        self._glo = soa + 10 * F
        self._gscale = soa + 11 * F
        self._cell = <int*>(soa + 12 * F)  # F ints in F doubles' room
        self._fresh = True
        self._pending = 0
        for j in range(F):
            self._clear(j, 0.0)
            eo = self._edge_off[j]
            ao = self._allowed_off[j]
            ft[j].lo = lo_a[j]
            ft[j].hi = hi_a[j]
            ft[j].flags = self._flags[j]
            ft[j].aset = &self._allowed[ao] if self._allowed_off[j + 1] > ao else NULL
            ft[j].an = self._allowed_off[j + 1] - ao
            if self._flags[j] & F_HAS_ALLOWED:
                self._flo[j] = INFINITY
                self._fhi[j] = -INFINITY
            else:
                self._flo[j] = ft[j].lo if ft[j].lo > -DBL_MAX else -DBL_MAX
                self._fhi[j] = ft[j].hi if ft[j].hi < DBL_MAX else DBL_MAX
            ft[j].g_lo = g_lo[j]
            ft[j].g_scale = g_scale[j]
            if g_scale[j] > 0.0:
                # half a cell outside [first edge, last edge]: cell index in [0.5, 255.5]
                ft[j].g_xlo = g_lo[j] - 0.5 / g_scale[j]
                ft[j].g_xhi = self._edges[eo + self._edge_off[j + 1] - eo - 1] + 0.5 / g_scale[j]
            else:
                # no grid (0 or 1 distinct edges): every value starts in cell 1 (= 0 edges)
                ft[j].g_xlo = g_lo[j]
                ft[j].g_xhi = g_lo[j]
            self._gxlo[j] = ft[j].g_xlo
            self._gxhi[j] = ft[j].g_xhi
            self._glo[j] = ft[j].g_lo
            self._gscale[j] = ft[j].g_scale
            ft[j].e = &pe[eo + 2 * j + 1]
            ft[j].tab = &tab[j * GRID]
            ft[j].bin0 = eo + j

    cdef inline void _clear(self, Py_ssize_t j, double shift) noexcept nogil:
        """Empty feature j's batch scratch; its sums restart around ``shift``."""
        self._s1[j] = 0.0
        self._s2[j] = 0.0
        self._mn[j] = INFINITY
        self._mx[j] = -INFINITY
        self._shift[j] = shift
        self._ft[j].nonfin = 0

    # ------------------------------------------------------------------ locking
    cdef inline void _acquire(self):
        if not PyThread_acquire_lock(self._lock, NOWAIT_LOCK):
            with nogil:
                PyThread_acquire_lock(self._lock, WAIT_LOCK)
        self._held = True

    cdef inline void _release(self):
        self._held = False
        PyThread_release_lock(self._lock)

    cdef tuple _found(self, long long nv):
        """Copies of the first violations, made without releasing the GIL (numpy's copy may)."""
        cdef Py_ssize_t k = nv if nv < self.max_violations else self.max_violations, i
        rows = np.empty(k, dtype=np.int64)
        feats = np.empty(k, dtype=np.int32)
        rules = np.empty(k, dtype=np.int8)
        values = np.empty(k, dtype=np.float64)
        cdef long long[::1] r = rows
        cdef int[::1] f = feats
        cdef signed char[::1] c = rules
        cdef double[::1] v = values
        for i in range(k):
            r[i] = self._v_row[i]
            f[i] = self._v_feat[i]
            c[i] = self._v_rule[i]
            v[i] = self._v_value[i]
        return (nv, rows, feats, rules, values)

    # ------------------------------------------------------------------ the kernel
    def update(self, cnp.ndarray x not None):
        """Validate and accumulate a C-contiguous 2-D (rows x n_features) array.

        Returns ``0`` when every value passes (no allocation on the clean path), else a tuple
        ``(total, rows, features, rules, values)`` holding copies of the first
        ``max_violations`` problems, taken under the lock so concurrent callers never see
        each other's.
        """
        cdef int typenum = cnp.PyArray_TYPE(x)
        # int64/int32 each have two type numbers (long vs longlong, int vs long) depending on how
        # the array was made; the kernel cares about width only, so fold them together.
        if (typenum == cnp.NPY_LONG or typenum == cnp.NPY_LONGLONG) and cnp.PyArray_ITEMSIZE(x) == 8:
            typenum = cnp.NPY_INT64
        elif (typenum == cnp.NPY_INT or typenum == cnp.NPY_LONG) and cnp.PyArray_ITEMSIZE(x) == 4:
            typenum = cnp.NPY_INT32
        if cnp.PyArray_NDIM(x) != 2 or cnp.PyArray_DIMS(x)[1] != self.n_features:
            raise ValueError(f"expected shape (rows, {self.n_features}), got {(<object>x).shape}")
        if not cnp.PyArray_IS_C_CONTIGUOUS(x):
            raise ValueError("the kernel needs a C-contiguous array")
        cdef Py_ssize_t rows = cnp.PyArray_DIMS(x)[0]
        cdef long long nv
        cdef void* ptr = cnp.PyArray_DATA(x)
        cdef bint release_gil = rows * self.n_features >= NOGIL_VALUES
        if typenum != cnp.NPY_FLOAT32 and typenum != cnp.NPY_FLOAT64 and typenum != cnp.NPY_INT32 and typenum != cnp.NPY_INT64:
            raise TypeError(f"the kernel handles float32, float64, int32 and int64, not {(<object>x).dtype}")
        if not cnp.PyArray_ISNOTSWAPPED(x):
            raise ValueError("the kernel needs native byte order")
        if not release_gil and not self._held:
            # the GIL is held from here to the return: nothing else can touch the state
            nv = self._dispatch(ptr, typenum, rows)
            return 0 if nv == 0 else self._found(nv)
        self._acquire()
        if release_gil:
            with nogil:
                nv = self._dispatch(ptr, typenum, rows)
        else:
            nv = self._dispatch(ptr, typenum, rows)
        try:
            return 0 if nv == 0 else self._found(nv)
        finally:
            self._release()

    cdef inline long long _dispatch(self, void* ptr, int typenum, Py_ssize_t rows) noexcept nogil:
        if typenum == cnp.NPY_FLOAT32:
            return self._run(<const float*>ptr, rows)
        if typenum == cnp.NPY_FLOAT64:
            return self._run(<const double*>ptr, rows)
        if typenum == cnp.NPY_INT32:
            return self._run(<const int*>ptr, rows)
        return self._run(<const long long*>ptr, rows)

    cdef long long _run(self, const value_t* data, Py_ssize_t rows) noexcept nogil:
        cdef Py_ssize_t F = self.n_features, i, j, K = self.max_violations, room
        cdef long long nv = 0, ival
        cdef double x, d
        cdef const value_t* row
        cdef float* brow
        cdef unsigned char fl
        cdef int code
        cdef feat_t* ft = self._ft
        cdef feat_t* f
        cdef long long* cnan = &self._nan[0]
        cdef long long* cinf = &self._inf[0]
        cdef long long* cbelow = &self._below[0]
        cdef long long* cabove = &self._above[0]
        cdef long long* cnt = &self._count[0]
        cdef long long* vtot = &self._v_tot[0]
        cdef float* buf = &self._buf[0]
        cdef float* spill = &self._spill[0]

        # Batch moments are shifted sums around the running mean (no division per value); a
        # feature with no running mean yet is shifted by its first finite value. The scratch
        # spans calls until the fold, which clears it and sets the shift to the new running
        # mean; so this only runs after a reset, until a finite value has been seen.
        if self._fresh:
            for j in range(F):
                f = ft + j
                if cnt[j] == 0 and self._pending == f.nonfin:  # no finite value anywhere yet
                    for i in range(rows):
                        x = <double>data[i * F + j]
                        if x - x == 0.0:  # finite
                            self._shift[j] = x
                            break

        room = self.buffer_capacity - self.buffered_rows
        if room > rows:
            room = rows
        if room < 0:
            room = 0

        # A batch of several rows: first one pass per feature over the common case (finite, in
        # range, no allowed set), with the feature's sums, extremes, bounds and bin grid held in
        # registers for the whole column. Only if some value needs a rule does the row-major pass
        # below run, handling just those values, so violations still come out in row order.
        cdef bint by_column = rows >= COLUMN_ROWS
        cdef long long others = 0
        cdef double s1, s2, mn, mx, flo, fhi, shift, gxlo, gxhi, glo, gscale
        cdef const unsigned short* tab
        cdef int* cell = self._cell
        cdef const unsigned short* tab0 = ft[0].tab  # the features' tables, GRID cells each, back to back
        cdef unsigned short t
        cdef double* gxlo_a = self._gxlo
        cdef double* gxhi_a = self._gxhi
        cdef double* glo_a = self._glo
        cdef double* gscale_a = self._gscale
        cdef const double* edges
        cdef long long* bins = &self._bins[0]
        cdef Py_ssize_t bin0
        cdef float* bcol
        cdef double* aflo = self._flo
        cdef double* afhi = self._fhi
        cdef double* ashift = self._shift
        cdef double* as1 = self._s1
        cdef double* as2 = self._s2
        cdef double* amn = self._mn
        cdef double* amx = self._mx
        cdef double* xrow = self._xrow
        if by_column:
            for j in range(F):
                f = ft + j
                flo = aflo[j]
                fhi = afhi[j]
                shift = ashift[j]
                s1 = as1[j]
                s2 = as2[j]
                mn = amn[j]
                mx = amx[j]
                gxlo = f.g_xlo
                gxhi = f.g_xhi
                glo = f.g_lo
                gscale = f.g_scale
                tab = f.tab
                edges = f.e
                bin0 = f.bin0
                bcol = buf + self.buffered_rows * F + j
                for i in range(rows):
                    x = <double>data[i * F + j]
                    if (x >= flo) & (x <= fhi):
                        d = x - shift
                        s1 += d
                        s2 += d * d
                        mn = x if x < mn else mn
                        mx = x if x > mx else mx
                        bins[_bin_at(x, gxlo, gxhi, glo, gscale, tab, edges, bin0)] += 1
                        if i < room:
                            bcol[i * F] = <float>x
                    else:
                        others += 1
                as1[j] = s1
                as2[j] = s2
                amn[j] = mn
                amx[j] = mx

        for i in range(rows if (others or not by_column) else 0):
            row = data + i * F
            brow = buf + (self.buffered_rows + i) * F if i < room else spill
            if not by_column:
                # A small batch, row by row. Common case first: every value of the row finite,
                # within [min, max] and free of an allowed set. Then the row is one vectorised
                # range test, one vectorised update of sums and extremes, the bin lookups and
                # the buffer copy; otherwise each value goes through the checks below.
                for j in range(F):
                    xrow[j] = <double>row[j]
                if lockgate_row_in_range(xrow, aflo, afhi, F):
                    lockgate_row_moments(xrow, ashift, as1, as2, amn, amx, F)
                    lockgate_row_cells(xrow, gxlo_a, gxhi_a, glo_a, gscale_a, cell, F)
                    for j in range(F):
                        t = tab0[j * GRID + cell[j]]
                        if t < CELL_CHECK:  # the cell holds no edge: t is the bin
                            bins[t] += 1
                        else:
                            f = ft + j
                            bins[_bin_in_cell(xrow[j], t, f.e, f.bin0)] += 1
                    if i < room:
                        for j in range(F):
                            brow[j] = <float>xrow[j]
                    continue
            for j in range(F):
                x = <double>row[j]
                f = ft + j
                if (x >= aflo[j]) & (x <= afhi[j]):
                    if by_column:
                        continue  # counted in the column pass
                    # common case: finite, within [min, max], no allowed set to check
                    d = x - ashift[j]
                    as1[j] += d
                    as2[j] += d * d
                    amn[j] = x if x < amn[j] else amn[j]
                    amx[j] = x if x > amx[j] else amx[j]
                    bins[_bin_of(f, x)] += 1
                    brow[j] = <float>x
                    continue
                fl = f.flags
                if x != x:
                    cnan[j] += 1
                    f.nonfin += 1
                    brow[j] = NAN
                    if not (fl & F_ALLOW_NAN):
                        vtot[j * C_NRULES + C_NAN] += 1
                        if nv < K:
                            self._v_row[nv] = i
                            self._v_feat[nv] = <int>j
                            self._v_rule[nv] = C_NAN
                            self._v_value[nv] = x
                        nv += 1
                    continue
                code = 0
                if x < f.lo:
                    cbelow[j] += 1
                    code = C_MIN
                elif x > f.hi:
                    cabove[j] += 1
                    code = C_MAX
                if x == INFINITY or x == -INFINITY:
                    cinf[j] += 1
                    f.nonfin += 1
                    brow[j] = NAN
                    if not (fl & F_ALLOW_INF):
                        code = C_INF
                else:
                    if code == 0 and (fl & F_HAS_ALLOWED):
                        if value_t is float or value_t is double:
                            if x != floor(x) or x < -9.2e18 or x > 9.2e18:
                                code = C_ALLOWED
                            else:
                                ival = <long long>x
                                if not _in_set(f.aset, f.an, ival):
                                    code = C_ALLOWED
                        else:
                            ival = <long long>row[j]
                            if not _in_set(f.aset, f.an, ival):
                                code = C_ALLOWED
                    # moments, extremes, bins and buffer: finite values only
                    d = x - ashift[j]
                    as1[j] += d
                    as2[j] += d * d
                    if x < amn[j]:
                        amn[j] = x
                    if x > amx[j]:
                        amx[j] = x
                    bins[_bin_of(f, x)] += 1
                    brow[j] = <float>x
                if code:
                    vtot[j * C_NRULES + code] += 1
                    if nv < K:
                        self._v_row[nv] = i
                        self._v_feat[nv] = <int>j
                        self._v_rule[nv] = <signed char>code
                        self._v_value[nv] = x
                    nv += 1

        self.rows += rows
        self.buffered_rows += room
        self.buffer_dropped += rows - room
        self._pending += rows
        if self._pending >= FOLD_ROWS:
            self._fold()
        return nv

    cdef void _fold(self) noexcept nogil:
        """Fold the batch scratch into the running state: Welford's update for a single value,
        Chan et al.'s pairwise update for a batch. Called with the lock held."""
        cdef Py_ssize_t F = self.n_features, j
        cdef long long n, na, nb
        cdef double m2_b, delta, inv
        cdef feat_t* ft = self._ft
        cdef feat_t* f
        cdef double* vmin = &self._min[0]
        cdef double* vmax = &self._max[0]
        cdef double* mean = &self._mean[0]
        cdef long long* cnt = &self._count[0]
        cdef double* vsum = &self._sum[0]
        cdef double* vm2 = &self._m2[0]
        cdef Py_ssize_t rows = self._pending
        if rows == 0:
            return
        cdef bint fresh = False
        cdef double* s1 = self._s1
        cdef double* s2 = self._s2
        cdef double* shift = self._shift
        for j in range(F):
            f = ft + j
            nb = rows - f.nonfin
            if nb == 0:
                fresh |= cnt[j] == 0
                self._clear(j, mean[j])
                continue
            if self._mn[j] < vmin[j]:
                vmin[j] = self._mn[j]
            if self._mx[j] > vmax[j]:
                vmax[j] = self._mx[j]
            na = cnt[j]
            n = na + nb
            if na == 0:
                inv = 1.0 / nb
                mean[j] = shift[j] + s1[j] * inv
                m2_b = s2[j] - s1[j] * s1[j] * inv
                vm2[j] = m2_b if m2_b > 0.0 else 0.0
                vsum[j] = nb * shift[j] + s1[j]
            elif nb == 1:
                # shift == running mean, so s1 = x - mean
                delta = s1[j]
                inv = 1.0 / n
                mean[j] = mean[j] + delta * inv
                vm2[j] = vm2[j] + delta * delta * na * inv
                vsum[j] = vsum[j] + (shift[j] + s1[j])
            else:
                inv = 1.0 / nb
                delta = s1[j] * inv  # mean_b - mean_a, as the shift is the running mean
                m2_b = s2[j] - s1[j] * s1[j] * inv
                if m2_b < 0.0:
                    m2_b = 0.0
                inv = 1.0 / n
                mean[j] = mean[j] + delta * nb * inv
                vm2[j] = vm2[j] + m2_b + delta * delta * (<double>na) * (<double>nb) * inv
                vsum[j] = vsum[j] + (nb * shift[j] + s1[j])
            cnt[j] = n
            self._clear(j, mean[j])
        self._fresh = fresh
        self._pending = 0

    # ------------------------------------------------------------------ state access
    def take(self, bint reset=True):
        """Copy (and by default reset) the window state atomically: a dict of numpy arrays."""
        self._acquire()
        try:
            self._fold()
            out = {
                "rows": np.int64(self.rows),
                "count": self._a_count.copy(),
                "nan": self._a_nan.copy(),
                "inf": self._a_inf.copy(),
                "below": self._a_below.copy(),
                "above": self._a_above.copy(),
                "sum": self._a_sum.copy(),
                "m2": self._a_m2.copy(),
                "min": self._a_min.copy(),
                "max": self._a_max.copy(),
                "bins": self._a_bins.copy(),
            }
            if reset:
                self._reset_state()
            return out
        finally:
            self._release()

    cdef void _reset_state(self):
        self._a_count.fill(0)
        self._a_nan.fill(0)
        self._a_inf.fill(0)
        self._a_below.fill(0)
        self._a_above.fill(0)
        self._a_sum.fill(0.0)
        self._a_m2.fill(0.0)
        self._a_min.fill(np.inf)
        self._a_max.fill(-np.inf)
        self._a_bins.fill(0)
        self._a_mean.fill(0.0)
        self.rows = 0
        self._fresh = True
        self._pending = 0
        cdef Py_ssize_t j
        for j in range(self.n_features):
            self._clear(j, 0.0)

    def reset(self):
        """Zero the window state (not the cumulative violation totals nor the buffer)."""
        self._acquire()
        try:
            self._reset_state()
        finally:
            self._release()

    def drain(self):
        """Return a copy of the buffered rows (rows x n_features float32) and empty the buffer."""
        self._acquire()
        try:
            out = self._a_buf[: self.buffered_rows * self.n_features].reshape(-1, self.n_features).copy()
            self.buffered_rows = 0
            return out
        finally:
            self._release()

    def violation_counts(self):
        """Cumulative violations per (feature, rule code): a copy of an (F x 6) int64 array."""
        self._acquire()
        try:
            return self.violation_totals.copy()
        finally:
            self._release()


# ---------------------------------------------------------------------- stable hashing
from cpython.unicode cimport PyUnicode_AsUTF8AndSize


def stable_hash64(str key not None):
    """FNV-1a over the UTF-8 bytes, then MurmurHash3's fmix64 avalanche.

    Process- and platform-independent (unlike ``hash``), so every replica samples the same
    requests; ~20x cheaper than ``hashlib.blake2b`` for short ids.
    """
    cdef Py_ssize_t n, i
    cdef const char* data = PyUnicode_AsUTF8AndSize(key, &n)
    cdef unsigned long long h = 14695981039346656037ULL
    for i in range(n):
        h ^= <unsigned char>data[i]
        h *= 1099511628211ULL
    h ^= h >> 33
    h *= 0xff51afd7ed558ccdULL
    h ^= h >> 33
    h *= 0xc4ceb9fe1a85ec53ULL
    h ^= h >> 33
    return h
