"""In-tree scheduling plugins (and migration policies). Each class documents its formula in its docstring."""

from pdgate.scheduler.plugins.filters import HealthFilter, RoleFilter
from pdgate.scheduler.plugins.lora import LoraAffinityFilter
from pdgate.scheduler.plugins.migration import LoadBalance, NoMigration
from pdgate.scheduler.plugins.pickers import (
    MaxScorePicker,
    PowerOfTwoPicker,
    RandomPicker,
    RoundRobinPicker,
)
from pdgate.scheduler.plugins.profile_handlers import AdaptivePdHandler, PdPathsHandler, PdSplitHandler
from pdgate.scheduler.plugins.scorers import (
    KvUsageScorer,
    LeastLoadedScorer,
    PrefixAffinityScorer,
)
from pdgate.scheduler.plugins.slo import (
    AlwaysAdmit,
    SloAdmitter,
    SloTpotFilter,
    SloTpotScorer,
    SloTtftScorer,
)

IN_TREE_PLUGINS = (
    HealthFilter,
    RoleFilter,
    LoraAffinityFilter,
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
    PdSplitHandler,
    AdaptivePdHandler,
    PdPathsHandler,
)
