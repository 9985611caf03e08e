"""Inline governance: input validation, mergeable drift state and payload sampling.

Entry points: :class:`~lockgate.governance.engine.GovernanceEngine` (request path),
:class:`~lockgate.governance.config.GovernanceConfig` (``governance:`` in config.yaml),
:func:`~lockgate.governance.profile.build_profile` / ``ReferenceProfile`` (reference data),
and the typer apps ``profile_app``/``drift_app`` in :mod:`lockgate.governance.cli`.
"""

from .config import GovernanceConfig

__all__ = ["GovernanceConfig"]
