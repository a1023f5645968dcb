"""SWIM supervised fine-tuning of a Qwen VL model: next-token loss + attention grounding (SWIM: the `<ins>`-tagged
words' attention on the object's masks; KLAL mode: the answer token's attention on a three-level map).

    swim train --config recipes/demo_cpu.yaml [--attn_weight 0 --output_dir runs/x ...]
    python -m swim.train --config recipes/swim_7b.yaml           # under torchrun / accelerate on a cluster

Every setting lives in the recipe (YAML) and can be overridden on the command line (TrlParser). The model's
family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL dense/MoE, Qwen3.5; `swim.modeling.families`) is read from its config
and sets the class, the vision geometry, the token layout and the default pixel budgets. The resolved
configuration is written to `<output_dir>/swim_config.yaml`; checkpoints are plain checkpoints of the stock class.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from datasets import Dataset
from transformers import AutoConfig, AutoTokenizer
from transformers.utils import is_flash_attn_2_available
from trl import ModelConfig, TrlParser, get_peft_config

from swim.checkpoint import RunProcessor
from swim.data.collator import SwimCollator
from swim.data.dataset import SwimDataset
from swim.data.mixture import load_mixture
from swim.data.records import load_records
from swim.data.tags import QUERY_MODES, SWIM_SYSTEM_PROMPT
from swim.data.video import VideoSettings
from swim.modeling.families import FamilySpec, family_of
from swim.modeling.model import swim_model_class
from swim.seg.config import SegConfig
from swim.trainer import SwimSFTConfig, SwimSFTTrainer
from swim.trainer.distributed import describe_parallelism, shutdown_distributed

logger = logging.getLogger("swim.train")


@dataclass
class DataArguments:
    """What to train on, how videos and images become tokens, and which rows are supervised."""

    data_config: str = field(
        metadata={"help": "Mixture YAML (data_config/*.yaml) or one record file (.json/.jsonl)."}
    )
    data_root: str | None = field(default=None, metadata={"help": "Media root for a single record file."})
    num_frames: int = field(default=32, metadata={"help": "Uniformly sampled frames per video."})
    sample_fps: float | None = field(
        default=None, metadata={"help": "Sample by fps instead of a fixed count."}
    )
    max_frames: int = field(default=32, metadata={"help": "Hard cap on frames (annotated frames included)."})
    min_pixels: int | None = field(
        default=None,
        metadata={"help": "Per-frame (per-image) minimum pixels (default: the family's, 128 merged tokens)."},
    )
    max_pixels: int | None = field(
        default=None,
        metadata={"help": "Per-frame (per-image) maximum pixels (default: the family's, 768 merged tokens)."},
    )
    total_pixels: int | None = field(
        default=None,
        metadata={"help": "Whole-video pixel budget (default: the family's, 115200 merged tokens)."},
    )
    pair_mode: str = field(
        default="union", metadata={"help": "Mask of a temporal group: union | mean of its frames."}
    )
    supervise_qa: bool = field(default=False, metadata={"help": "Attention-supervise QA records too."})
    attn_query: str = field(
        default="tags",
        metadata={
            "help": f"Supervised rows, one of {QUERY_MODES}: the <ins>-tagged words (SWIM), the last token of each "
            "answer (KLAL) or every answer token; attn_query_offset then shifts them."
        },
    )
    system_prompt: str = field(
        default=SWIM_SYSTEM_PROMPT, metadata={"help": "System prompt of every sample."}
    )
    max_sample_length: int | None = field(default=None, metadata={"help": "Skip (and count) longer samples."})
    strict_data: bool = field(
        default=False, metadata={"help": "Fail on the first bad record instead of skipping."}
    )
    cache_samples: bool = field(
        default=False, metadata={"help": "Keep decoded samples in memory (small sets)."}
    )

    def video_settings(self, family: FamilySpec) -> VideoSettings:
        """The family's preset (geometry, qwen-vl-utils budgets) with the values set here."""
        return family.video_settings(num_frames=self.num_frames, sample_fps=self.sample_fps,
                                     max_frames=self.max_frames, min_pixels=self.min_pixels,
                                     max_pixels=self.max_pixels, total_pixels=self.total_pixels)  # fmt: skip


class IndexCollator:
    """TRL needs a `datasets.Dataset`: we give it row indices and decode videos here, in the DataLoader workers."""

    def __init__(self, dataset: SwimDataset, collator: SwimCollator, cache: bool = False):
        self.dataset, self.collator = dataset, collator
        self.cache: dict[int, dict] | None = {} if cache else None

    def sample(self, i: int) -> dict:
        if self.cache is None:
            return self.dataset[i]
        if i not in self.cache:
            self.cache[i] = self.dataset[i]
        return self.cache[i]

    def __call__(self, rows: list[dict]) -> dict:
        return self.collator([self.sample(row["index"]) for row in rows])


def load_data(args: DataArguments, seed: int):
    path = Path(args.data_config)
    if path.suffix in (".yaml", ".yml"):
        records, problems = load_mixture(path, seed=seed, errors="raise" if args.strict_data else "collect")
    else:
        records, problems = load_records(path, data_root=args.data_root,
                                         errors="raise" if args.strict_data else "collect")  # fmt: skip
    if problems:
        logger.warning("%d malformed records left out (first: %s)", len(problems), problems[0])
    return records


def resolve_attn_implementation(requested: str | None) -> str:
    if requested == "flash_attention_2" and not is_flash_attn_2_available():
        logger.warning("flash_attention_2 requested but flash-attn is not installed: using sdpa")
        return "sdpa"
    return requested or "sdpa"


def save_resolved_config(output_dir: str, *configs) -> None:
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    resolved = {type(c).__name__: _plain(asdict(c)) for c in configs}
    (Path(output_dir) / "swim_config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))


def _plain(value):
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value if isinstance(value, str | int | float | bool | type(None)) else str(value)


def make_parser() -> TrlParser:
    """The recipe parser: data, training (SFT + SWIM), model and segmentation-head (`swim.seg`) arguments."""
    return TrlParser((DataArguments, SwimSFTConfig, ModelConfig, SegConfig))


def main(argv: list[str] | None = None) -> SwimSFTTrainer:
    # ---- parse
    data_args, training_args, model_args, seg_args = make_parser().parse_args_and_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    save_resolved_config(training_args.output_dir, data_args, training_args, model_args, seg_args)

    # ---- data
    config = AutoConfig.from_pretrained(model_args.model_name_or_path)
    family = family_of(config)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    records = load_data(data_args, training_args.seed)
    dataset_kwargs = dict(
        strict=data_args.strict_data, system_prompt=data_args.system_prompt, supervise_qa=data_args.supervise_qa,
        pair_mode=data_args.pair_mode, max_length=data_args.max_sample_length, family=family,
        query=data_args.attn_query,
    )  # fmt: skip

    # ---- model
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    model = swim_model_class(config).from_pretrained(
        model_args.model_name_or_path, dtype=dtype,
        attn_implementation=resolve_attn_implementation(model_args.attn_implementation),
    )  # fmt: skip

    if seg_args.seg_head:  # the segmentation head's targets (swim.seg); its [SEG] token when it has one
        from swim.seg.data import SegCollator, SegDataset, add_seg_token, seg_data_config

        seg_token_id = (
            add_seg_token(tokenizer, model, seg_args.seg_token) if seg_args.seg_query == "seg_token" else None
        )
        dataset = SegDataset(records, data_args.video_settings(family), tokenizer, seg=seg_data_config(seg_args),
                             seg_token_id=seg_token_id, **dataset_kwargs)  # fmt: skip
        batcher = SegCollator(tokenizer.pad_token_id)
    else:
        dataset = SwimDataset(records, data_args.video_settings(family), tokenizer, **dataset_kwargs)
        batcher = SwimCollator(tokenizer.pad_token_id)
    collator = IndexCollator(dataset, batcher, cache=data_args.cache_samples)
    train_dataset = Dataset.from_dict({"index": list(range(len(dataset)))})

    # ---- trainer
    trainer = SwimSFTTrainer(
        model=model, args=training_args, train_dataset=train_dataset, data_collator=collator,
        processing_class=tokenizer, peft_config=get_peft_config(model_args), seg=seg_args,
        processor=RunProcessor(model_args.model_name_or_path, tokenizer),
    )  # fmt: skip

    # ---- train
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    dataset.log_skips()
    logger.info("trained with %s", describe_parallelism(trainer))

    # ---- save (a stock folder: weights under the stock names + the processor; swim.checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    shutdown_distributed()
    return trainer


if __name__ == "__main__":
    main()
