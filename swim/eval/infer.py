"""Answer one question about one video or image(s) with a (SWIM or stock) checkpoint of any supported Qwen VL
family.

    swim infer --model CKPT --video clip.mp4 --question "What is the man in the red shirt holding?"
    swim infer --model CKPT --image grid.png --question "Which cell has the green triangle?" \
        --attention out/ --attention-query answer_last --attention-query-offset -1     # KLAL's answer-token map

The answer goes to stdout; logs go to stderr. ``<ins>`` tags in the question are removed (the words stay).
Frame sampling and resizing default to the training settings (see ``swim infer --help``).

`infer` returns an `InferResult` holding the exact model inputs and the generated token ids: code that wants
to look inside the model for this answer (e.g. attention overlays with a teacher-forced pass over
prompt + answer) starts from there instead of re-encoding the video.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from swim.data.tags import QUERY_MODES
from swim.data.video import VideoSettings
from swim.eval.bench_q import clean_text
from swim.eval.generate import (
    EncodedPrompt,
    GenerationSettings,
    Generator,
    GenItem,
    LoadedModel,
    add_generation_args,
    add_model_args,
    add_video_args,
    collate_left,
    generate_batch,
    generation_settings_from_args,
    load_model,
    video_settings_from_args,
)
from swim.modeling.capture import parse_layers
from swim.modeling.losses import HEAD_FUSIONS

logger = logging.getLogger(__name__)


@dataclass
class InferResult:
    answer: str
    question: str  # as given to the model (tags removed)
    encoded: EncodedPrompt  # unbatched model inputs (prompt ids, video or image patches, grids)
    inputs: dict[str, torch.Tensor]  # the batch of one passed to generate() (CPU tensors)
    answer_ids: list[int]  # generated token ids, without the end-of-turn token


def infer(
    loaded: LoadedModel,
    video: str | Path | None,
    question: str,
    *,
    images: tuple[str | Path, ...] = (),
    video_settings: VideoSettings | None = None,
    settings: GenerationSettings | None = None,
) -> InferResult:
    """Decode `video` (or read `images`), build the chat prompt and greedily generate the answer (raises on
    failure)."""
    generator = Generator(
        loaded, video_settings or loaded.family.video_settings(), settings or GenerationSettings()
    )
    text = clean_text(question)
    item = GenItem(
        "0", Path(video) if video is not None else None, text, images=tuple(Path(i) for i in images)
    )
    encoded = generator.encode(item)
    inputs = collate_left([encoded], loaded.tokenizer.pad_token_id)
    (answer,), (ids,) = generate_batch(loaded.model, loaded.tokenizer, inputs, generator.generation_config)
    return InferResult(answer=answer, question=text, encoded=encoded, inputs=inputs, answer_ids=ids)


def attention_overlays(
    loaded: LoadedModel,
    result: InferResult,
    question: str,
    *,
    video_settings: VideoSettings,
    system_prompt: str | None,
    layers: list[int] | str | None,
    out_dir: str | Path,
    query: str = "tags",
    query_offset: int = 0,
    head_fusion: str = "mean",
) -> list[Path]:
    """Teacher-force prompt + generated answer and draw the attention of the chosen rows on the frames / images
    the model saw, one row per layer: with ``query="tags"`` one PNG per `<ins>`-tagged phrase (every occurrence,
    question and answer); with ``answer_last`` / ``answer_all`` one PNG of the answer token(s) (KLAL)."""
    from swim.data.records import Turn
    from swim.data.tags import build_text, check_turn_tags, distinct_phrases
    from swim.vis.attention import RecordMaps, attention_on_vision, draw_grid, group_frames

    turns = [Turn("user", question), Turn("assistant", result.answer)]
    phrases = distinct_phrases(check_turn_tags(turns)) if query == "tags" else ["answer"]
    if not phrases:
        raise SystemExit("--attention needs <ins>...</ins> around the words to look at, in --question "
                         "(or --attention-query answer_last)")  # fmt: skip
    encoded, family = result.encoded, loaded.family
    if encoded.pixel_values is not None:
        media = [family.image_span(grid) for grid in encoded.image_grid_thw]
    else:
        media = [encoded.span]
    text = build_text(loaded.tokenizer, turns, media=media, n_objects=len(phrases), system_prompt=system_prompt,
                      query=query)  # fmt: skip
    if len(text.query_positions) == 0:
        raise SystemExit(f"no rows to draw ({query}): is the generated answer empty?")
    device = loaded.device
    batch = {
        "input_ids": text.input_ids[None].to(device),
        "attention_mask": torch.ones(1, text.input_ids.numel(), dtype=torch.long, device=device),
        "mm_token_type_ids": text.mm_token_type_ids[None].to(device),
    }
    for key in (
        "pixel_values_videos",
        "video_grid_thw",
        "second_per_grid_ts",
        "pixel_values",
        "image_grid_thw",
    ):
        if key in result.inputs:
            value = result.inputs[key].to(device)
            batch[key] = value.to(loaded.dtype) if value.is_floating_point() and "pixel" in key else value
    frames = group_frames({k: v.cpu() for k, v in batch.items()}, video_settings)
    written = []
    for k, phrase in enumerate(phrases):
        rows = (text.query_positions[text.query_objects == k] + query_offset).to(device)
        maps = attention_on_vision(loaded.model, batch, rows, layers, video_settings, head_fusion)
        empty = [np.zeros_like(m) for m in maps["fused"]]
        record = RecordMaps(frames, maps, empty, np.zeros(len(frames), bool))
        slug = "".join(c if c.isalnum() else "_" for c in phrase)[:40]
        path = Path(out_dir) / f"attention_{k}_{slug}.png"
        written.append(draw_grid({name: (record, name) for name in maps}, path, title=f'"{phrase}"'))
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swim infer", description=__doc__.splitlines()[0])
    media = parser.add_mutually_exclusive_group(required=True)
    media.add_argument("--video", help="video file or folder of frames")
    media.add_argument("--image", nargs="+", help="image file(s), in order")
    parser.add_argument("--question", required=True, help="the question (<ins> tags are removed)")
    parser.add_argument(
        "--attention",
        metavar="OUT_DIR",
        help="also write attention overlays of the <ins>-tagged words (teacher-forced) here",
    )
    parser.add_argument(
        "--attention-layers", nargs="+", help="indices or `all`; default: the supervised-layer rule"
    )
    parser.add_argument("--attention-query", default="tags", choices=QUERY_MODES,
                        help="rows to draw: the tagged words, or the answer token(s) (KLAL)")  # fmt: skip
    parser.add_argument("--attention-query-offset", type=int, default=0, choices=[0, -1])
    parser.add_argument("--attention-head-fusion", default="mean", choices=HEAD_FUSIONS)
    seg = parser.add_argument_group("segmentation (checkpoints trained with the segmentation head, swim.seg)")
    seg.add_argument(
        "--segment", metavar="OUT_DIR", help="write mask overlays (PNG grid, GIF) of the tagged words"
    )
    seg.add_argument(
        "--segment-all-frames", action="store_true", help="every frame, not only the sampled ones"
    )
    seg.add_argument(
        "--sam2-video", help="Sam2VideoModel folder: track key-frame masks instead of per-frame masks"
    )
    seg.add_argument("--key-frames", default="first", choices=["first", "uniform"])
    seg.add_argument("--num-key-frames", type=int, default=5)
    add_model_args(parser)
    add_generation_args(parser, max_new_tokens=512)
    add_video_args(parser)
    return parser


def run(argv: list[str] | None = None) -> InferResult:
    args = build_parser().parse_args(argv)
    for path in [args.video] if args.video else args.image:
        if not Path(path).exists():
            raise SystemExit(f"{'--video' if args.video else '--image'} {path}: no such file or folder")
    loaded = load_model(
        args.model, dtype=args.dtype, attn_implementation=args.attn_implementation, device=args.device
    )
    result = infer(
        loaded,
        args.video,
        args.question,
        images=tuple(args.image or ()),
        video_settings=video_settings_from_args(args),
        settings=generation_settings_from_args(args),
    )
    grids = result.encoded.video_grid_thw or result.encoded.image_grid_thw
    logger.info(
        "vision grid(s) (t, h, w) = %s, %d prompt tokens, %d answer tokens",
        grids, result.encoded.input_ids.numel(), len(result.answer_ids),
    )  # fmt: skip
    sys.stdout.write(result.answer + "\n")
    sys.stdout.flush()
    if args.attention:
        settings = generation_settings_from_args(args)
        for path in attention_overlays(
            loaded, result, args.question, video_settings=video_settings_from_args(args),
            system_prompt=settings.system_prompt, layers=parse_layers(args.attention_layers), out_dir=args.attention,
            query=args.attention_query, query_offset=args.attention_query_offset,
            head_fusion=args.attention_head_fusion,
        ):  # fmt: skip
            logger.info("wrote %s", path)
    if args.segment:
        for path in segment_overlays(loaded, result, args):
            logger.info("wrote %s", path)
    return result


def segment_overlays(loaded: LoadedModel, result: InferResult, args) -> list[Path]:
    """Masks of the question's tagged phrases (teacher-forced with the generated answer), drawn on the frames."""
    from swim.data.records import Turn
    from swim.seg.inference import Segmenter, segment_video
    from swim.vis.segmentation import draw_mask_grid, save_mask_gif

    settings = video_settings_from_args(args)
    segmenter = Segmenter.load(args.model, settings, generation_settings_from_args(args).system_prompt,
                               device=str(loaded.device))  # fmt: skip
    video_model = None
    if args.sam2_video:
        from transformers import Sam2VideoModel

        video_model = Sam2VideoModel.from_pretrained(args.sam2_video).to(loaded.device).eval()
    turns = [Turn("user", args.question), Turn("assistant", result.answer)]
    frames, masks = segment_video(segmenter, args.video, turns, all_frames=args.segment_all_frames,
                                  video_model=video_model, key_mode=args.key_frames, num_keys=args.num_key_frames)  # fmt: skip
    out = Path(args.segment)
    return [
        draw_mask_grid(frames, masks, out / "masks.png", title=result.question[:90]),
        save_mask_gif(frames, masks, out / "masks.gif"),
    ]


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (returns None so that console scripts exit 0); see `run`."""
    run(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(sys.argv[1:])
