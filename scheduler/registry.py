"""Plugin registry and the validated scheduling configuration.

In-tree plugins are registered explicitly; third-party ones are found through the Python
entry-point group ``pdgate.plugins`` (each entry point names a :class:`~scheduler.framework.Plugin`
subclass). Configuration, in the style of llm-d's endpoint picker::

    plugins:
      - {name: prefix, type: prefix-affinity}
      - {name: load, type: least-loaded}
      - {name: decode-role, type: role-filter, parameters: {role: decode}}
      - {name: pick, type: max-score}
    profiles:
      decode:
        - {pluginRef: decode-role}
        - {pluginRef: prefix, weight: 2}
        - {pluginRef: load, weight: 1}
        - {pluginRef: pick}

Unknown plugin types, references to undeclared plugins, scorers without a weight, weights on
non-scorers and profiles without exactly one picker are rejected at load with a message that
names the offending entry. Admitters and migration policies are configured on their own
(:meth:`PluginRegistry.create_admitter`, :meth:`PluginRegistry.create_migration_policy`), never
in a profile; so is the profile handler that decides which profiles run for a request
(``scheduling.profileHandler``, :meth:`PluginRegistry.create_profile_handler`; default ``pd-split``).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from importlib.metadata import entry_points
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pdgate.scheduler.framework import (
    PLUGIN_KINDS,
    Admitter,
    Filter,
    MigrationPolicy,
    Picker,
    Plugin,
    Profile,
    ProfileHandler,
    Scorer,
)
from pdgate.scheduler.plugins import IN_TREE_PLUGINS

ENTRY_POINT_GROUP = "pdgate.plugins"


class PluginSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    type: str = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)


class ProfileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    plugin_ref: str = Field(alias="pluginRef", min_length=1)
    weight: float | None = Field(None, ge=0)


class HandlerSpec(BaseModel):
    """``scheduling.profileHandler``: the plugin that decides which profiles run for a request."""

    model_config = ConfigDict(extra="forbid")
    type: str = Field("pd-split", min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)


class SchedulingConfig(BaseModel):
    """The ``scheduling`` section of a gateway config."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    plugins: list[PluginSpec]
    profiles: dict[str, list[ProfileEntry]]
    profile_handler: HandlerSpec = Field(default_factory=lambda: HandlerSpec(), alias="profileHandler")


class PluginConfigError(ValueError):
    """A scheduling configuration that cannot be built; the message names the entry."""


class PluginRegistry:
    """Plugin classes by kebab-case type name. One registry per gateway (no globals).

    With ``seed``, a plugin that takes a ``seed`` parameter and was given none gets one derived
    from it and the plugin's name (``pdgate simulate``: a run is reproducible for its seed).
    """

    def __init__(
        self,
        classes: Iterable[type[Plugin]] = IN_TREE_PLUGINS,
        *,
        load_entry_points: bool = True,
        seed: int | None = None,
    ) -> None:
        self.seed = seed
        self._classes: dict[str, type[Plugin]] = {}
        for cls in classes:
            self.register(cls)
        if load_entry_points:
            self.load_entry_points()

    def register(self, cls: type[Plugin]) -> None:
        if not cls.type_name:
            raise PluginConfigError(f"{cls.__qualname__} has no type_name")
        if not (isinstance(cls, type) and issubclass(cls, PLUGIN_KINDS)):
            raise PluginConfigError(
                f"{cls.type_name}: a plugin must subclass Filter, Scorer, Picker, Admitter, MigrationPolicy or ProfileHandler"
            )
        existing = self._classes.get(cls.type_name)
        if existing is not None and existing is not cls:
            raise PluginConfigError(
                f"plugin type {cls.type_name!r} is registered twice ({existing.__module__}, {cls.__module__})"
            )
        self._classes[cls.type_name] = cls

    def load_entry_points(self) -> None:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, Plugin)):
                raise PluginConfigError(f"entry point {ep.name!r} ({ep.value}) is not a pdgate Plugin class")
            self.register(cls)

    @property
    def types(self) -> list[str]:
        return sorted(self._classes)

    def get(self, type_name: str) -> type[Plugin]:
        cls = self._classes.get(type_name)
        if cls is None:
            raise PluginConfigError(f"unknown plugin type {type_name!r}; known: {', '.join(self.types)}")
        return cls

    def create(self, spec: PluginSpec) -> Plugin:
        cls = self.get(spec.type)
        parameters = dict(spec.parameters)
        if self.seed is not None and "seed" in cls.Params.model_fields and parameters.get("seed") is None:
            parameters["seed"] = self.seed * 1_000_003 + zlib.crc32(spec.name.encode())
        try:
            params = cls.Params.model_validate(parameters)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise PluginConfigError(
                f"plugin {spec.name!r} ({spec.type}): parameter {where!r}: {first['msg']}"
            ) from None
        return cls(spec.name, params)

    def create_admitter(self, type_name: str, parameters: Mapping[str, Any]) -> Admitter:
        """The admission plugin (``admission.admitter`` / ``admission.parameters`` in the config)."""
        cls = self.get(type_name)
        if not issubclass(cls, Admitter):
            raise PluginConfigError(f"admission.admitter: {type_name!r} is not an admitter plugin")
        plugin = self.create(PluginSpec(name="admission", type=type_name, parameters=dict(parameters)))
        return plugin  # type: ignore[return-value]

    def create_migration_policy(self, type_name: str, parameters: Mapping[str, Any]) -> MigrationPolicy:
        """The migration policy (``migration.policy`` / ``migration.parameters`` in the config)."""
        cls = self.get(type_name)
        if not issubclass(cls, MigrationPolicy):
            raise PluginConfigError(f"migration.policy: {type_name!r} is not a migration policy plugin")
        plugin = self.create(PluginSpec(name="migration", type=type_name, parameters=dict(parameters)))
        return plugin  # type: ignore[return-value]

    def create_profile_handler(self, spec: HandlerSpec, profiles: Mapping[str, Profile]) -> ProfileHandler:
        """The profile handler (``scheduling.profileHandler``), checked against the profiles it runs."""
        cls = self.get(spec.type)
        if not issubclass(cls, ProfileHandler):
            raise PluginConfigError(f"scheduling.profileHandler: {spec.type!r} is not a profile handler plugin")
        missing = [p for p in cls.profiles if p not in profiles]
        if missing:
            raise PluginConfigError(
                f"scheduling.profiles: missing profile(s) {missing} (profile handler {spec.type!r} runs "
                f"{list(cls.profiles)})"
            )
        plugin = self.create(PluginSpec(name="profile-handler", type=spec.type, parameters=dict(spec.parameters)))
        return plugin  # type: ignore[return-value]

    def build(self, config: SchedulingConfig | Mapping[str, Any]) -> dict[str, Profile]:
        """Instantiate the plugins and assemble the profiles; raises PluginConfigError."""
        if not isinstance(config, SchedulingConfig):
            config = SchedulingConfig.model_validate(config)
        plugins: dict[str, Plugin] = {}
        for spec in config.plugins:
            if spec.name in plugins:
                raise PluginConfigError(f"plugin name {spec.name!r} is declared twice")
            plugins[spec.name] = self.create(spec)
        return {name: _assemble(name, entries, plugins) for name, entries in config.profiles.items()}


def _assemble(name: str, entries: list[ProfileEntry], plugins: Mapping[str, Plugin]) -> Profile:
    filters: list[Filter] = []
    scorers: list[tuple[Scorer, float]] = []
    pickers: list[Picker] = []
    for entry in entries:
        plugin = plugins.get(entry.plugin_ref)
        if plugin is None:
            raise PluginConfigError(f"profile {name!r}: pluginRef {entry.plugin_ref!r} is not declared under plugins")
        if isinstance(plugin, Admitter):
            raise PluginConfigError(
                f"profile {name!r}: {entry.plugin_ref!r} is an admitter; admitters go under admission.admitter"
            )
        if isinstance(plugin, ProfileHandler):
            raise PluginConfigError(
                f"profile {name!r}: {entry.plugin_ref!r} is a profile handler; it goes under "
                "scheduling.profileHandler, not in a profile"
            )
        if isinstance(plugin, MigrationPolicy):
            raise PluginConfigError(
                f"profile {name!r}: {entry.plugin_ref!r} is a migration policy; "
                "migration policies go under migration.policy, not in a profile"
            )
        if isinstance(plugin, Scorer):
            if entry.weight is None:
                raise PluginConfigError(f"profile {name!r}: scorer {entry.plugin_ref!r} needs a weight")
            scorers.append((plugin, entry.weight))
            continue
        if entry.weight is not None:
            raise PluginConfigError(f"profile {name!r}: {entry.plugin_ref!r} is not a scorer and takes no weight")
        if isinstance(plugin, Filter):
            filters.append(plugin)
        else:
            pickers.append(plugin)  # type: ignore[arg-type]
    if len(pickers) != 1:
        raise PluginConfigError(f"profile {name!r}: needs exactly one picker, has {len(pickers)}")
    return Profile(name, tuple(filters), tuple(scorers), pickers[0])
