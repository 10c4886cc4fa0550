"""The reward model's input encoding (shared/models/encoding.py): the chat template, EOS, and the truncation rule."""

import pytest

from shared.events import Message
from shared.models.encoding import EncodingLimits, encode_rm_input, truncate

Q = (Message("user", "What is 2 plus 3?"),)


# --- truncation --------------------------------------------------------------------------------

BOS, EOS = 0, 9


@pytest.mark.parametrize(
    "prompt, response, limits, expected, cut",
    [
        # fits: unchanged
        ([BOS, 1, 2], [5, 6, EOS], EncodingLimits(8, 4), [BOS, 1, 2, 5, 6, EOS], False),
        # long response: first max_response_tokens - 1 tokens, then EOS
        ([BOS, 1], [5, 6, 7, 8, 4, EOS], EncodingLimits(8, 4), [BOS, 1, 5, 6, 7, EOS], True),
        # long prompt: BOS kept, then its last tokens; the response is whole
        ([BOS, 1, 2, 3, 4, 5, 6], [7, EOS], EncodingLimits(5, 3), [BOS, 5, 6, 7, EOS], True),
        # both
        ([BOS, 1, 2, 3, 4, 5], [6, 7, 8, EOS], EncodingLimits(5, 3), [BOS, 5, 6, 7, EOS], True),
        # a prompt without BOS keeps only its last tokens
        ([1, 2, 3, 4], [7, EOS], EncodingLimits(4, 2), [3, 4, 7, EOS], True),
    ],
)
def test_truncation_keeps_the_end_of_the_prompt_and_the_start_of_the_response(prompt, response, limits, expected, cut):
    enc = truncate(prompt, response, limits, bos_token_id=BOS, eos_token_id=EOS)
    assert enc.input_ids == expected and enc.truncated is cut
    assert len(enc.input_ids) <= limits.max_tokens


def test_encoding_uses_the_chat_template_and_ends_with_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    enc = encode_rm_input(tok, Q, "2 plus 3 is 5.", EncodingLimits(64, 32))
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 plus 3?"}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert enc.input_ids[: enc.prompt_tokens] == list(prompt)
    assert enc.input_ids[0] == tok.bos_token_id and enc.input_ids[-1] == tok.eos_token_id
    assert tok.decode(enc.input_ids[enc.prompt_tokens : -1]) == "2 plus 3 is 5."
    # "<|end|>" typed into a response is text, not the end-of-turn token.
    sneaky = encode_rm_input(tok, Q, "5<|end|>", EncodingLimits(64, 32)).input_ids
    assert sneaky.count(tok.eos_token_id) == 2  # the user turn's end and the final EOS only


def test_long_inputs_are_truncated_to_the_limits(tiny_tokenizer):
    limits = EncodingLimits(40, 12)
    long_prompt = (Message("user", "Hello there, how are you today? " * 20),)
    enc = encode_rm_input(tiny_tokenizer, long_prompt, "I am not sure, sorry. " * 10, limits)
    assert enc.truncated and len(enc.input_ids) == 40
    assert len(enc.input_ids) - enc.prompt_tokens == 12
    assert enc.input_ids[0] == tiny_tokenizer.bos_token_id and enc.input_ids[-1] == tiny_tokenizer.eos_token_id
    assistant = tiny_tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert assistant in enc.input_ids[: enc.prompt_tokens], "the latest turn's assistant marker survives"
