from typing import Any

from typing_extensions import disjoint_base

INDEX_NAME: str

@disjoint_base
class Persisted:
    def __init__(self, config: Any, hot: Any) -> None: ...
