"""lockgate.routing: traffic policies, the per-request router, shadow agreement and canaries.

Public API (import from here):
* policy:  `TrafficPolicy`, `ShadowSpec`, `CanarySpec`, `Guardrails`, `CanaryState`, `PolicyBook`,
           `PolicyError`, `StaleRevision`
* router:  `Router`, `RouteDecision`, `RouteDenied`, `UnknownVersion`, `NoServableVersion`
* shadow:  `ShadowAgreement`, `AgreementBook`, `AgreementSnapshot`
* changes: `PolicyChanges`, `NotServable`
* rollout: `CanaryController`, `CanaryAction`, `TrafficStats`, `WindowStats`, `VersionWindow`, `analyse`
"""

from lockgate.routing.changes import NotServable, PolicyChanges
from lockgate.routing.policy import (
    CanarySpec,
    CanaryState,
    Guardrails,
    PolicyBook,
    PolicyError,
    ShadowSpec,
    StaleRevision,
    TrafficPolicy,
)
from lockgate.routing.rollout import (
    Analysis,
    CanaryAction,
    CanaryController,
    GuardrailResult,
    TrafficStats,
    VersionWindow,
    WindowStats,
    analyse,
)
from lockgate.routing.router import NoServableVersion, RouteDecision, RouteDenied, Router, UnknownVersion
from lockgate.routing.shadow import AgreementBook, AgreementSnapshot, ShadowAgreement

__all__ = [
    "AgreementBook",
    "AgreementSnapshot",
    "Analysis",
    "CanaryAction",
    "CanaryController",
    "CanarySpec",
    "CanaryState",
    "GuardrailResult",
    "Guardrails",
    "NoServableVersion",
    "NotServable",
    "PolicyBook",
    "PolicyChanges",
    "PolicyError",
    "RouteDecision",
    "RouteDenied",
    "Router",
    "ShadowAgreement",
    "ShadowSpec",
    "StaleRevision",
    "TrafficPolicy",
    "TrafficStats",
    "UnknownVersion",
    "VersionWindow",
    "WindowStats",
    "analyse",
]
