"""JSON schema export: a discriminated union over every registered step class."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, create_model


def step_union():
    """``Annotated[Union[NormSeparation, ...], discriminator="type"]`` over registered steps."""
    from kvq.registry import STEPS

    classes = list(dict.fromkeys(e.load() for e in STEPS.entries()))
    return Annotated[Union[tuple(classes)], Field(discriminator="type")]  # noqa: UP007


def json_schema(which: Literal["pipeline", "kvconfig"] = "kvconfig") -> dict:
    """JSON schema of a pipeline (list of steps or spec string) or of a KVConfig file."""
    spec_or_steps = Union[str, list[step_union()]]  # noqa: UP007
    pipeline = create_model("Pipeline", __config__=ConfigDict(extra="forbid"),
                            steps=(spec_or_steps, ...), check_finite=(bool, True))
    pipe_field = Union[str, list[step_union()], pipeline]  # noqa: UP007
    if which == "pipeline":
        return pipeline.model_json_schema()
    rope = Literal["post", "pre"]
    with_rope = create_model("KeysWithRope", __config__=ConfigDict(extra="forbid"),
                             rope=(rope, "post"), pipeline=(pipe_field | None, None))
    keys_field = Union[pipe_field, with_rope]  # noqa: UP007
    override = create_model("LayerOverride", __config__=ConfigDict(extra="forbid"),
                            keys=(keys_field | None, None), values=(pipe_field | None, None),
                            kv=(keys_field | None, None), key_rope=(rope | None, None))
    cfg = create_model("KVConfig", __base__=BaseModel, name=(str | None, None),
                       kv=(keys_field | None, None), keys=(keys_field | None, None),
                       values=(pipe_field | None, None), key_rope=(rope, "post"),
                       sinks=(int, Field(default=0, ge=0)), layers=(dict[int, override], {}))
    schema = cfg.model_json_schema()
    schema["additionalProperties"] = False
    return schema
