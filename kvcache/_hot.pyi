from typing import Dict, List, Tuple

from typing_extensions import disjoint_base

STAT_NAMES: Dict[str, int]

def allocator_live() -> Tuple[int, int]: ...

@disjoint_base
class HotTier:
    n_layers: int
    capacity: int
    row_floats: int
    row_bytes: int
    closed: bool
    threads: int
    last_threads: int
    def __new__(cls, n_layers: int, capacity: int, row_floats: int,
                prefault: bool = True, threads: int = 1) -> "HotTier": ...
    def close(self) -> None: ...
    @property
    def nbytes(self) -> int: ...
    def stat(self, name: str) -> int: ...
    def _debug_arenas(self) -> List[Tuple[int, int, int]]: ...
