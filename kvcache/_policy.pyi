from typing import Dict

POLICIES: Dict[str, int]
