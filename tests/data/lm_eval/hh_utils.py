"""Turns HH-RLHF rows (two full transcripts that share every turn but the last answer) into
lm-eval documents: the shared conversation as the prompt, and the two last answers as choices."""

ASSISTANT = "\n\nAssistant:"


def _split(row: dict) -> dict:
    at = row["chosen"].rfind(ASSISTANT) + len(ASSISTANT)
    prompt = row["chosen"][:at]
    if row["rejected"][:at] != prompt:
        raise ValueError("chosen and rejected transcripts differ before their last answer")
    last_human = prompt[prompt.rfind("Human:") + len("Human:"):-len(ASSISTANT)].strip()
    # The prompt ends with "Assistant:" and every answer starts with a space: no token straddles the two.
    return {"prompt": prompt.strip(), "choices": [row["chosen"][at:], row["rejected"][at:]],
            "question": last_human, "chosen_answer": row["chosen"][at:].strip()}


def pairs(dataset):
    return dataset.map(_split)
