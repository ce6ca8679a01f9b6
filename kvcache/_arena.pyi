from typing import Tuple

from typing_extensions import disjoint_base

def allocator_live() -> Tuple[int, int]: ...

@disjoint_base
class Arena:
    nbytes: int
    def __new__(cls, nbytes: int) -> "Arena": ...

@disjoint_base
class WritableArena:
    def __new__(cls, arena: Arena) -> "WritableArena": ...

@disjoint_base
class ColdMap:
    length: int
    def __new__(cls, fd: int, length: int) -> "ColdMap": ...
