"""What every op module provides, and the cost record used for roofline headroom."""
from dataclasses import dataclass


@dataclass(frozen=True)
class Cost:
    flops: int
    bytes_moved: int
