"""Layers that own their state: `BatchNorm`, `Dropout`, `EMA`."""

from ._batch_norm import BatchNorm as BatchNorm
from ._dropout import Dropout as Dropout
from ._ema import EMA as EMA
