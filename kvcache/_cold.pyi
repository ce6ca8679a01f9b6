import os
from typing import Any, Dict, List, Union

import numpy as np
import numpy.typing as npt

from typing_extensions import disjoint_base

MAGIC: bytes
FORMAT_VERSION: int
INDEX_NAME: str
INDEX_MAGIC: str
DTYPE_CODES: Dict[str, int]
KINDS: tuple[str, str]
HEADER_SIZE: int
FINGERPRINT_FIELDS: tuple[str, ...]
INDEX_CONFIG_FIELDS: tuple[str, ...]

@disjoint_base
class ColdMap:
    length: int
    def __new__(cls, fd: int, length: int) -> "ColdMap": ...

class ColdStore:
    config: Any
    row_bytes: int
    map_bytes: int
    fds: List[int]
    maps: List[ColdMap]
    path: str
    def __init__(self, config: Any, existing: bool = False) -> None: ...
    def file_name(self, layer: int, kind: int) -> str: ...
    def file_sizes(self, layer: int) -> List[int]: ...
    def path_of(self, layer: int, kind: int) -> str: ...
    def view(self, layer: int, kind: int, start: int, stop: int) -> npt.NDArray[np.uint8]: ...
    def fsync(self) -> None: ...
    def write_index(self, layers: List[Dict[str, Any]]) -> None: ...
    def close(self) -> None: ...

def read_index(path: Union[str, "os.PathLike[str]"]) -> Dict[str, Any]: ...
