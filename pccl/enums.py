"""Public enums. Their ``.value`` strings are what travels on the control channel."""
from __future__ import annotations

import enum


class ReduceOp(str, enum.Enum):
    SUM = "sum"
    AVG = "avg"
    MIN = "min"
    MAX = "max"
    PROD = "prod"


class Quantization(str, enum.Enum):
    NONE = "none"
    FP16 = "fp16"
    BF16 = "bf16"
    UINT8 = "uint8"
    INT8 = "int8"
    FP4 = "fp4"


class Algorithm(str, enum.Enum):
    AUTO = "auto"
    RING = "ring"
    STAR = "star"
    HIERARCHICAL = "hierarchical"


class SyncStrategy(str, enum.Enum):
    ENFORCE_POPULAR = "enforce_popular"
    SEND_ONLY = "send_only"
    RECEIVE_ONLY = "receive_only"
