"""In-tree scheduling plugins (and migration policies). Each class documents its formula in its docstring."""

from scheduler.plugins.filters import HealthFilter, RoleFilter
from scheduler.plugins.migration import LoadBalance, NoMigration
from scheduler.plugins.pickers import (
    MaxScorePicker,
    PowerOfTwoPicker,
    RandomPicker,
    RoundRobinPicker,
)
from scheduler.plugins.scorers import (
    KvUsageScorer,
    LeastLoadedScorer,
    PrefixAffinityScorer,
)
from scheduler.plugins.slo import (
    AlwaysAdmit,
    SloAdmitter,
    SloTpotFilter,
    SloTpotScorer,
    SloTtftScorer,
)

IN_TREE_PLUGINS = (
    HealthFilter,
    RoleFilter,
    LeastLoadedScorer,
    KvUsageScorer,
    PrefixAffinityScorer,
    MaxScorePicker,
    RandomPicker,
    RoundRobinPicker,
    PowerOfTwoPicker,
    SloTtftScorer,
    SloTpotScorer,
    SloTpotFilter,
    SloAdmitter,
    AlwaysAdmit,
    LoadBalance,
    NoMigration,
)
