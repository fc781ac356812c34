"""eqstate: stateful field kinds for Equinox modules."""

from ._filters import combine as combine, filter as filter, partition as partition, spec as spec
from ._kinds import (
    BatchStat as BatchStat,
    Kind as Kind,
    OptState as OptState,
    Param as Param,
    Rng as Rng,
    State as State,
    field as field,
)
from ._module import Module as Module, mutating as mutating
from ._resolve import kinds as kinds


__version__ = "0.1.0"
