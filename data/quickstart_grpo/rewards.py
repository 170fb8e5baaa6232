"""A user reward for configs/quickstart-grpo.yaml, named there as
`data/quickstart_grpo/rewards.py:names_the_topic` (TRL's reward signature: the prompts, the
completions, and each dataset column as a keyword argument, one value per completion)."""

TOPICS = ("sports", "cooking", "weather", "technology", "music")


def names_the_topic(prompts, completions, reference, **kwargs):
    """1 when the completion names the reference topic and no other topic, else 0."""
    scores = []
    for completion, topic in zip(completions, reference):
        named = {name for name in TOPICS if name in completion.lower()}
        scores.append(1.0 if named == {topic} else 0.0)
    return scores
