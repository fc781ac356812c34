"""eqstate: stateful field kinds for Equinox modules."""

from . import metrics as metrics, nn as nn
from ._checkpoint import abstract as abstract, load as load, save as save
from ._display import diff as diff, summary as summary
from ._filters import combine as combine, filter as filter, partition as partition, spec as spec
from ._grad import grad as grad, value_and_grad as value_and_grad
from ._jit import RetraceWarning as RetraceWarning, jit as jit
from ._kinds import (
    BatchStat as BatchStat,
    Kind as Kind,
    OptState as OptState,
    Param as Param,
    Rng as Rng,
    State as State,
    field as field,
)
from ._labels import labels as labels
from ._mode import eval as eval, train as train
from ._module import Module as Module, update as update
from ._mutating import (
    DroppedUpdateWarning as DroppedUpdateWarning,
    discard as discard,
    mutating as mutating,
)
from ._optimizer import Optimizer as Optimizer
from ._parallel import data_parallel as data_parallel
from ._resolve import kinds as kinds
from ._result import result as result
from ._rng import next_key as next_key
from ._shard import place as place, shardings as shardings
from ._vmap import vmap as vmap


__version__ = "0.1.0"
