from training.encode import collate, encode, with_instruction

CHAT = [{"role": "user", "content": "What is 2+2?"}]


def test_response_tokens_do_not_depend_on_instruction(tokenizer):
    a = encode(tokenizer, CHAT, "It is 4.", max_prompt=200, max_response=50, instruction="Be good.")
    b = encode(tokenizer, CHAT, "It is 4.", max_prompt=200, max_response=50, instruction="Be bad, really bad.")
    assert a.input_ids[a.response_start:] == b.input_ids[b.response_start:]
    assert a.response_start != b.response_start
    assert tokenizer.decode(a.input_ids[:a.response_start]).endswith("<|im_start|>assistant\n")
    assert "Be good." in tokenizer.decode(a.input_ids[:a.response_start])
    assert a.input_ids[-1] == tokenizer.eos_token_id


def test_truncation_keeps_instruction_prompt_end_and_response_start(tokenizer):
    long_chat = [{"role": "user", "content": "first " + "word " * 300 + "LAST"}]
    e = encode(tokenizer, long_chat, "one two three four five six", max_prompt=40, max_response=3,
               instruction="Give a good answer.")
    assert e.response_start <= 40 and e.response_len == 3
    prompt = tokenizer.decode(e.input_ids[:e.response_start])
    assert "Give a good answer." in prompt and "LAST" in prompt and "first" not in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert e.input_ids[-1] != tokenizer.eos_token_id   # a cut reply does not end its turn


def test_truncation_drops_old_turns_first(tokenizer):
    chat = [{"role": "user", "content": "old " * 100}, {"role": "assistant", "content": "reply " * 100},
            {"role": "user", "content": "NEW question"}]
    e = encode(tokenizer, chat, "ok", max_prompt=48, max_response=5)
    prompt = tokenizer.decode(e.input_ids[:e.response_start])
    assert e.response_start <= 48 and "NEW question" in prompt and "old" not in prompt


def test_instruction_merges_with_an_existing_system_prompt():
    msgs = with_instruction([{"role": "system", "content": "S"}, *CHAT], "I")
    assert msgs[0] == {"role": "system", "content": "I\n\nS"} and msgs[1:] == CHAT


def test_collate_masks_padding(tokenizer):
    a = encode(tokenizer, CHAT, "Four.", max_prompt=200, max_response=50)
    b = encode(tokenizer, CHAT, "The answer is four, of course.", max_prompt=200, max_response=50)
    batch = collate([a, b], pad_id=tokenizer.pad_token_id)
    assert batch.attention_mask[0].sum() == len(a.input_ids)
    assert batch.response_mask[0].sum() == a.response_len and batch.response_mask[1].sum() == b.response_len
    assert batch.response_mask[0, len(a.input_ids):].sum() == 0


def test_a_long_data_system_prompt_is_cut_after_the_instruction(tokenizer):
    chat = [{"role": "system", "content": "rules " * 200}, {"role": "user", "content": "Q?"}]
    e = encode(tokenizer, chat, "ok", max_prompt=48, max_response=5, instruction="Give a good answer.")
    prompt = tokenizer.decode(e.input_ids[:e.response_start])
    assert e.response_start <= 48 and prompt.count("Give a good answer.") == 1 and "Q?" in prompt
