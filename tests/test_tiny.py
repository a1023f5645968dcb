"""The tiny checkpoint factory: stock classes load it offline, with Qwen's special tokens and chat template."""

import json

from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from swim.tiny import QWEN_SPECIAL_TOKENS, main


def test_swim_tiny_writes_a_stock_loadable_checkpoint(tmp_path):
    main([str(tmp_path / "ckpt"), "--layers", "3", "--hidden", "32", "--heads", "4", "--kv-heads", "2"])
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    assert tokenizer.convert_tokens_to_ids(QWEN_SPECIAL_TOKENS) == list(range(len(QWEN_SPECIAL_TOKENS)))
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    messages = [
        {"role": "user", "content": [{"type": "video", "video": "v.mp4"}, {"type": "text", "text": "Hi"}]}
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|video_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n")  # fmt: skip
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tmp_path / "ckpt", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    text_config, vision_config = model.config.text_config, model.config.vision_config
    assert (
        text_config.num_hidden_layers,
        text_config.num_attention_heads,
        text_config.num_key_value_heads,
    ) == (3, 4, 2)
    assert vision_config.depth == 2 and model.config.video_token_id == tokenizer.convert_tokens_to_ids(
        "<|video_pad|>"
    )
    config = json.loads((tmp_path / "ckpt" / "video_preprocessor_config.json").read_text())
    assert config["patch_size"] == 14 and config["temporal_patch_size"] == 2 and config["merge_size"] == 2
