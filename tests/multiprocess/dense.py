"""A dense reward for tests: a random tiny model never writes the task's words, so the task's gold score is
0 everywhere and every group would tie; the share of ASCII letters in the response varies."""


def dense_reward(prompts, responses, **columns):
    return [sum(c.isascii() and c.isalpha() for c in r) / max(len(r), 1) - 0.5 for r in responses]
