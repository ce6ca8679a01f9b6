from typing import Any, Dict

import numpy as np
import numpy.typing as npt

FORMATS: Dict[str, int]

def unpack_rows(rows: npt.NDArray[np.uint8], dtype: str, n_heads: int, head_dim: int) -> Any: ...
