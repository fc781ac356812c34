"""Layers that own their state (`BatchNorm`, `Dropout`, `EMA`, `SpectralNorm`),
`Sequential`, and `WithState` for Equinox stateful models."""

from ._batch_norm import BatchNorm as BatchNorm
from ._dropout import Dropout as Dropout
from ._ema import EMA as EMA
from ._sequential import Sequential as Sequential
from ._spectral_norm import SpectralNorm as SpectralNorm
from ._with_state import WithState as WithState
