from typing import Any, Dict, NamedTuple, Optional

import numpy as np
import numpy.typing as npt

class DTypeInfo(NamedTuple):
    name: str
    code: int
    itemsize: int
    numpy: str
    torch: Optional[str]

DTYPES: Dict[str, DTypeInfo]

def row_bytes(dtype: str, n_heads: int, head_dim: int) -> int: ...
def numpy_dtype(dtype: str) -> np.dtype[Any]: ...
def unpack_rows(rows: npt.NDArray[np.uint8], dtype: str, n_heads: int, head_dim: int) -> Any: ...
