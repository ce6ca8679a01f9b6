"""Turning caller inputs into float32 ndarrays the copy loops can read, or refusing them.

Accepted: numpy arrays, and objects exporting the buffer protocol,
``__array_interface__`` or ``__array__`` (torch CPU tensors), viewed without a
copy.  Stores take float32, float16 or bfloat16 (ml_dtypes or torch); outputs
are float32.  Nothing is converted silently.
"""
import numpy as np

cimport numpy as cnp
from cpython.buffer cimport PyObject_CheckBuffer
from cpython.number cimport PyIndex_Check

from kvcache._hot cimport HotTier

from kvcache._codec cimport FMT_F32, FMT_F16, FMT_BF16

cnp.import_array()


cdef str _shape_str(cnp.ndarray a):
    return "[" + ", ".join([str(a.shape[i]) for i in range(a.ndim)]) + "]"


cdef object _torch_bfloat16(object obj, str name):
    """A torch bfloat16 CPU tensor as an ml_dtypes.bfloat16 array (no copy), else None.

    numpy has no bfloat16 of its own, so ``np.asarray`` refuses such tensors.
    torch is not imported here: the caller's tensor proves it already is.
    Refused like numpy refuses the other dtypes: a tensor that requires grad,
    lives on another device, or has a lazy negation (TypeError).
    """
    import sys
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(obj, torch.Tensor) or obj.dtype != torch.bfloat16:
        return None
    import ml_dtypes
    try:
        if obj.requires_grad:  # an int16 view would hide it
            raise RuntimeError("Can't call numpy() on Tensor that requires grad")
        return obj.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    except (RuntimeError, TypeError) as exc:
        raise TypeError(f"{name}: cannot view Tensor as a float CPU array ({exc})") from exc


cdef cnp.ndarray as_array(object obj, str name, bint writable, bint any_float=False):
    """``obj`` as an aligned, native-order ndarray (no copy) or a clear error.

    The dtype must be float32, or with ``any_float`` float16 or bfloat16 too:
    nothing is converted silently.
    """
    cdef cnp.ndarray a
    if cnp.PyArray_Check(obj):
        a = <cnp.ndarray>obj
    elif (PyObject_CheckBuffer(obj) or hasattr(obj, "__array_interface__")
          or hasattr(type(obj), "__array__")) and not isinstance(obj, (str, bytes)):
        try:
            a = np.asarray(obj)
        except Exception as exc:  # a torch tensor that requires grad, lives on a GPU, or is bfloat16
            bf16 = _torch_bfloat16(obj, name) if any_float else None
            if bf16 is None:
                raise TypeError(f"{name}: cannot view {type(obj).__name__} as a float CPU array "
                                f"({exc})") from exc
            a = bf16
    else:
        raise TypeError(f"{name}: expected a float32 array (numpy array, torch CPU tensor or "
                        f"buffer), got {type(obj).__name__}")
    if array_kind(a) < 0 or (not any_float and array_kind(a) != FMT_F32) or not cnp.PyArray_ISNOTSWAPPED(a):
        expected = "float32, float16 or bfloat16" if any_float else "float32"
        raise TypeError(f"{name}: expected dtype {expected}, got {a.dtype}")
    if not cnp.PyArray_ISALIGNED(a):
        raise ValueError(f"{name}: expected an aligned array, got one at a misaligned address")
    if writable and not cnp.PyArray_ISWRITEABLE(a):
        raise ValueError(f"{name}: expected a writable array, got a read-only one")
    return a


cdef int array_kind(cnp.ndarray a):
    """The row format (FMT_*) of an array's dtype, or -1."""
    cdef int t = cnp.PyArray_TYPE(a)
    if t == cnp.NPY_FLOAT32:
        return FMT_F32
    if t == cnp.NPY_FLOAT16:
        return FMT_F16
    if a.dtype.name == "bfloat16" and a.dtype.itemsize == 2:  # ml_dtypes.bfloat16
        return FMT_BF16
    return -1


cdef Py_ssize_t check_rows(cnp.ndarray a, str name, int ndim, Py_ssize_t n_heads,
                           Py_ssize_t head_dim, bint or_single=False) except -1:
    """Check ``a`` is ``[..., n_heads, head_dim]`` of rank ``ndim`` with dense inner rows.

    With ``or_single``, one token of rank 2 is accepted too.  Returns the size
    of the first axis (1 for a single token).
    """
    cdef int nd = cnp.PyArray_NDIM(a)
    cdef cnp.npy_intp *shape = cnp.PyArray_DIMS(a)
    cdef cnp.npy_intp *strides = cnp.PyArray_STRIDES(a)
    if (nd != ndim and not (or_single and nd == 2)) or shape[nd - 1] != head_dim or shape[nd - 2] != n_heads:
        lead = ["T", "n_layers, T"][ndim - 3] + ", " if ndim > 2 else ""
        expected = f"[{lead}{n_heads}, {head_dim}] (rank {ndim})"
        if or_single:
            expected = f"[{n_heads}, {head_dim}] or " + expected
        raise ValueError(f"{name}: expected shape {expected}, got {_shape_str(a)}")
    if cnp.PyArray_SIZE(a) == 0:
        return shape[0] if nd > 2 else 1  # no element to lay out: any strides will do
    cdef Py_ssize_t item = cnp.PyArray_ITEMSIZE(a)
    if (head_dim > 1 and strides[nd - 1] != item) or (n_heads > 1 and strides[nd - 2] != head_dim * item):
        raise ValueError(f"{name}: expected the last two dimensions [{n_heads}, {head_dim}] to be "
                         f"C-contiguous, got strides {(<object>a).strides}")
    return shape[0] if nd > 2 else 1


cdef int same_kind(cnp.ndarray k, cnp.ndarray v) except -1:
    """The row format of keys and values of one dtype, else TypeError."""
    if array_kind(k) != array_kind(v):
        raise TypeError(f"values: expected the dtype of keys ({k.dtype}), got {v.dtype}")
    return array_kind(k)


cdef int check_tokens(Py_ssize_t n_keys, Py_ssize_t n_values) except -1:
    """Keys and values of the same number (> 0) of tokens, else ValueError."""
    if n_keys == 0 or n_values == 0:
        raise ValueError(f"{'keys' if n_keys == 0 else 'values'}: expected at least one token, got 0")
    if n_values != n_keys:
        raise ValueError(f"values: expected {n_keys} tokens like keys, got {n_values}")
    return 0


cdef int check_flag(str name, object value) except -1:
    """A get() flag that is a bool, else TypeError."""
    if not isinstance(value, (bool, np.bool_)):  # copy="False" or None must not pick a mode
        raise TypeError(f"get: {name} expected a bool, got {type(value).__name__}")
    return 0


cdef Py_ssize_t position(str name, object value, Py_ssize_t length, Py_ssize_t default) except? -1:
    """A get() position like a slice bound (None: ``default``; negative from the
    end), else TypeError / IndexError: out-of-range values are not clipped."""
    if value is None:
        return default
    if not PyIndex_Check(value) or isinstance(value, bool):
        raise TypeError(f"get: {name} expected an int or None, got {type(value).__name__}")
    cdef Py_ssize_t p
    try:
        p = value
    except OverflowError:
        raise IndexError(f"get: {name}={value} is outside the {length} positions stored") from None
    if p < 0:
        p += length
    if p < 0 or p > length:
        raise IndexError(f"get: {name}={value} is outside the {length} positions stored")
    return p


cdef tuple check_out(object out, Py_ssize_t n, Py_ssize_t n_heads, Py_ssize_t head_dim):
    """get()'s ``out=``: a pair of writable, non-overlapping float32 ``[n, n_heads,
    head_dim]`` arrays, else TypeError / ValueError."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError(f"out: expected a (keys_out, values_out) pair, got {type(out).__name__}")
    cdef cnp.ndarray ko = as_array(out[0], "out[0]", True)
    cdef cnp.ndarray vo = as_array(out[1], "out[1]", True)
    for name, a in (("out[0]", ko), ("out[1]", vo)):
        if check_rows(a, name, 3, n_heads, head_dim) != n:
            raise ValueError(f"{name}: expected shape [{n}, {n_heads}, {head_dim}], "
                             f"got {list((<object>a).shape)}")
    if n and np.may_share_memory(ko, vo):
        raise ValueError("out: keys_out and values_out overlap")
    return ko, vo


cdef cnp.ndarray unaliased(HotTier hot, cnp.ndarray a):
    """``a``, or a copy of it if it views the cache's own memory (``get(copy=False)``):
    a store into rows that it is still reading would read what it has just written."""
    cdef const char *lo = <const char *>cnp.PyArray_DATA(a)
    cdef const char *hi = lo
    cdef int i
    cdef Py_ssize_t extent
    for i in range(cnp.PyArray_NDIM(a)):
        extent = (cnp.PyArray_DIM(a, i) - 1) * cnp.PyArray_STRIDE(a, i)
        if extent < 0:
            lo += extent
        else:
            hi += extent
    hi += cnp.PyArray_ITEMSIZE(a)
    return np.array(a, order="C") if hot.overlaps(lo, hi) else a
