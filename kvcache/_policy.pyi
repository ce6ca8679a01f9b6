from typing import Dict, NamedTuple

class PolicyInfo(NamedTuple):
    name: str
    code: int
    promotes: bool

POLICIES: Dict[str, PolicyInfo]
