"""TRL trainer and config carrying the SWIM attention-grounding loss."""

from swim.trainer.config import SwimSFTConfig
from swim.trainer.sft import SwimSFTTrainer

__all__ = ["SwimSFTConfig", "SwimSFTTrainer"]
