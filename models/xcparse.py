"""Compiled parser of Extreme Classification Repository lines (``l1,l2 fid:val fid:val``).

:func:`models.data.read_xc` feeds it the file a buffer of whole lines at a time. It writes
straight into CSR arrays sized beforehand from a count of the file's separators
(:func:`count_separators`), so reading holds no per-token Python objects and nothing beyond
the output and one buffer. Each row comes out with sorted, distinct feature ids (repeats
summed) and l2-normalized values, each label set sorted and distinct.
"""

from __future__ import annotations

import numba
import numpy as np

# Why a line was refused; read_xc turns the code into the message. GREW: the line holds
# more than the first pass counted (the file changed between the passes); the arrays are
# never written beyond their end, whatever the file does.
OK, BAD_LABEL, LABEL_RANGE, BAD_FEATURE, FEATURE_RANGE, BAD_VALUE, GREW = range(7)

# Slots of the parser's state, carried from one buffer to the next.
ROW, NNZ, NLAB, SKIPPED, LINE, ERR, ERR_START, ERR_END = range(8)
N_STATE = 8

_NL, _CR, _TAB, _SPACE = 10, 13, 9, 32
_COMMA, _COLON, _DOT, _PLUS, _MINUS = 44, 58, 46, 43, 45
_ZERO, _NINE = 48, 57
# Above this an id is out of range whatever the header says; stops int64 overflow.
_ID_CAP = 1 << 40
# Exact powers of ten: a mantissa below 2**53 scaled by one of them is correctly rounded
# (Clinger's fast path), so typical values parse to exactly Python's float().
_POW10 = np.array([10.0**k for k in range(23)])


@numba.njit(nogil=True, cache=True)
def count_separators(buf: np.ndarray) -> tuple[int, int, int]:
    """(newlines, colons, commas) in a buffer: bounds on rows, features and labels."""
    lines = colons = commas = 0
    for c in buf:
        if c == _NL:
            lines += 1
        elif c == _COLON:
            colons += 1
        elif c == _COMMA:
            commas += 1
    return lines, colons, commas


@numba.njit(inline="always")
def _is_blank(c: int) -> bool:
    return c in (_SPACE, _TAB, _CR)


@numba.njit(inline="always")
def _scale(m: float, exp: int) -> float:
    if 0 <= exp <= 22:
        return m * _POW10[exp]
    if -22 <= exp < 0:
        return m / _POW10[-exp]
    if exp > 0:
        return m * 10.0**exp
    # two steps, so that 10**-exp does not overflow to inf for tiny values
    return m / 10.0**min(-exp, 300) / 10.0**max(-exp - 300, 0)


@numba.njit(nogil=True)
def _parse_float(buf: np.ndarray, i: int, end: int) -> tuple[float, int, bool]:
    """A decimal number ``[+-]digits[.digits][(e|E)[+-]digits]`` starting at i and running
    to the next blank or end; returns (value, position after it, ok)."""
    neg = False
    if i < end and (buf[i] == _PLUS or buf[i] == _MINUS):
        neg = buf[i] == _MINUS
        i += 1
    m = 0
    exp = 0
    n_digits = 0
    seen_dot = False
    while i < end:
        c = buf[i]
        if _ZERO <= c <= _NINE:
            n_digits += 1
            if m < 100_000_000_000_000_000:  # 17 digits; later ones only scale the value
                m = m * 10 + (c - _ZERO)
                if seen_dot:
                    exp -= 1
            elif not seen_dot:
                exp += 1
        elif c == _DOT and not seen_dot:
            seen_dot = True
        else:
            break
        i += 1
    if n_digits == 0:
        return 0.0, i, False
    if i < end and (buf[i] == 101 or buf[i] == 69):  # e, E
        i += 1
        eneg = False
        if i < end and (buf[i] == _PLUS or buf[i] == _MINUS):
            eneg = buf[i] == _MINUS
            i += 1
        e = 0
        start = i
        while i < end and _ZERO <= buf[i] <= _NINE:
            e = min(e * 10 + (buf[i] - _ZERO), 100_000)
            i += 1
        if i == start:
            return 0.0, i, False
        exp += -e if eneg else e
    if i < end and not _is_blank(buf[i]):
        return 0.0, i, False
    v = _scale(float(m), exp)
    if not np.isfinite(v) or abs(v) > 3.4e38:  # beyond float32
        return 0.0, i, False
    return -v if neg else v, i, True


@numba.njit(nogil=True)
def _parse_id(buf: np.ndarray, i: int, end: int) -> tuple[int, int]:
    """Decimal digits from i: (value capped at _ID_CAP, position after them); value -1 when
    there is no digit."""
    v = 0
    start = i
    while i < end and _ZERO <= buf[i] <= _NINE:
        v = min(v * 10 + (buf[i] - _ZERO), _ID_CAP)
        i += 1
    return (v if i > start else -1), i


@numba.njit(nogil=True)
def _sort_unique_labels(ids: np.ndarray, lo: int, hi: int) -> int:
    """Sort ids[lo:hi] and drop repeats in place; returns the new end."""
    if hi - lo > 1:
        ids[lo:hi] = np.sort(ids[lo:hi])
    out = lo
    for k in range(lo, hi):
        if out == lo or ids[k] != ids[out - 1]:
            ids[out] = ids[k]
            out += 1
    return out


@numba.njit(nogil=True)
def _finish_row(indices: np.ndarray, data: np.ndarray, vals: np.ndarray, lo: int,
                hi: int) -> int:
    """Sort the row's features by id, sum repeats, l2-normalize (float64, then float32);
    ``vals[k - lo]`` holds the parsed value of position k. Returns the row's new end."""
    ordered = True
    for k in range(lo + 1, hi):
        if indices[k] <= indices[k - 1]:
            ordered = False
            break
    if not ordered:
        order = np.argsort(indices[lo:hi], kind="mergesort")
        idx = indices[lo:hi][order]
        v = vals[: hi - lo][order]
        out = 0
        for k in range(hi - lo):
            if out > 0 and idx[k] == indices[lo + out - 1]:
                vals[out - 1] += v[k]
            else:
                indices[lo + out] = idx[k]
                vals[out] = v[k]
                out += 1
        hi = lo + out
    sq = 0.0
    for k in range(hi - lo):
        sq += vals[k] * vals[k]
    norm = np.sqrt(sq) if sq > 0.0 else 1.0
    for k in range(hi - lo):
        data[lo + k] = vals[k] / norm
    return hi


@numba.njit(nogil=True)
def _parse_line(buf: np.ndarray, s: int, e: int, n_features: int, n_labels: int,
                indices: np.ndarray, vals: np.ndarray, lab_ids: np.ndarray, nnz: int, nlab: int,
                err: np.ndarray) -> tuple[int, int, int]:
    """One non-blank line buf[s:e] (trailing blanks cut) appended at nnz / nlab, its values
    into vals[0:]; returns (new nnz, new nlab, error code); on an error ``err`` holds the
    offending token's span."""
    i = s
    lo = nnz
    if buf[i] != _SPACE:  # a leading space: no labels
        while True:
            lab, j = _parse_id(buf, i, e)
            if lab < 0 or (j < e and buf[j] != _COMMA and buf[j] != _SPACE):
                k = j
                while k < e and buf[k] != _SPACE:
                    k += 1
                err[0], err[1] = s, k
                return nnz, nlab, BAD_LABEL
            if lab >= n_labels:
                err[0], err[1] = i, j
                return nnz, nlab, LABEL_RANGE
            if nlab >= len(lab_ids):
                return nnz, nlab, GREW
            lab_ids[nlab] = lab
            nlab += 1
            i = j
            if i >= e or buf[i] == _SPACE:
                break
            i += 1  # the comma
    while True:
        while i < e and _is_blank(buf[i]):
            i += 1
        if i >= e:
            return nnz, nlab, OK
        t = i
        fid, i = _parse_id(buf, i, e)
        if fid < 0 or i >= e or buf[i] != _COLON:
            while i < e and not _is_blank(buf[i]):
                i += 1
            err[0], err[1] = t, i
            return nnz, nlab, BAD_FEATURE
        if fid >= n_features:
            err[0], err[1] = t, i
            return nnz, nlab, FEATURE_RANGE
        if nnz >= len(indices):
            return nnz, nlab, GREW
        v, i, ok = _parse_float(buf, i + 1, e)
        if not ok:
            while i < e and not _is_blank(buf[i]):
                i += 1
            err[0], err[1] = t, i
            return nnz, nlab, BAD_VALUE
        indices[nnz] = fid
        vals[nnz - lo] = v
        nnz += 1


@numba.njit(nogil=True, cache=True)
def parse_lines(buf: np.ndarray, n_features: int, n_labels: int, skip_bad: bool,
                indptr: np.ndarray, indices: np.ndarray, data: np.ndarray,
                lab_indptr: np.ndarray, lab_ids: np.ndarray, state: np.ndarray) -> None:
    """Parse whole lines into the CSR arrays from the positions in ``state`` (see the slot
    names above), updating it. Stops at the
    first bad line unless ``skip_bad``: ``state[ERR]`` is then its code, ``state[LINE]``
    its number and ``state[ERR_START]:state[ERR_END]`` the offending token in ``buf``."""
    row, nnz, nlab = state[ROW], state[NNZ], state[NLAB]
    err = np.zeros(2, dtype=np.int64)
    vals = np.empty(1024)  # one row's values in float64, grown for longer lines
    s = 0
    n = len(buf)
    while s < n:
        e = s
        while e < n and buf[e] != _NL:
            e += 1
        nxt = e + 1
        state[LINE] += 1
        while e > s and _is_blank(buf[e - 1]):
            e -= 1
        first = s
        while first < e and _is_blank(buf[first]):
            first += 1
        if first < e:  # blank lines are no documents
            if (e - s) // 2 + 1 > len(vals):  # a feature takes at least 2 bytes ("0:1 ")
                vals = np.empty(e - s)
            new_nnz, new_nlab, code = _parse_line(buf, s, e, n_features, n_labels, indices,
                                                  vals, lab_ids, nnz, nlab, err)
            if code == OK and row + 1 >= len(indptr):
                code = GREW
            if code != OK:
                if not skip_bad or code == GREW:
                    state[ROW], state[NNZ], state[NLAB] = row, nnz, nlab
                    state[ERR], state[ERR_START], state[ERR_END] = code, err[0], err[1]
                    return
                state[SKIPPED] += 1
            else:
                nnz = _finish_row(indices, data, vals, nnz, new_nnz)
                nlab = _sort_unique_labels(lab_ids, nlab, new_nlab)
                row += 1
                indptr[row] = nnz
                lab_indptr[row] = nlab
        s = nxt
    state[ROW], state[NNZ], state[NLAB] = row, nnz, nlab
