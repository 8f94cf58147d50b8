"""``diffusion.json``: what turns a checkpoint into a masked-diffusion LM."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from dlm_factory.dlm.checkpoint.record import StageRecord

SPEC_FILE = "diffusion.json"


class DiffusionSpec(BaseModel):
    """What turns a checkpoint into a masked-diffusion LM (stored as ``diffusion.json``)."""

    schema_version: int = Field(1, description="format version of this file")
    objective: Literal["masked_diffusion"] = Field("masked_diffusion", description="training objective (MDLM/LLaDA absorbing-state diffusion)")
    mask_token_id: int = Field(description="id of the [MASK] (absorbing) token")
    mask_token: str = Field(description="text of the mask token")
    shift: bool = Field(True, description="logits at position i predict token i+1 (DiffuLLaMA); first token never masked")
    eps: float = Field(1e-3, description="lower bound of the masking rate t ~ U(eps, 1)")
    tokenizer_digest: str = Field(description="sha256 of the tokenizer; ensemble members must match")
    source: str = Field("", description="where the AR checkpoint came from")
    source_digest: str = Field("", description="sha256 over the source's safetensors files")
    pad_token_ids: list[int] = Field(default_factory=list, description="rainbow padding tokens (set by instruction tuning): like EOS, each ends a response")
    stages: list[StageRecord] = Field(default_factory=list, description="the record of each stage that trained this model, oldest first")

    @field_validator("stages", mode="before")
    @classmethod
    def _legacy_stages(cls, value: Any) -> Any:
        """Specs written before the typed record kept untyped dicts: read them as legacy records."""
        if not isinstance(value, list):
            return value
        return [StageRecord.legacy(v) if isinstance(v, dict) and "inputs" not in v else v for v in value]

    def stage_names(self) -> list[str]:
        return [s.stage for s in self.stages]

    @classmethod
    def read(cls, model_dir: Path) -> DiffusionSpec:
        return cls.model_validate_json((Path(model_dir) / SPEC_FILE).read_text())

    def write(self, model_dir: Path) -> None:
        (Path(model_dir) / SPEC_FILE).write_text(self.model_dump_json(indent=2) + "\n")
