"""Turning caller inputs into float32 ndarrays the copy loops can read, or refusing them.

Accepted: numpy arrays, and objects exporting the buffer protocol,
``__array_interface__`` or ``__array__`` (torch CPU tensors), viewed without a
copy.  The dtype must already be float32: nothing is converted silently.
"""
import numpy as np

cimport numpy as cnp
from cpython.buffer cimport PyObject_CheckBuffer

cnp.import_array()


cdef str _shape_str(cnp.ndarray a):
    return "[" + ", ".join([str(a.shape[i]) for i in range(a.ndim)]) + "]"


cdef cnp.ndarray as_array(object obj, str name, bint writable):
    """``obj`` as an aligned, native-order float32 ndarray (no copy) or a clear error."""
    cdef cnp.ndarray a
    if cnp.PyArray_Check(obj):
        a = <cnp.ndarray>obj
    elif (PyObject_CheckBuffer(obj) or hasattr(obj, "__array_interface__")
          or hasattr(type(obj), "__array__")) and not isinstance(obj, (str, bytes)):
        try:
            a = np.asarray(obj)
        except Exception as exc:  # e.g. a torch tensor that requires grad or lives on a GPU
            raise TypeError(f"{name}: cannot view {type(obj).__name__} as a float32 CPU array "
                            f"({exc})") from exc
    else:
        raise TypeError(f"{name}: expected a float32 array (numpy array, torch CPU tensor or "
                        f"buffer), got {type(obj).__name__}")
    if cnp.PyArray_TYPE(a) != cnp.NPY_FLOAT32 or not cnp.PyArray_ISNOTSWAPPED(a):
        raise TypeError(f"{name}: expected dtype float32, got {a.dtype}")
    if not cnp.PyArray_ISALIGNED(a):
        raise ValueError(f"{name}: expected a float32-aligned array, got one at a misaligned address")
    if writable and not cnp.PyArray_ISWRITEABLE(a):
        raise ValueError(f"{name}: expected a writable array, got a read-only one")
    return a


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
    if (head_dim > 1 and strides[nd - 1] != 4) or (n_heads > 1 and strides[nd - 2] != head_dim * 4):
        raise ValueError(f"{name}: expected the last two dimensions [{n_heads}, {head_dim}] to be "
                         f"C-contiguous, got strides {(<object>a).strides}")
    return shape[0] if nd > 2 else 1
