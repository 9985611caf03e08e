"""The model card required for approval.

A pydantic model so the CLI, the admin API and the registry share one
definition of "filled in": the five required fields must be present and
non-blank; anything else a team wants to record is kept as extra fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from lockgate.errors import InvalidArgument

FilledText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]

REQUIRED_CARD_FIELDS: tuple[str, ...] = (
    "owner",
    "intended_use",
    "training_data",
    "evaluation_metrics",
    "limitations",
)


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
