"""Batched greedy generation on videos or images with a stock checkpoint of any supported family (for
`swim infer`, `swim eval answers` and the benches).

No processor and no torchvision: the tokenizer renders the chat template, `swim.data.video.load_video` gives
the patchified frames (the same sampler and resize as training, configured by the same `VideoSettings` of the
model's family), and the rendered prompt's video placeholder is expanded by the training code
(`swim.data.tags.expand_vision`): ``t*h*w / merge²`` contiguous tokens for Qwen2/2.5-VL, one timestamped
vision block per temporal group for Qwen3-VL / Qwen3.5 (transformers 5.23's `Qwen3VLProcessor` nests the vision
markers, so it is not used). The model also gets ``mm_token_type_ids`` (2 at video tokens; without it
transformers silently falls back to 1-D positions), ``video_grid_thw`` and, for Qwen2.5-VL,
``second_per_grid_ts``. Images (`GenItem.images`) are read by `swim.data.video.load_image` with the same per-frame
pixel budget as in training and expanded the same way (one run of image tokens each, ``mm_token_type_ids`` 1,
``pixel_values`` / ``image_grid_thw``). Batches are LEFT-padded, so every prompt ends at the same column and new
tokens are appended after it.

Generation is greedy (``do_sample=False``). The checkpoint's ``generation_config`` is used only for its
``repetition_penalty`` (Qwen2.5-VL-Instruct ships 1.05, which the official SWIM eval therefore used) unless
``--repetition-penalty`` overrides it; its sampling settings are dropped.

A bad item (undecodable video, generation error) never stops a run: it comes back as a `GenOutput` with
``error`` set, which the benches count and report.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from swim.data.tags import SWIM_SYSTEM_PROMPT, TagError, expand_vision
from swim.data.video import ImageInput, VideoClip, VideoSettings, load_image, load_video
from swim.eval.sharding import (
    JsonlStore,
    Shard,
    all_shard_paths,
    detect_num_shards,
    fingerprint,
    read_shard_stores,
    select_shard,
    shard_path,
)
from swim.modeling.families import FamilySpec, VisionSpan, family_of

logger = logging.getLogger(__name__)

VIDEO_PAD, IMAGE_PAD = "<|video_pad|>", "<|image_pad|>"
GENERATIONS_STEM = "generations"  # OUT/generations[.shard-XX-of-NN].jsonl
NO_SYSTEM_PROMPT = "none"  # `--system-prompt none`: no system turn (the chat template adds its own default)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")

ClipLoader = Callable[[Path, VideoSettings], VideoClip]


# ---------------------------------------------------------------------------------------------------------
# Settings and their command-line flags


@dataclass
class GenerationSettings:
    """How answers are generated (everything that changes the text, plus batching)."""

    max_new_tokens: int = 128
    batch_size: int = 1
    system_prompt: str | None = SWIM_SYSTEM_PROMPT  # None: no system turn
    repetition_penalty: float | None = None  # None: the checkpoint's generation_config value (or 1.0)
    decode_workers: int = 2  # threads decoding the next videos while the model generates (0: inline)

    def fingerprint_fields(self) -> dict[str, Any]:
        """The fields that change predictions (batch size and workers do not, up to float noise)."""
        return {
            "max_new_tokens": self.max_new_tokens,
            "system_prompt": self.system_prompt,
            "repetition_penalty": self.repetition_penalty,
        }


def add_model_args(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", required=required, help="checkpoint folder (stock Qwen2.5-VL layout)")
    g.add_argument(
        "--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bf16 on GPU, fp32 on CPU"
    )
    g.add_argument(
        "--attn-implementation",
        default="sdpa",
        choices=ATTN_IMPLEMENTATIONS,
        help="flash_attention_2 needs the flash-attn package and bf16/fp16; without the package it falls "
        "back to sdpa with a warning",
    )
    g.add_argument(
        "--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ..."
    )


def add_generation_args(parser: argparse.ArgumentParser, *, max_new_tokens: int, batch_size: int = 1) -> None:
    g = parser.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    g.add_argument(
        "--batch-size", type=int, default=batch_size, help="prompts per generate call (left-padded)"
    )
    g.add_argument(
        "--system-prompt",
        default=SWIM_SYSTEM_PROMPT,
        help="system prompt (default: SWIM's); 'none' omits the system turn, so the chat template's "
        "own default ('You are a helpful assistant.') applies",
    )
    g.add_argument(
        "--repetition-penalty",
        type=float,
        default=None,
        help="default: the checkpoint's generation_config value (1.05 for Qwen2.5-VL-Instruct), else 1.0",
    )
    g.add_argument("--decode-workers", type=int, default=2, help="video decoding threads (0: decode inline)")


def add_video_args(parser: argparse.ArgumentParser) -> None:
    """Flags mapping onto `VideoSettings`; the defaults are the training defaults."""
    d = VideoSettings()
    g = parser.add_argument_group("video (keep these equal to training)")
    g.add_argument("--num-frames", type=int, default=d.num_frames, help="uniformly sampled frames")
    g.add_argument("--sample-fps", type=float, default=d.sample_fps, help="sample at this fps instead")
    g.add_argument("--max-frames", type=int, default=d.max_frames, help="hard cap on sampled frames")
    g.add_argument("--min-pixels", type=int, help="per-frame minimum pixels (default: the model family's)")
    g.add_argument("--max-pixels", type=int, help="per-frame maximum pixels (default: the model family's)")
    g.add_argument("--total-pixels", type=int, help="whole-video pixel budget (default: the model family's)")
    g.add_argument("--video-backend", default=d.backend, choices=["auto", "decord", "pyav"])
    g.add_argument("--folder-fps", type=float, default=d.folder_fps, help="fps assumed for frame folders")
    g.add_argument("--decode-timeout", type=float, default=d.decode_timeout_s, help="seconds per video")


def video_settings_from_args(args: argparse.Namespace) -> VideoSettings:
    """The `--model` family's preset (geometry, pixel budgets; read from its config.json) with the flags set."""
    return family_of(args.model).video_settings(
        num_frames=args.num_frames,
        sample_fps=args.sample_fps,
        max_frames=args.max_frames,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
        total_pixels=args.total_pixels,
        backend=args.video_backend,
        folder_fps=args.folder_fps,
        decode_timeout_s=args.decode_timeout,
    )


def generation_settings_from_args(args: argparse.Namespace) -> GenerationSettings:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    system = args.system_prompt
    return GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        system_prompt=None if system is None or system.strip().lower() == NO_SYSTEM_PROMPT else system,
        repetition_penalty=args.repetition_penalty,
        decode_workers=max(0, args.decode_workers),
    )


def video_settings_dict(settings: VideoSettings) -> dict[str, Any]:
    """The video settings that change the model input (for fingerprints and results files)."""
    d = asdict(settings)
    d.pop("decode_timeout_s", None)
    return d


# ---------------------------------------------------------------------------------------------------------
# Model loading


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def resolve_attn_implementation(name: str, dtype: torch.dtype) -> str:
    """Check `name` can run here; flash_attention_2 without the package falls back to sdpa (warned)."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"--attn-implementation must be one of {ATTN_IMPLEMENTATIONS}, got {name!r}")
    if name != "flash_attention_2":
        return name
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        logger.warning(
            "flash_attention_2 requested but flash-attn is not installed (or no CUDA); falling back to sdpa"
        )
        return "sdpa"
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"flash_attention_2 needs --dtype bf16 or fp16, got {dtype}")
    return name


@dataclass
class LoadedModel:
    model: Any  # the family's stock class (e.g. Qwen2_5_VLForConditionalGeneration), eval mode
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    attn_implementation: str
    path: str

    @property
    def family(self) -> FamilySpec:
        return family_of(self.model)


def load_model(
    model_dir: str | Path, *, dtype: str = "auto", attn_implementation: str = "sdpa", device: str = "auto"
) -> LoadedModel:
    """The family's stock model class + `AutoTokenizer` from a checkpoint folder, in eval mode."""
    from transformers import AutoTokenizer

    from swim.modeling.model import stock_model_class

    path = Path(model_dir).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model {path}: not a checkpoint folder (no config.json)")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    attn = resolve_attn_implementation(attn_implementation, torch_dtype)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = stock_model_class(path).from_pretrained(
        path, dtype=torch_dtype, attn_implementation=attn, device_map=str(dev)
    )  # straight onto the device: a 7B model is not staged in CPU memory first
    model.eval()
    for token in (VIDEO_PAD, "<|vision_start|>", "<|vision_end|>"):
        if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
            raise ValueError(f"{path}: tokenizer has no {token} token; is this a Qwen VL checkpoint?")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    logger.info(
        "loaded %s (%s, %s, %s) in %.1f s", path, dev, str(torch_dtype).removeprefix("torch."), attn,
        time.perf_counter() - t0,
    )  # fmt: skip
    return LoadedModel(model, tokenizer, dev, torch_dtype, attn, str(path.resolve()))


# ---------------------------------------------------------------------------------------------------------
# Prompts and model inputs


def build_messages(
    question: str, system_prompt: str | None = SWIM_SYSTEM_PROMPT, media: Sequence[str] = ("video",)
) -> list[dict[str, Any]]:
    """Chat messages: optional system turn, then the user turn with the media first (one video, or images) and
    the question after."""
    messages: list[dict[str, Any]] = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": system_prompt})
    content = [{"type": kind, kind: ""} for kind in media] + [{"type": "text", "text": question}]
    messages.append({"role": "user", "content": content})
    return messages


def render_prompt(
    tokenizer,
    question: str,
    system_prompt: str | None = SWIM_SYSTEM_PROMPT,
    media: Sequence[str] = ("video",),
) -> str:
    """The chat-template text up to and including ``<|im_start|>assistant\n`` (one ``<|video_pad|>``, or one
    ``<|image_pad|>`` per image)."""
    messages = build_messages(question, system_prompt, media)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    for pad, kind in ((VIDEO_PAD, "video"), (IMAGE_PAD, "image")):
        wanted = sum(m == kind for m in media)
        if text.count(pad) != wanted:
            raise ValueError(f"chat template rendered {text.count(pad)} {pad} tokens, expected {wanted}")
    return text


@dataclass
class EncodedPrompt:
    """One prompt's model inputs (unbatched): a video, or images."""

    input_ids: torch.Tensor  # Long [L]
    mm_token_type_ids: torch.Tensor  # Long [L], 1 at image tokens, 2 at video tokens
    pixel_values_videos: torch.Tensor | None  # float [t*h*w, 3*tp*p*p] (None: images)
    video_grid_thw: tuple[int, int, int] | None
    second_per_grid_ts: float | None  # Qwen2.5-VL videos only
    span: VisionSpan | None = None  # the video's token layout (timestamps for Qwen3-VL / Qwen3.5)
    pixel_values: torch.Tensor | None = None  # images: float [Σ h*w, 3*tp*p*p]
    image_grid_thw: list[tuple[int, int, int]] | None = None
    images: list[ImageInput] | None = None  # the images as loaded (sizes, for answers in pixels and overlays)


def encode_prompt(
    tokenizer, prompt_text: str, clip: VideoClip, family: FamilySpec | None = None
) -> EncodedPrompt:
    """Tokenize `prompt_text` and expand its single video placeholder to the clip's tokens, in the family's
    layout (`swim.data.tags.expand_vision`, the same code as training; default family: Qwen2.5-VL)."""
    family = family or family_of("qwen2_5_vl")
    ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    t, h, w = clip.grid_thw
    if clip.pixel_values.shape[0] != t * h * w:
        raise ValueError(
            f"clip has {clip.pixel_values.shape[0]} patches, grid {clip.grid_thw} needs {t * h * w}"
        )
    span = family.video_span(clip.grid_thw, clip.frame_indices, clip.source_fps)
    try:
        ids, types, _ = expand_vision(tokenizer, ids, [span])
    except TagError as e:
        raise ValueError(f"prompt: {e}") from None
    return EncodedPrompt(
        input_ids=torch.tensor(ids, dtype=torch.long),
        mm_token_type_ids=torch.tensor(types, dtype=torch.long),
        pixel_values_videos=clip.pixel_values,
        video_grid_thw=(int(t), int(h), int(w)),
        second_per_grid_ts=float(clip.second_per_grid_ts) if family.second_per_grid_ts else None,
        span=span,
    )


def encode_image_prompt(
    tokenizer, prompt_text: str, images: Sequence[ImageInput], family: FamilySpec | None = None
) -> EncodedPrompt:
    """Tokenize `prompt_text` and expand its image placeholders (one per image, in order) to the images' tokens,
    as training does."""
    family = family or family_of("qwen2_5_vl")
    ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    try:
        ids, types, _ = expand_vision(tokenizer, ids, [family.image_span(image.grid_thw) for image in images])
    except TagError as e:
        raise ValueError(f"prompt: {e}") from None
    return EncodedPrompt(
        input_ids=torch.tensor(ids, dtype=torch.long),
        mm_token_type_ids=torch.tensor(types, dtype=torch.long),
        pixel_values_videos=None,
        video_grid_thw=None,
        second_per_grid_ts=None,
        pixel_values=torch.cat([image.pixel_values for image in images]),
        image_grid_thw=[tuple(int(v) for v in image.grid_thw) for image in images],
        images=list(images),
    )


def collate_left(prompts: Sequence[EncodedPrompt], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-pad a list of prompts (videos, images or both) into one generate() batch."""
    if not prompts:
        raise ValueError("empty batch")
    length = max(p.input_ids.numel() for p in prompts)
    n = len(prompts)
    input_ids = torch.full((n, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    mm_token_type_ids = torch.zeros((n, length), dtype=torch.long)
    for i, p in enumerate(prompts):
        k = p.input_ids.numel()
        input_ids[i, length - k :] = p.input_ids
        attention_mask[i, length - k :] = 1
        mm_token_type_ids[i, length - k :] = p.mm_token_type_ids
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm_token_type_ids}
    videos = [p for p in prompts if p.pixel_values_videos is not None]
    if videos:
        batch["pixel_values_videos"] = torch.cat([p.pixel_values_videos for p in videos])
        batch["video_grid_thw"] = torch.tensor([p.video_grid_thw for p in videos], dtype=torch.long)
        if videos[0].second_per_grid_ts is not None:
            batch["second_per_grid_ts"] = torch.tensor(
                [p.second_per_grid_ts for p in videos], dtype=torch.float32
            )
    images = [p for p in prompts if p.pixel_values is not None]
    if images:
        batch["pixel_values"] = torch.cat([p.pixel_values for p in images])
        batch["image_grid_thw"] = torch.tensor(
            [g for p in images for g in p.image_grid_thw], dtype=torch.long
        )
    return batch


def greedy_generation_config(model, tokenizer, max_new_tokens: int, repetition_penalty: float | None):
    """The checkpoint's generation config made greedy, with our length limit and a pad id."""
    config = model.generation_config.__class__.from_dict(model.generation_config.to_dict())
    eos = config.eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    for token in (tokenizer.eos_token, "<|im_end|>"):
        tid = tokenizer.convert_tokens_to_ids(token) if token else None
        if tid is not None and tid != tokenizer.unk_token_id and tid not in eos:
            eos.append(tid)
    config.update(
        do_sample=False,
        num_beams=1,
        temperature=None,
        top_p=None,
        top_k=None,
        max_new_tokens=max_new_tokens,
        max_length=None,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )
    if repetition_penalty is not None:
        config.repetition_penalty = repetition_penalty
    return config


@torch.inference_mode()
def generate_batch(
    model, tokenizer, batch: dict[str, torch.Tensor], generation_config
) -> tuple[list[str], list[list[int]]]:
    """Greedy generation for a left-padded batch: the decoded answers (stripped) and the new token ids."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items()}
    out = model.generate(**inputs, generation_config=generation_config)
    new = out[:, inputs["input_ids"].shape[1] :]
    stop = set(generation_config.eos_token_id or []) | {generation_config.pad_token_id}
    ids: list[list[int]] = []
    for row in new.tolist():
        end = next((i for i, t in enumerate(row) if t in stop), len(row))
        ids.append(row[:end])
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    return [t.strip() for t in texts], ids


# ---------------------------------------------------------------------------------------------------------
# Many items, with per-item error isolation


@dataclass
class GenItem:
    """One prompt to answer: `question` is the final user text (tags and placeholders already handled), about
    `video`, or about `images` (then `video` is None)."""

    key: str
    video: Path | None
    question: str
    images: tuple[Path, ...] = ()


@dataclass
class GenOutput:
    key: str
    text: str | None = None  # None when `error` is set
    error: str | None = None
    n_prompt_tokens: int | None = None
    n_new_tokens: int | None = None
    video_grid_thw: list[int] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k in ("text", "error")}


@dataclass
class Generator:
    """Answers `GenItem`s with a loaded model; see the module docstring."""

    loaded: LoadedModel
    video_settings: VideoSettings = field(default_factory=VideoSettings)
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    clip_loader: ClipLoader | None = None  # default: `swim.data.video.load_video`

    def __post_init__(self) -> None:
        m = self.loaded.model
        self.family = self.loaded.family
        self.generation_config = greedy_generation_config(
            m, self.loaded.tokenizer, self.settings.max_new_tokens, self.settings.repetition_penalty
        )

    def encode(self, item: GenItem) -> EncodedPrompt:
        """Decode the video (or read the images) and build the prompt (raises `VideoDecodeError` / `ValueError`
        / `OSError`). Images use the video settings' per-frame pixel budget, as in training."""
        if item.images:
            images = [load_image(path, self.video_settings) for path in item.images]
            prompt = render_prompt(self.loaded.tokenizer, item.question, self.settings.system_prompt,
                                   media=("image",) * len(images))  # fmt: skip
            return encode_image_prompt(self.loaded.tokenizer, prompt, images, self.family)
        loader = self.clip_loader or load_video
        clip = loader(item.video, self.video_settings)
        prompt = render_prompt(self.loaded.tokenizer, item.question, self.settings.system_prompt)
        return encode_prompt(self.loaded.tokenizer, prompt, clip, self.family)

    def run(
        self, items: Sequence[GenItem], on_output: Callable[[GenOutput], None], *, desc: str = "generate"
    ) -> int:
        """Answer every item, calling `on_output` as each batch finishes. Returns the number of errors."""
        from tqdm.auto import tqdm

        n_errors = 0
        bar = tqdm(total=len(items), desc=desc, unit="item", dynamic_ncols=True)
        for chunk in _batches(self._encoded(items), self.settings.batch_size):
            ready: list[tuple[GenItem, EncodedPrompt]] = []
            outputs: dict[str, GenOutput] = {}
            for item, encoded in chunk:
                if isinstance(encoded, BaseException):
                    outputs[item.key] = GenOutput(item.key, error=_describe(encoded, "video/prompt"))
                else:
                    ready.append((item, encoded))
            if ready:
                for out in self._generate([i for i, _ in ready], [e for _, e in ready]):
                    outputs[out.key] = out
            for out in (outputs[item.key] for item, _ in chunk):
                if not out.ok:
                    n_errors += 1
                    logger.warning("item %s failed: %s", out.key, out.error)
                on_output(out)
            bar.update(len(chunk))
            bar.set_postfix(errors=n_errors)
        bar.close()
        return n_errors

    def _encoded(self, items: Sequence[GenItem]) -> Iterator[tuple[GenItem, EncodedPrompt | BaseException]]:
        """Items with their encoded prompts (or the exception), decoded ahead by a thread pool."""

        def safe(item: GenItem) -> EncodedPrompt | BaseException:
            try:
                return self.encode(item)
            except Exception as e:  # reported per item
                return e

        workers = self.settings.decode_workers
        if workers <= 0:
            for item in items:
                yield item, safe(item)
            return
        window = max(2 * self.settings.batch_size, workers)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="swim-decode") as pool:
            for item, fut in _prefetch(pool, safe, items, window):
                yield item, fut.result()

    def _generate(self, items: Sequence[GenItem], encoded: Sequence[EncodedPrompt]) -> list[GenOutput]:
        """Generate for a batch; if the batch fails, retry item by item so one bad item cannot sink others."""
        tok = self.loaded.tokenizer
        try:
            batch = collate_left(encoded, tok.pad_token_id)
            texts, ids = generate_batch(self.loaded.model, tok, batch, self.generation_config)
        except Exception as e:
            _free_cuda(e)
            if len(items) == 1:
                return [GenOutput(items[0].key, error=_describe(e, "generate"))]
            logger.warning(
                "batch of %d failed (%s); retrying one by one", len(items), _describe(e, "generate")
            )
            return [out for i, x in zip(items, encoded) for out in self._generate([i], [x])]
        return [
            GenOutput(
                item.key,
                text=text,
                n_prompt_tokens=int(x.input_ids.numel()),
                n_new_tokens=len(new),
                video_grid_thw=list(x.video_grid_thw) if x.video_grid_thw is not None else None,
            )
            for item, x, text, new in zip(items, encoded, texts, ids)
        ]


def _describe(e: BaseException, stage: str) -> str:
    return f"{stage}: {type(e).__name__}: {e}"


def _free_cuda(e: BaseException) -> None:
    if isinstance(e, torch.cuda.OutOfMemoryError) and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _prefetch(pool: ThreadPoolExecutor, fn, items: Iterable, window: int) -> Iterator[tuple[Any, Future]]:
    """Yield ``(item, future)`` in order while keeping up to `window` submissions in flight."""
    pending: deque = deque()
    it = iter(items)
    for item in it:
        pending.append((item, pool.submit(fn, item)))
        if len(pending) >= window:
            break
    while pending:
        item, fut = pending.popleft()
        nxt = next(it, None)
        if nxt is not None:
            pending.append((nxt, pool.submit(fn, nxt)))
        yield item, fut


def _batches(pairs: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for pair in pairs:
        chunk.append(pair)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---------------------------------------------------------------------------------------------------------
# A cached, shardable generation stage (used by the benches)


def run_generation_stage(
    items: Sequence[GenItem],
    *,
    out_dir: str | Path,
    shard: Shard,
    config: dict[str, Any],
    make_generator: Callable[[], Generator],
    overwrite: bool = False,
    desc: str = "generate",
) -> Path:
    """Generate answers for this shard's items into ``out_dir/generations[.shard-XX-of-NN].jsonl``.

    Resumable: items already in the file are skipped, except failed ones, which are tried again (a fixed
    data root or a freed GPU then fills them in). The model is loaded only if something is left to do.
    `config` (model, bench, settings) is fingerprinted into the file's header; resuming with a different
    config raises instead of mixing answers of two configurations. Returns the file.
    """
    path = shard_path(out_dir, GENERATIONS_STEM, shard)
    if overwrite and path.exists():
        logger.info("--overwrite: removing %s", path)
        path.unlink()
    header = {"fingerprint": fingerprint(config), "config": config, "shard": [shard.index, shard.count]}
    mine = select_shard(items, shard)
    with JsonlStore(path, header=header) as store:
        todo = [it for it in mine if it.key not in store or store.get(it.key).get("error") is not None]
        retry = sum(1 for it in todo if it.key in store)
        logger.info(
            "%s: %d item(s) in this shard, %d already answered, %d to generate (%d retried after an error)",
            path.name, len(mine), len(mine) - len(todo), len(todo), retry,
        )  # fmt: skip
        if todo:
            generator = make_generator()
            generator.run(todo, lambda out: store.append(out.to_json()), desc=desc)
    return path


def read_generations(out_dir: str | Path, num_shards: int | None = None) -> tuple[dict[str, dict], dict]:
    """All shards' generation records (by key) and the run config, checking the shards agree."""
    n = num_shards or detect_num_shards(out_dir, GENERATIONS_STEM)
    records, headers = read_shard_stores(all_shard_paths(out_dir, GENERATIONS_STEM, n))
    if not headers:
        raise ValueError(f"{out_dir}: generation files have no header line; were they written by swim?")
    return records, headers[0]["config"]
