"""The model card required for approval.

A pydantic model so the CLI, the admin API and the registry share one
definition of "filled in": the five required fields must be present and
non-blank; anything else a team wants to record is kept as extra fields.

Provenance fields (vendor, SPDX ``license``, ``source``, ``third_party``, ``vendor_assessment``)
are written by people and checked against the trust policy at approval. ``signer`` and
``manifest_digest`` are written by lockgate from the verified ``model.sig``
(``lockgate.control.provenance``), never by hand: a card that gives other values is refused.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from lockgate.errors import InvalidArgument

FilledText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]

REQUIRED_CARD_FIELDS: tuple[str, ...] = (
    "owner",
    "intended_use",
    "training_data",
    "evaluation_metrics",
    "limitations",
)


#: Card fields lockgate fills in from the verified signature (refused when given otherwise).
SYSTEM_CARD_FIELDS: tuple[str, ...] = ("signer", "manifest_digest")
UNSIGNED = "unsigned"


def canonical_license(text: str) -> str:
    """The SPDX licence expression in canonical case (``apache-2.0`` -> ``Apache-2.0``).

    ``packaging.licenses`` carries the SPDX licence list, so an unknown id is refused here
    instead of being compared as free text at approval.
    """
    from packaging.licenses import InvalidLicenseExpression, canonicalize_license_expression

    try:
        return str(canonicalize_license_expression(text))
    except InvalidLicenseExpression as exc:
        raise ValueError(f"not an SPDX licence identifier or expression: {text!r} ({exc})") from None


class VendorAssessment(BaseModel):
    """Where the third-party vendor assessment is filed, and when it was done."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reference: FilledText = Field(description="ticket, document or URL of the assessment")
    date: dt.date


class ModelCard(BaseModel):
    """Who owns the model, what it is for, what it was trained and evaluated on, where it fails."""

    model_config = ConfigDict(extra="allow", frozen=True)

    owner: FilledText
    intended_use: FilledText
    training_data: FilledText = Field(description="reference to the training data set / snapshot")
    evaluation_metrics: Annotated[dict[str, float | str], Field(min_length=1)]
    limitations: FilledText
    description: str = ""
    ethical_considerations: str = ""
    # -- provenance, written by people ----------------------------------------------
    vendor: str = Field("", description="who produced the model (the vendor of a third-party model)")
    license: str = Field("", description="SPDX licence identifier or expression, e.g. Apache-2.0")
    source: str = Field("", description="where the artifact came from: URL or registry reference")
    third_party: bool = False
    vendor_assessment: VendorAssessment | None = None
    # -- provenance, filled in by lockgate from the verified model.sig -----------------
    signer: str = Field("", description="signer identity, or 'unsigned' (set by lockgate)")
    manifest_digest: str = Field("", description="sha256 over the signed manifest (set by lockgate)")

    @field_validator("license")
    @classmethod
    def _spdx(cls, value: str) -> str:
        return canonical_license(value) if value.strip() else ""


def parse_card(data: ModelCard | Mapping[str, Any]) -> ModelCard:
    """Validate ``data`` into a ``ModelCard``; the error names every bad field.

    Raises ``InvalidArgument`` (callers that gate on the card re-raise it
    as their own error type).
    """
    if isinstance(data, ModelCard):
        return data
    try:
        return ModelCard.model_validate(dict(data))
    except ValidationError as exc:
        problems: list[str] = []
        for error in exc.errors():
            name = ".".join(str(p) for p in error["loc"]) or "card"
            if error["type"] == "missing":
                problems.append(f"{name} is missing")
            elif error["type"] in ("string_too_short", "too_short"):
                problems.append(f"{name} is empty")
            else:
                problems.append(f"{name}: {error['msg']}")
        raise InvalidArgument("model card incomplete: " + "; ".join(problems)) from exc
